"""The training loop's speed levers (issue 22): the CPU's default AdamW runs over flat
parameter groups and stays bit for bit torch's AdamW over the separate tensors; the
``RuntimeConfig.optimizer`` opt-in really is fused AdamW (and changes the losses only in
their last digits); the model's parameters get their own storage back after a phase."""
import pytest
import torch
from conftest import quick_config

from breakscene.config import ExtractConfig, RuntimeConfig, validate_config
from breakscene.errors import BreakSceneError, NonFiniteLossError
from breakscene.extraction.extractor import Extractor
from breakscene.method import training
from breakscene.method.phases import PhaseSetup
from breakscene.method.training import FlatAdamW, LossTerms, make_optimizer, run_phase
from breakscene.scenes.scene import load_scene_dir

CPU = torch.device("cpu")


def own_storage(p: torch.Tensor) -> bool:
    return p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()


def train_both_phases(ex: Extractor, scene, cfg: ExtractConfig, optimizer: str) -> tuple[torch.Tensor, dict]:
    """(losses of phase 1 then phase 2, the trained weights) with ``optimizer``; ``ex`` reset after."""
    prepared = ex.prepare(scene, cfg)
    step = ex.step_fn(prepared)
    m = ex.models
    m.unet.train()
    m.text_encoder.train()
    try:
        losses = []
        for phase, steps in (("phase1", cfg.phase1_steps), ("phase2", cfg.phase2_steps)):
            setup = ex.resident.phase_setup(phase, cfg, after_step=ex.assets.keep_only_new_rows(prepared.num_concepts))
            result = run_phase(phase, steps, setup, step, cfg=cfg, device=CPU, progress=False, optimizer=optimizer)
            losses.append(result.losses)
            assert all(own_storage(p) for p in setup.trainable)  # released: a bundle writer may save them
        weights = {f"unet.{k}": v.clone() for k, v in m.unet.state_dict().items()}
        weights |= {f"text.{k}": v.clone() for k, v in m.text_encoder.state_dict().items()}
        return torch.cat(losses), weights
    finally:
        m.unet.eval()
        m.text_encoder.eval()
        ex.reset()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_cpu_default_is_adamw_over_separate_tensors_bit_for_bit(tiny_extractor, examples, mode):
    scene = load_scene_dir(examples / "bear")
    cfg = quick_config(phase1_steps=3, phase2_steps=4, phase2_mode=mode, grid_seeds=0)
    flat_losses, flat_weights = train_both_phases(tiny_extractor, scene, cfg, "auto")
    losses, weights = train_both_phases(tiny_extractor, scene, cfg, "foreach")
    assert torch.equal(flat_losses, losses)
    assert flat_weights.keys() == weights.keys()
    assert all(torch.equal(flat_weights[k], weights[k]) for k in weights)


def test_the_default_runs_phase_2_over_flat_groups_and_keeps_channels_last(tiny_extractor, examples, monkeypatch):
    made = []
    monkeypatch.setattr(training, "make_optimizer", lambda *a, **k: made.append(make_optimizer(*a, **k)) or made[-1])
    conv = tiny_extractor.models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # RuntimeConfig.channels_last's default
    tiny_extractor.extract(load_scene_dir(examples / "bear"),
                           quick_config(phase1_steps=1, phase2_steps=1, grid_seeds=0, prior={"enabled": False}))
    phase1, phase2 = made
    assert not isinstance(phase1, FlatAdamW) and phase1.param_groups[0]["foreach"]  # one tensor: nothing to flatten
    assert isinstance(phase2, FlatAdamW) and len(phase2.param_groups[0]["params"]) == 1
    assert not any(g["fused"] for o in made for g in o.param_groups)
    assert conv.is_contiguous(memory_format=torch.channels_last) and own_storage(conv)


def test_adamw_fused_opt_in_really_is_fused_and_moves_losses_only_in_the_last_digits(examples, monkeypatch):
    made = []
    monkeypatch.setattr(training, "make_optimizer", lambda *a, **k: made.append(make_optimizer(*a, **k)) or made[-1])
    scene = load_scene_dir(examples / "bear")
    cfg = quick_config(phase1_steps=3, phase2_steps=3, grid_seeds=0, prior={"enabled": False})
    runs = {}
    for name in ("adamw", "adamw-fused"):
        ex = Extractor("tiny", progress=False, runtime=RuntimeConfig(optimizer=name))
        result = ex.extract(scene, cfg)
        assert result.runtime["optimizer"] == name  # recorded in the bundle as information
        runs[name] = [result.losses[p]["total"]["curve"] for p in ("phase1", "phase2")]
    fused = made[2:]
    assert len(fused) == 2 and all(g["fused"] for o in fused for g in o.param_groups)
    assert not any(g["fused"] for o in made[:2] for g in o.param_groups)
    default, opt_in = (torch.tensor(sum(runs[n], [])) for n in ("adamw", "adamw-fused"))
    torch.testing.assert_close(opt_in, default, rtol=0, atol=1e-4)


def test_a_parameter_without_a_gradient_counts_as_a_zero_gradient():
    """As the authors' script (gradients zeroed, not freed): decay and moments still move it."""
    weights = [torch.nn.Parameter(torch.full((3,), 2.0)), torch.nn.Parameter(torch.ones(2, 2))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    flat = FlatAdamW([{"params": weights, "lr": 0.1}], foreach=True, weight_decay=0.1)
    plain = torch.optim.AdamW([{"params": twins, "lr": 0.1}], foreach=True, weight_decay=0.1)
    for step in range(3):
        weights[0].grad = torch.full((3,), 0.5 * step)  # the second one never gets a gradient
        twins[0].grad, twins[1].grad = weights[0].grad.clone(), torch.zeros(2, 2)
        flat.step()
        plain.step()
    flat.release()
    assert all(torch.equal(a, b) for a, b in zip(weights, twins))
    assert not torch.equal(weights[1], torch.ones(2, 2))


def test_a_phase_stopped_by_an_error_gives_the_parameters_their_storage_back():
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    calls = []

    def step() -> LossTerms:
        calls.append(1)
        loss = sum((w**2).sum() for w in weights) * (float("nan") if len(calls) == 2 else 1.0)
        zero = loss.detach() * 0
        return LossTerms(total=loss, diffusion=loss, attention=zero, prior=zero)
    with pytest.raises(NonFiniteLossError):
        run_phase("phase 2 (full)", 5, PhaseSetup([{"params": weights, "lr": 0.1}], weights), step,
                  cfg=ExtractConfig(), device=CPU, progress=False, readback_every=1)
    assert all(own_storage(w) for w in weights)


def test_the_runtime_optimizer_is_checked_by_name():
    assert RuntimeConfig().optimizer == "adamw"
    with pytest.raises(BreakSceneError, match="optimizer"):
        validate_config(RuntimeConfig, {"optimizer": "adam8bit"}, "job file j.yaml")
