"""Bundles in a stock diffusers workflow: diffusers' own loaders on the bundle folder, the
model card's snippet run without the project, the recorded sampler, the one-call grid,
the image as trained on, and `generate`'s flags."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from breakscene.files import bundle as bundle_io
from breakscene.extraction.generate import generate_images, grid_cell, sample_grid
from breakscene.scenes.scene import load_scene_dir
from conftest import quick_config, write_scene
from commands.main import main

FAST = ["--phase1-steps", "2", "--phase2-steps", "2", "--num-class-images", "2", "--grid-seeds", "2"]
PROJECT = ("breakscene", "pipeline", "benchmarks")


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_extractor):
    """A `lora` bundle made by the library (with the training tensor captured) and a `full`
    bundle made by `breakscene extract` (with its printed summary)."""
    root = tmp_path_factory.mktemp("bundles")
    scene_dir = write_scene(root / "scene")  # 96x64: the centre crop is exercised
    lora = root / "lora"
    result = tiny_extractor.extract(
        load_scene_dir(scene_dir), quick_config(phase2_mode="lora", grid_seeds=2, grid_inference_steps=3),
        out=str(lora), evaluate=lambda trained: trained.tensors.pixels.clone())
    full = root / "full"
    (root / "fast.yaml").write_text("grid_inference_steps: 3\nprior: {generation_steps: 2}\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["extract", "--scene", str(scene_dir), "--model", "tiny", "--out", str(full),
                     "--phase2-mode", "full", "--config", str(root / "fast.yaml"), *FAST]) == 0
    return {"lora": lora, "full": full, "result": result, "printed": printed.getvalue(), "root": root}


def test_layout_loads_with_diffusers_own_loaders(bundles):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from breakscene.models.loading import load_models

    lora = bundles["lora"]
    info = bundle_io.read_manifest(str(lora))
    # the root's only .safetensors file is the LoRA: diffusers' loader takes the folder as is
    assert sorted(p.name for p in lora.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    assert (lora / "diagnostics" / "attention_maps.safetensors").is_file()
    m = load_models("tiny")
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    pipe.load_textual_inversion([str(lora / f) for f in info["files"]["embeddings"]])  # tokens from the files
    assert pipe.tokenizer.convert_tokens_to_ids(info["tokens"]) == list(range(len(m.tokenizer) - 2, len(m.tokenizer)))
    sched = DPMSolverMultistepScheduler.from_pretrained(str(lora), subfolder="scheduler")
    # the sampler is recorded: class, config, steps, guidance, size, the batch
    s = info["sampler"]
    assert (s["name"], s["class"], s["num_inference_steps"], s["guidance_scale"]) == \
        ("dpm++", "DPMSolverMultistepScheduler", 3, 7.5)
    assert s["config"]["algorithm_type"] == sched.config.algorithm_type == "dpmsolver++"
    assert s["config"]["beta_schedule"] == "scaled_linear" and (s["height"], s["width"]) == (64, 64)
    assert s["seeds"] == [0, 1] * 3 and s["prompts"][::2] == ["a photo of <asset0>", "a photo of <asset1>",
                                                               "a photo of <asset0> and <asset1>"]
    # a preset base is named with the way to make it; bundle.json stays strict JSON
    assert info["model"]["diffusers_base"] is None and "breakscene export-base tiny" in info["model"]["make_base"]
    json.loads((lora / "bundle.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    card = (lora / "README.md").read_text()
    assert "<asset0>" in card and "random-weight preset" in card and "breakscene export-base tiny" in card
    assert "| phase 1 steps | 4 | 400 |" in card and "DPMSolverMultistepScheduler" in card


def test_grid_is_one_batched_call_and_timed(bundles, tiny_extractor, monkeypatch):
    from diffusers import StableDiffusionPipeline

    result = bundles["result"]
    assert result.timings["grid"] > 0 and result.timings["bundle_write"] >= 0
    assert bundle_io.read_manifest(str(bundles["lora"]))["timings"]["grid"] == result.timings["grid"]
    calls = []
    original = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda self, *a, **k: calls.append(len(k["generator"])) or original(self, *a, **k))
    pipe = tiny_extractor.pipeline("dpm++")
    sample_grid(pipe, ["<asset0>", "<asset1>"], [0, 1], 2, 7.5, 64)
    assert calls == [6]  # 3 prompts x 2 seeds, one generator each
    # an image depends only on its seed: the same seed beside another one gives the same pixels
    a = generate_images(pipe, "a photo of <asset0>", [0, 1], 2, 7.5, 64)
    b = generate_images(pipe, "a photo of <asset0>", [7, 1], 2, 7.5, 64)
    assert np.array_equal(_pixels(a[1]), _pixels(b[1])) and not np.array_equal(_pixels(a[0]), _pixels(b[0]))


def test_image_png_is_the_training_tensor(bundles):
    lora = bundles["lora"]
    info = bundle_io.read_manifest(str(lora))
    assert info["files"]["image"] == "image.png"
    img = Image.open(lora / "image.png")
    assert img.mode == "RGB" and img.size == (64, 64)  # 96x64 cropped to 64x64, at 64 px
    decoded = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    trained = bundles["result"].evaluation  # the tensor the latents were encoded from
    assert torch.equal(decoded, trained)
    # beside its masks, on the same pixel grid: the first box (x 10..40) sits at x 0..24 after the crop
    mask0 = np.asarray(Image.open(lora / "masks" / "mask0.png")) > 127
    assert mask0.shape == (64, 64) and mask0[20, 5] and not mask0[20, 40]
    assert np.all(np.asarray(img)[mask0][:, 0] > 150)  # the red box lies under its mask


def _run_card_snippet(bundle, base_parent):
    """The card's python block, run by the venv's python in a temp folder with the project
    blocked from import; returns (card code, folder with the saved images)."""
    card = (bundle / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    work = base_parent
    blocker = (
        "import importlib.abc, sys\n"
        "class _NoProject(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {PROJECT!r}:\n"
        "            raise ImportError('the snippet imported ' + name)\n"
        "sys.meta_path.insert(0, _NoProject())\n")
    after = (
        f"\nassert not [m for m in sys.modules if m.split('.')[0] in {PROJECT!r}]\n"
        "for i, im in enumerate(grid_images):\n"
        "    im.save(f'grid_{i}.png')\n")
    (work / "snippet.py").write_text(blocker + code + after)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return code, work


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_model_card_snippet_reproduces_the_grid_without_the_project(bundles, tmp_path, mode):
    bundle = bundles[mode]
    # the card's base for a preset is "tiny-diffusers" (relative), made by export-base
    assert main(["export-base", "tiny", str(tmp_path / "tiny-diffusers")]) == 0
    code, work = _run_card_snippet(bundle, tmp_path)
    assert ("pipe.load_lora_weights(bundle)" in code) == (mode == "lora")
    info = bundle_io.read_manifest(str(bundle))
    example = Image.open(work / "example.png")
    assert example.size == (64, 64) and np.isfinite(_pixels(example)).all()
    grid = Image.open(bundle / "grid.png")
    seeds = info["sampler"]["seeds"]
    assert len(seeds) == 6
    for i, seed in enumerate(seeds):
        row, col = divmod(i, 2)
        assert seed == col
        # bit for bit: the same batch through plain diffusers equals the grid's cell
        assert np.array_equal(_pixels(Image.open(work / f"grid_{i}.png")), _pixels(grid_cell(grid, row, col, 64))), i


def test_export_base_refuses_a_foreign_folder_and_an_unknown_preset(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "base"
    assert main(["export-base", "tiny", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # diffusers loads it as is
    assert pipe.unet.config.block_out_channels == [32, 32, 64] and type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert main(["export-base", "tiny", str(out)]) == 2
    assert "already holds a diffusers folder" in capsys.readouterr().err
    assert main(["export-base", "tiny", str(out), "--force"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["export-base", "tiny", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
    assert main(["export-base", "huge", str(tmp_path / "h")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_extract_prints_where_its_time_went(bundles):
    line = next(l for l in bundles["printed"].splitlines() if l.startswith("seconds:"))
    parts = {label: float(sec) for label, sec in
             (part.rsplit(" ", 1) for part in line.split("(", 1)[1].rstrip(")").split(", "))}
    assert list(parts) == ["model load", "class images", "prepare", "phase 1", "phase 2", "diagnostic", "grid",
                           "bundle write", "other"]
    total = float(re.match(r"seconds: (\d+\.\d)", line).group(1))
    assert parts["grid"] > 0 and sum(parts.values()) == pytest.approx(total, abs=0.5)
    timings = bundle_io.read_manifest(str(bundles["full"]))["timings"]
    assert parts["grid"] == pytest.approx(timings["grid"], abs=0.051)


# -- generate's flags ------------------------------------------------------------------

def _generate(bundle, tmp_path, name, *flags, prompt="a photo of <asset0>"):
    out = tmp_path / f"{name}.png"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["generate", "--bundle", str(bundle), "--prompt", prompt, "--out", str(out), *flags])
    return code, (Image.open(out) if out.exists() else None), (json.loads(printed.getvalue()) if code == 0 else None)


def test_generate_defaults_to_the_grid_sampler_and_reproduces_its_cells(bundles, tmp_path):
    code, img, printed = _generate(bundles["lora"], tmp_path, "default", "--seed", "1")
    assert code == 0 and (printed["scheduler"], printed["steps"], printed["guidance_scale"]) == ("dpm++", 3, 7.5)
    cell = grid_cell(Image.open(bundles["lora"] / "grid.png"), 0, 1, 64)
    # alone instead of in the grid's batch of 6: equal up to float rounding (at most one level)
    assert np.abs(_pixels(img) - _pixels(cell)).max() <= 1


def test_generate_scheduler_flag(bundles, tmp_path):
    _, default, _ = _generate(bundles["lora"], tmp_path, "dpm")
    code, ddim, printed = _generate(bundles["lora"], tmp_path, "ddim", "--scheduler", "ddim")
    assert code == 0 and printed["scheduler"] == "ddim"
    assert not np.array_equal(_pixels(default), _pixels(ddim))
    pipe, _ = bundle_io.load_bundle_pipeline(str(bundles["lora"]), sampler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    (expected,) = generate_images(pipe, "a photo of <asset0>", [0], 3, 7.5, 64)
    assert np.array_equal(_pixels(ddim), _pixels(expected))
    with pytest.raises(SystemExit):
        main(["generate", "--bundle", str(bundles["lora"]), "--prompt", "x", "--out", "x.png", "--scheduler", "nope"])


def test_generate_negative_prompt_flag(bundles, tmp_path):
    _, plain, _ = _generate(bundles["lora"], tmp_path, "plain")
    code, neg, printed = _generate(bundles["lora"], tmp_path, "neg", "--negative-prompt", "a photo of <asset1>")
    assert code == 0 and printed["negative_prompt"] == "a photo of <asset1>"
    pipe, _ = bundle_io.load_bundle_pipeline(str(bundles["lora"]))
    (expected,) = generate_images(pipe, "a photo of <asset0>", [0], 3, 7.5, 64, negative_prompt="a photo of <asset1>")
    assert np.array_equal(_pixels(neg), _pixels(expected)) and not np.array_equal(_pixels(neg), _pixels(plain))


def test_generate_height_width_flags(bundles, tmp_path, capsys):
    code, img, printed = _generate(bundles["lora"], tmp_path, "wide", "--height", "32", "--width", "96")
    assert code == 0 and img.size == (96, 32) and (printed["height"], printed["width"]) == (32, 96)
    code, img, _ = _generate(bundles["lora"], tmp_path, "two", "--height", "32", "--width", "96", "--num-images", "2")
    assert code == 0 and img.size == (180 + 2 * 96, 32)
    code, img, _ = _generate(bundles["lora"], tmp_path, "bad", "--height", "30")
    assert code == 2 and img is None and "--height 30 must be a positive multiple of 8" in capsys.readouterr().err


def test_generate_lora_scale_flag(bundles, tmp_path, capsys):
    _, default, _ = _generate(bundles["lora"], tmp_path, "s-default")
    code, one, printed = _generate(bundles["lora"], tmp_path, "s1", "--lora-scale", "1")
    assert code == 0 and printed["lora_scale"] == 1.0 and np.array_equal(_pixels(one), _pixels(default))
    _, zero, _ = _generate(bundles["lora"], tmp_path, "s0", "--lora-scale", "0")
    # scale 0: exactly the base weights with the learned token rows
    pipe, _ = bundle_io.load_bundle_pipeline(str(bundles["lora"]))
    pipe.unload_lora_weights()
    (expected,) = generate_images(pipe, "a photo of <asset0>", [0], 3, 7.5, 64)
    assert np.array_equal(_pixels(zero), _pixels(expected)) and not np.array_equal(_pixels(zero), _pixels(one))
    code, img, _ = _generate(bundles["full"], tmp_path, "full", "--lora-scale", "0.5")
    assert code == 2 and img is None and "has no LoRA (phase 2 mode full)" in capsys.readouterr().err
