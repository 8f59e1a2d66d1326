import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from breakscene import bundle as bundle_io
from breakscene.errors import BreakSceneError, SceneError
from breakscene.generate import sample_grid
from breakscene.presets import build_preset
from breakscene.scene import load_scene_dir
from conftest import quick_config, write_scene


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
    ex = tiny_extractor
    before = ex._embedding.weight.detach().clone()
    captured = {}
    original = ex._setup_phase2

    def spy(cfg, n):  # look at the matrix between the phases
        captured["after_phase1"] = ex._embedding.weight.detach().clone()
        captured["scene_start"] = ex._scene_embeddings.clone()
        return original(cfg, n)

    ex._setup_phase2 = spy
    try:
        ex.extract(load_scene_dir(examples / "bear"), quick_config(grid_seeds=0, phase1_steps=6))
    finally:
        del ex._setup_phase2
    changed = (captured["after_phase1"] != captured["scene_start"]).any(dim=1).nonzero().flatten().tolist()
    assert changed == ex.token_ids[:3]
    assert torch.equal(ex._embedding.weight, before)  # reset after the scene


def test_batch_size_two_non_square_no_prior(tiny_extractor, tmp_path):
    scene = load_scene_dir(write_scene(tmp_path / "s", size=(120, 80),
                                       boxes=((25, 5, 60, 40), (60, 30, 95, 75), (40, 50, 70, 79))))
    result = tiny_extractor.extract(scene, quick_config(batch_size=2, prior={"enabled": False}, grid_seeds=0,
                                                        phase2_mode="lora"))
    assert result.losses["phase1"]["prior"]["mean"] == 0.0
    assert np.isfinite(result.final_loss)


def test_class_images_are_generated_once_and_reused(tiny_extractor, examples, isolated_cache, monkeypatch):
    from breakscene import prior

    cfg = quick_config(grid_seeds=0, prior={"num_class_images": 2, "generation_steps": 2,
                                            "class_prompt": "a photo in the snow"})
    scene = load_scene_dir(examples / "bear")
    tiny_extractor.extract(scene, cfg)
    folders = [p for p in (isolated_cache / "class_images").iterdir()
               if json.loads((p / "images.json").read_text())["prompt"] == "a photo in the snow"]
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    tiny_extractor._class_cache.clear()  # a new process would only have the disk cache
    monkeypatch.setattr(prior, "generate_images", lambda *a, **k: pytest.fail("regenerated"))
    tiny_extractor.extract(scene, cfg)


def test_class_data_dir_is_used(tiny_extractor, examples, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 80), (i * 100, 50, 50)).save(folder / f"{i}.png")
    cfg = quick_config(grid_seeds=0, prior={"class_data_dir": str(folder), "num_class_images": 5})
    tiny_extractor.extract(load_scene_dir(examples / "bear"), cfg)
    assert any(k[0] == str(folder) for k in tiny_extractor._class_cache)
    with pytest.raises(BreakSceneError, match="holds no .png"):
        tiny_extractor.extract(load_scene_dir(examples / "bear"),
                               quick_config(prior={"class_data_dir": str(tmp_path)}))


def test_failed_bundle_write_leaves_nothing(tiny_extractor, examples, tmp_path, monkeypatch):
    from breakscene import extractor as extractor_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(extractor_mod, "sample_grid", boom)
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
