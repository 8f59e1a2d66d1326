"""The training loop's own costs: losses read on the host every N steps (not every step), a
non-finite loss stopped with an error naming phase, step and term, an optimiser that is
bit for bit torch's default on the CPU, and a memory prediction that leaves the models as
they were."""
import pytest
import torch
from conftest import quick_config

from breakscene.method import training
from breakscene.method.training import attention_loss, check_finite
from commands.main import main
from breakscene.config import ExtractConfig
from breakscene.errors import BreakSceneError
from breakscene.models.memory import predict_step_memory
from breakscene.models.loading import load_models
from breakscene.method.phases import PhaseSetup
from breakscene.scenes.scene import load_scene_dir
from breakscene.errors import NonFiniteLossError
from breakscene.method.training import LossTerms, make_optimizer, run_phase

CPU = torch.device("cpu")


def toy_phase(bad_step: int | None = None, bad_value: float = float("inf"), term: str = "attention"):
    """A one-parameter phase whose ``term`` is ``bad_value`` at step ``bad_step`` (from 1);
    returns (setup, step_fn, calls) where calls counts the steps run."""
    w = torch.nn.Parameter(torch.ones(3))
    calls = []

    def step() -> LossTerms:
        calls.append(1)
        loss = (w**2).sum()
        parts = {"diffusion": loss, "attention": loss.detach() * 0, "prior": loss.detach() * 0}
        if len(calls) == bad_step:
            parts[term] = parts[term] + bad_value
        total = parts["diffusion"] + parts["attention"] + parts["prior"]
        return LossTerms(total=total, **parts)
    return PhaseSetup([{"params": [w], "lr": 0.1}], [w]), step, calls


def test_losses_are_read_back_every_n_steps_and_at_the_end(monkeypatch):
    reads = []
    check = check_finite
    monkeypatch.setattr(training, "check_finite",
                        lambda phase, rows, first: (reads.append(len(rows)), check(phase, rows, first)))
    setup, step, calls = toy_phase()
    result = run_phase("toy", 12, setup, step, cfg=ExtractConfig(), device=CPU, progress=False, readback_every=5)
    assert len(calls) == 12 and reads == [5, 5, 2]  # three host reads for twelve steps
    assert result.losses.shape == (12, 4) and torch.isfinite(result.losses).all()


@pytest.mark.parametrize("every, steps_run", [(5, 5), (1, 3)])
def test_a_non_finite_loss_stops_the_phase_at_the_next_read_back(every, steps_run):
    setup, step, calls = toy_phase(bad_step=3)
    with pytest.raises(NonFiniteLossError) as err:
        run_phase("phase 1", 40, setup, step, cfg=ExtractConfig(), device=CPU, progress=False, readback_every=every)
    assert len(calls) == steps_run  # found where the losses are read, not after every step
    assert (err.value.phase, err.value.step, err.value.term) == ("phase 1", 3, "attention")
    assert isinstance(err.value, BreakSceneError)
    assert "phase 1: the attention loss is not finite at step 3" in str(err.value)


@pytest.mark.parametrize("term, value, named", [("diffusion", float("nan"), "diffusion"),
                                                 ("prior", float("-inf"), "prior")])
def test_the_error_names_the_term_that_went_wrong(term, value, named):
    setup, step, _ = toy_phase(bad_step=2, bad_value=value, term=term)
    with pytest.raises(NonFiniteLossError, match=f"the {named} loss is not finite at step 2"):
        run_phase("phase 2 (full)", 4, setup, step, cfg=ExtractConfig(), device=CPU, progress=False)


def test_a_total_made_non_finite_by_its_weights_is_named_total():
    rows = torch.tensor([[1.0, 0.5, 0.2, 0.3], [float("inf"), 0.5, 0.2, 0.3]])
    with pytest.raises(NonFiniteLossError, match="the total loss is not finite at step 8"):
        check_finite("phase 1", rows, 7)


