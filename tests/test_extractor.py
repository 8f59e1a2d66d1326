import json
import os

import numpy as np
import pytest
import torch
from conftest import quick_config, write_scene
from PIL import Image

from breakscene.files import bundle as bundle_io
from breakscene.errors import BreakSceneError, SceneError
from breakscene.extraction.generate import sample_grid
from breakscene.models.presets import build_preset
from breakscene.scenes.scene import load_scene_dir


def _regenerated_grid(uri):
    pipe, info = bundle_io.load_bundle_pipeline(uri)
    c = info["config"]
    return info, sample_grid(pipe, info["tokens"], list(range(c["grid_seeds"])), c["grid_inference_steps"],
                             c["guidance_scale"], info["resolution"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bundle_round_trip_generates_the_same_image(tiny_extractor, examples, tmp_path, mode):
    scene = load_scene_dir(examples / "toys")
    out = str(tmp_path / "bundle")
    result = tiny_extractor.extract(scene, quick_config(phase2_mode=mode), out=out, init_words=["toy"])
    info = bundle_io.read_manifest(out)
    assert info["tokens"] == ["<asset0>", "<asset1>", "<asset2>"]
    assert info["phase2_mode"] == mode and info["model"]["id"] == "tiny"
    assert info["image"]["sha256"] == scene.image_hash
    assert info["config"]["phase1_lr"] == 5e-4 and info["config"]["lambda_attn"] == 0.01
    assert info["losses"]["phase1"]["steps"] == 4 and len(info["losses"]["phase2"]["total"]["curve"]) == 4
    assert [c["init_word"] for c in info["concepts"]] == ["toy", None, None]
    for c in info["concepts"]:
        assert 0 <= c["attention_iou"] <= 1 and 0 <= c["assigned_mask"] < 3 and len(c["ious"]) == 3
    assert set(info["timings"]) >= {"phase1", "phase2", "diagnostic", "prepare", "class_images", "grid"}
    assert set(result.timings) >= set(info["timings"]) | {"bundle_write"}
    assert os.path.isfile(f"{out}/pytorch_lora_weights.safetensors") == (mode == "lora")
    assert os.path.isdir(f"{out}/unet") == (mode == "full")
    assert len(list((tmp_path / "bundle" / "masks").glob("mask*.png"))) == 3
    # the learned rows come back from the textual-inversion files
    emb = bundle_io.load_embeddings(out)
    assert set(emb) == set(info["tokens"]) and emb["<asset0>"].shape == (32,)
    # the grid written during extraction (in-memory weights) equals one made after reload
    _, regenerated = _regenerated_grid(out)
    saved = np.asarray(Image.open(f"{out}/grid.png"))
    assert np.array_equal(np.asarray(regenerated), saved)
    assert result.grid_uri == f"{out}/grid.png"


def test_each_scene_starts_from_pristine_weights(tiny_extractor, examples):
    fresh_unet, _, fresh_te, _, _ = build_preset("tiny")
    scene = load_scene_dir(examples / "bear")
    cfg = quick_config(grid_seeds=0)
    first = tiny_extractor.extract(scene, cfg)
    tiny_extractor.extract(scene, quick_config(grid_seeds=0, phase2_mode="lora", seed=5))
    again = tiny_extractor.extract(scene, cfg)
    # same seed, same scene, after other scenes ran: identical curves
    assert first.losses["phase2"]["total"]["curve"] == again.losses["phase2"]["total"]["curve"]
    unet_state = tiny_extractor.models.unet.state_dict()
    assert all(torch.equal(unet_state[k].cpu(), v) for k, v in fresh_unet.state_dict().items())
    te_state = tiny_extractor.models.text_encoder.state_dict()
    for k, v in fresh_te.state_dict().items():
        if v.shape == te_state[k].shape:
            assert torch.equal(te_state[k].cpu(), v), k
    assert not any("lora" in n for n, _ in tiny_extractor.models.unet.named_parameters())


def test_phase1_trains_only_the_new_rows(tiny_extractor, examples):
    """Through the stages: after a phase 1 alone only the scene's new rows moved, and
    ``reset`` puts the whole matrix back."""
    ex = tiny_extractor
    before = ex.assets.embedding.weight.detach().clone()
    try:
        prepared = ex.prepare(load_scene_dir(examples / "bear"), quick_config(grid_seeds=0, phase1_steps=6,
                                                                              phase2_steps=0))
        scene_start = ex.assets.embedding.weight.detach().clone()
        trained = ex.train(prepared)
        after = ex.assets.embedding.weight.detach().clone()
    finally:
        ex.reset()
    assert trained.phases["phase1"].steps == 6 and trained.phases["phase2"].steps == 0
    changed = (after != scene_start).any(dim=1).nonzero().flatten().tolist()
    assert changed == ex.assets.ids[:3]
    assert torch.equal(ex.assets.embedding.weight, before)  # reset after the scene


def _curves(losses: dict) -> dict:
    return {phase: {k: v for k, v in summary.items() if k != "seconds"} for phase, summary in losses.items()}


def test_stages_give_what_extract_gives(tiny_extractor, examples, tmp_path):
    """prepare, train, diagnose, export by hand: the same losses, maps and bundle as extract."""
    ex, scene = tiny_extractor, load_scene_dir(examples / "bear")
    cfg = quick_config(grid_seeds=0, phase2_mode="lora")
    whole = ex.extract(scene, cfg)
    try:
        trained = ex.train(ex.prepare(scene, cfg))
        assert trained.tokens == ["<asset0>", "<asset1>", "<asset2>"] and trained.num_concepts == 3
        result = ex.diagnose(trained)
        ex.export(trained, result, str(tmp_path / "bundle"))
    finally:
        ex.reset()
    assert _curves(result.losses) == _curves(whole.losses)
    assert np.array_equal(result.attention_maps, whole.attention_maps)
    assert _curves(bundle_io.read_manifest(str(tmp_path / "bundle"))["losses"]) == _curves(whole.losses)
    assert result.bundle_uri == str(tmp_path / "bundle") and result.grid_uri is None
    assert not any("lora" in n for n, _ in ex.models.unet.named_parameters())


def test_evaluate_receives_the_trained_scene(tiny_extractor, examples):
    seen = {}

    def evaluate(trained):
        seen["maps"] = trained.attention_maps().numpy()
        seen["lora"] = any("lora" in n for n, _ in trained.models.unet.named_parameters())
        return {"n": trained.num_concepts, "mode": trained.config.phase2_mode}

    result = tiny_extractor.extract(load_scene_dir(examples / "bear"),
                                    quick_config(grid_seeds=0, phase2_mode="lora"), evaluate=evaluate)
    assert result.evaluation == {"n": 3, "mode": "lora"} and seen["lora"]  # before the reset
    assert np.array_equal(seen["maps"], result.attention_maps)  # the diagnostic's own maps
    assert result.timings["evaluate"] >= 0


def test_batch_size_two_non_square_no_prior(tiny_extractor, tmp_path):
    scene = load_scene_dir(write_scene(tmp_path / "s", size=(120, 80),
                                       boxes=((25, 5, 60, 40), (60, 30, 95, 75), (40, 50, 70, 79))))
    result = tiny_extractor.extract(scene, quick_config(batch_size=2, prior={"enabled": False}, grid_seeds=0,
                                                        phase2_mode="lora"))
    assert result.losses["phase1"]["prior"]["mean"] == 0.0
    assert np.isfinite(result.final_loss)


def test_class_images_are_generated_once_and_reused(tiny_extractor, examples, isolated_cache, monkeypatch):
    from breakscene.method import prior

    cfg = quick_config(grid_seeds=0, prior={"num_class_images": 2, "generation_steps": 2,
                                            "class_prompt": "a photo in the snow"})
    scene = load_scene_dir(examples / "bear")
    tiny_extractor.extract(scene, cfg)
    folders = [p for p in (isolated_cache / "class_images").iterdir()
               if json.loads((p / "images.json").read_text())["prompt"] == "a photo in the snow"]
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    tiny_extractor.class_cache.clear()  # a new process would only have the disk cache
    monkeypatch.setattr(prior, "generate_images", lambda *a, **k: pytest.fail("regenerated"))
    tiny_extractor.extract(scene, cfg)


def test_class_data_dir_is_used(tiny_extractor, examples, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 80), (i * 100, 50, 50)).save(folder / f"{i}.png")
    cfg = quick_config(grid_seeds=0, prior={"class_data_dir": str(folder), "num_class_images": 5})
    tiny_extractor.extract(load_scene_dir(examples / "bear"), cfg)
    assert any(k[0] == str(folder) for k in tiny_extractor.class_cache)
    with pytest.raises(BreakSceneError, match="holds no .png"):
        tiny_extractor.extract(load_scene_dir(examples / "bear"),
                               quick_config(prior={"class_data_dir": str(tmp_path)}))


def test_failed_bundle_write_leaves_nothing(tiny_extractor, examples, tmp_path, monkeypatch):
    from breakscene.extraction import generate

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(generate, "sample_grid", boom)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_extractor.extract(load_scene_dir(examples / "bear"), quick_config(), out=str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_too_many_masks_and_bad_resolution(tiny_extractor, examples):
    scene = load_scene_dir(examples / "bear")
    with pytest.raises(SceneError, match="more than max_concepts=2"):
        tiny_extractor.extract(scene, quick_config(max_concepts=2))
    with pytest.raises(BreakSceneError, match="resolution 70 must be a multiple of 8"):
        tiny_extractor.extract(scene, quick_config(resolution=70))


def test_study_evaluator_reads_the_trained_scene(tiny_extractor, examples):
    """The study's Evaluator through the hook: with the training masks as the clean masks
    its attention IoU is the diagnostic's, and every measurement is a number."""
    from robustness.embedders import build_embedder
    from robustness.evaluation import EvalConfig, Evaluator

    scene = load_scene_dir(examples / "bear")
    tiny = build_embedder("tiny")
    evaluator = Evaluator(scene.masks, ["bear"], EvalConfig(templates=1, seeds=1, steps=2), tiny, tiny)
    result = tiny_extractor.extract(scene, quick_config(grid_seeds=0, phase2_mode="lora"), evaluate=evaluator)
    measured = result.evaluation["concepts"]
    assert len(measured) == 3
    for k, (ours, diag) in enumerate(zip(measured, result.concepts)):
        assert ours["attention_iou"] == pytest.approx(diag["attention_iou"], abs=1e-6)
        assert ours["assigned_correct"] == (diag["assigned_mask"] == k)
        assert set(ours) >= {"recon_in", "recon_out", "identity_sim", "prompt_sim", "attention_leak"}
        assert all(np.isfinite(ours[key]) for key in ("recon_in", "recon_out", "identity_sim", "prompt_sim"))