def test_extraction_with_a_non_finite_loss_fails_and_writes_no_bundle(tiny_extractor, examples, tmp_path, monkeypatch):
    """A loss term that turns inf at step 3 of phase 1: an error naming it, no bundle, and the
    resident weights back to the pristine model for the next scene."""
    attention = attention_loss
    calls = []

    def inf_at_step_3(*args, **kwargs):
        calls.append(1)
        value = attention(*args, **kwargs)
        return value + float("inf") if len(calls) == 3 else value
    monkeypatch.setattr(training, "attention_loss", inf_at_step_3)
    out = tmp_path / "bundle"
    cfg = quick_config(phase1_steps=6, phase2_steps=2, grid_seeds=0, prior={"enabled": False})
    with pytest.raises(NonFiniteLossError, match="phase 1: the attention loss is not finite at step 3"):
        tiny_extractor.extract(load_scene_dir(examples / "bear"), cfg, out=str(out))
    assert not out.exists() and not list(tmp_path.iterdir())
    emb = tiny_extractor.models.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb, tiny_extractor.assets.pristine)


def test_cli_reports_a_non_finite_loss_as_one_error_line(examples, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "masked_mse", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "bundle"
    status = main(["extract", "--scene", str(examples / "bear"), "--model", "tiny", "--out", str(out),
                   "--phase1-steps", "2", "--phase2-steps", "1", "--no-prior-preservation", "--grid-seeds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and not out.exists()
    assert err[-1].startswith("error: phase 1: the diffusion loss is not finite at step 1"), err


def test_auto_optimizer_is_torch_default_bit_for_bit_on_the_cpu():
    """"auto" is foreach on the CPU: the same numbers as torch's for-loop, and settings given to
    one optimiser do not leak into the next one made from the same groups."""
    models = load_models("tiny")
    params = list(models.unet.parameters())[:40] + [models.text_encoder.get_input_embeddings().weight]
    results = {}
    for kind in ("for-loop", "auto"):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        setup = PhaseSetup([{"params": copies[:20], "lr": 2e-3}, {"params": copies[20:], "lr": 5e-4}], copies)
        make_optimizer(setup, ExtractConfig(), CPU, "fused")  # leaves the groups as they were
        opt = make_optimizer(setup, ExtractConfig(), CPU, kind)
        assert opt.param_groups[0]["foreach"] is (kind == "auto") and not opt.param_groups[0]["fused"]
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            for p in copies:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
        results[kind] = copies
    assert all(torch.equal(a, b) for a, b in zip(results["for-loop"], results["auto"]))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(setup, ExtractConfig(), CPU, "adam8bit")


def test_memory_prediction_leaves_the_scheduler_on_its_device():
    """The prediction runs a step on ``meta``: the models' own scheduler must not follow it there."""
    models = load_models("tiny")
    predict_step_memory(models, ExtractConfig(), 64, "phase1", checkpointing=False)
    latents = torch.zeros(1, 4, 8, 8)
    noisy = models.scheduler.add_noise(latents, torch.ones_like(latents), torch.tensor([500]))
    assert noisy.device.type == "cpu" and models.scheduler.alphas_cumprod.device.type == "cpu"


def test_pipeline_extract_stage_fails_the_row_of_a_non_finite_loss(tmp_path, monkeypatch):
    """The nightly pipeline: the row fails with the error's text, no bundle and the next row goes on."""
    from conftest import write_scene

    from pipeline.config import JobConfig

    from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
    from pipeline.row import new_row, to_batch
    from pipeline.stages import Extract, Segment, load_images, score_and_select

    monkeypatch.setattr(training, "masked_mse", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    scene = write_scene(tmp_path / "scene", size=(64, 64), boxes=((8, 8, 40, 40),))
    out = tmp_path / "out"
    job = JobConfig(output=str(out), manifest="m.jsonl", model={"id": "tiny"},
                    extract=quick_config(phase1_steps=2, phase2_steps=1, grid_seeds=0,
                                         prior={"enabled": False}))
    row = new_row(image_uri=str(scene / "img.png"), image_id="cat", mask_uris=[str(scene / "mask0.png")],
                  labels=[], gt_mask_uris=[], manifest_row=0)
    batch = score_and_select(Segment(SegmentSettings.from_job(job))(load_images(to_batch([row]), {})), SelectSettings.from_job(job))
    (done,) = Extract(ExtractSettings.from_job(job), run_id="r1")(batch).to_pylist()
    assert done["status"] == "failed"
    assert done["error"].startswith("extract: phase 1: the diffusion loss is not finite at step 1"), done["error"]
    assert not (out / "bundles" / "cat").exists()
