"""Stable Diffusion XL (issue 19): the sdxl-tiny and sdxl-base-random presets, their export
as a diffusers SDXL folder that plain diffusers runs, recognising an SDXL model, the backbone
seam, Break-A-Scene on sdxl-tiny end to end (the bundle loaded by plain diffusers), and the
mechanism: which parameters train in each phase, and masks, latents and maps lining up."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from breakscene.errors import ModelLoadError
from breakscene.models.loading import folder_family, load_any, load_models, load_sdxl_models, model_family
from breakscene.models.presets import PRESETS, SDXL_PRESETS, build_preset, build_sdxl_preset
from commands.main import main
from conftest import write_scene

PROJECT = ("breakscene", "pipeline", "batchjob", "robustness", "commands", "benchmarks")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "sdxl-tiny"
    assert main(["export-base", "sdxl-tiny", str(out)]) == 0
    return out


def test_sdxl_tiny_has_sdxl_architecture():
    parts = build_sdxl_preset("sdxl-tiny")
    unet, te, te2 = parts["unet"].config, parts["text_encoder"].config, parts["text_encoder_2"].config
    assert unet.addition_embed_type == "text_time"
    # the UNet attends to both encoders' hidden states side by side
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size == 64
    # its added embedding: six time ids and the pooled bigG vector
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert list(unet.transformer_layers_per_block) == [1, 1, 2]
    assert type(parts["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert parts["scheduler"].config.timestep_spacing == "leading"
    # CLIP-L pads with its eos, OpenCLIP bigG with "!"; both pool at the tokenizer's eos id
    assert parts["tokenizer"].pad_token == "<|endoftext|>" and parts["tokenizer_2"].pad_token == "!"
    assert te.eos_token_id == te2.eos_token_id == parts["tokenizer"].eos_token_id
    # fixed seed: the same weights in every process
    again = build_sdxl_preset("sdxl-tiny")
    assert all(torch.equal(a, b) for a, b in zip(parts["unet"].state_dict().values(),
                                                  again["unet"].state_dict().values()))


def test_sdxl_base_random_has_sdxl_base_shapes_on_meta():
    with torch.device("meta"):
        parts = build_sdxl_preset("sdxl-base-random")
    count = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder",
                                                                       "text_encoder_2")}
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts
    assert count == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                     "text_encoder_2": 694_659_840}
    assert parts["unet"].config.cross_attention_dim == 2048 and parts["vae"].config.scaling_factor == 0.13025
    assert parts["unet"].config.projection_class_embeddings_input_dim == 2816


def test_sd_presets_are_unchanged():
    assert set(PRESETS) == {"tiny", "sd21-base-random"} and set(SDXL_PRESETS) == {"sdxl-tiny", "sdxl-base-random"}
    unet, _, te, tok, _ = build_preset("tiny")
    assert unet.config.cross_attention_dim == 32 and te.config.eos_token_id == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"


def test_export_base_sdxl_runs_in_plain_diffusers(sdxl_dir, tmp_path):
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    script = tmp_path / "run.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class NoProject(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {PROJECT!r}:\n"
        "            raise ImportError('imported ' + name)\n"
        "sys.meta_path.insert(0, NoProject())\n"
        "import numpy as np, torch\n"
        "from diffusers import StableDiffusionXLPipeline\n"
        f"pipe = StableDiffusionXLPipeline.from_pretrained({str(sdxl_dir)!r})\n"
        "assert type(pipe.scheduler).__name__ == 'EulerDiscreteScheduler'\n"
        "out = pipe('a photo of a cat', num_inference_steps=2, height=64, width=64,\n"
        "           generator=torch.Generator().manual_seed(0), output_type='np')\n"
        "img = out.images\n"
        "assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all(), img.shape\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_export_base_sdxl_prints_the_sdxl_loader_and_names_all_presets(tmp_path, capsys):
    assert main(["export-base", "sdxl-tiny", str(tmp_path / "x")]) == 0
    assert "StableDiffusionXLPipeline.from_pretrained" in json.loads(capsys.readouterr().out)["load"]
    assert main(["export-base", "huge", str(tmp_path / "h")]) == 2
    assert "presets are tiny, sd21-base-random, sdxl-tiny, sdxl-base-random" in capsys.readouterr().err


def test_sdxl_folder_is_recognised_and_loads_back(sdxl_dir, tmp_path):
    assert folder_family(sdxl_dir) == "sdxl" and model_family(str(sdxl_dir)) == "sdxl"
    assert model_family("sdxl-tiny") == "sdxl" and model_family("tiny") == "sd"
    assert model_family(f"file://{sdxl_dir}") == "sdxl"
    sd_dir = tmp_path / "sd"
    assert main(["export-base", "tiny", str(sd_dir)]) == 0
    assert model_family(str(sd_dir)) == "sd"
    models = load_sdxl_models(str(sdxl_dir))
    preset = load_sdxl_models("sdxl-tiny")
    assert torch.equal(models.unet.conv_in.weight, preset.unet.conv_in.weight)
    assert models.tokenizer_2.pad_token == "!" and not models.unet.training
    with pytest.raises(ModelLoadError, match="is not Stable Diffusion XL"):
        load_sdxl_models(str(sd_dir))


def test_sd_loader_refuses_sdxl_with_one_message(sdxl_dir):
    for model in ("sdxl-tiny", str(sdxl_dir)):
        with pytest.raises(ModelLoadError, match="is Stable Diffusion XL: this loader reads Stable Diffusion 1.x/2.x"):
            load_models(model)
        assert type(load_any(model)).__name__ == "SDXLModels"
    assert type(load_any("tiny")).__name__ == "DiffusionModels"


def test_sdxl_hub_repo_is_refused_before_its_weights_are_fetched(sdxl_dir, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=None: asked.append(allow_patterns) or sdxl_dir)
    with pytest.raises(ModelLoadError, match="'someone/sdxl' is Stable Diffusion XL"):
        load_models("someone/sdxl")
    assert asked == [["model_index.json"]]


# -- the backbone seam ---------------------------------------------------------------------

def test_sdxl_backbone_encodes_as_diffusers_does():
    from breakscene.models.backbones import sdxl_backbone

    models = load_sdxl_models("sdxl-tiny")
    backbone = sdxl_backbone(models)
    prompts = ["a photo of a cat", "a dog on the beach"]
    with torch.no_grad():
        hidden, added = backbone.encode_prompt(backbone.tokenize(prompts), 64)
        embeds, _, pooled, _ = models.pipeline().encode_prompt(prompts, do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    assert torch.equal(hidden, embeds) and torch.equal(added["text_embeds"], pooled)
    expected = models.pipeline()._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, 32)
    assert torch.equal(added["time_ids"], expected.repeat(2, 1))
    assert added["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    with torch.no_grad():  # what the UNet takes
        out = models.unet(torch.zeros(2, 4, 32, 32), 10, encoder_hidden_states=hidden, added_cond_kwargs=added)
    assert out.sample.shape == (2, 4, 32, 32)


def test_sdxl_backbone_new_tokens_get_a_row_in_both_encoders():
    from breakscene.models.backbones import sdxl_backbone

    backbone = sdxl_backbone(load_sdxl_models("sdxl-tiny"))
    base = len(backbone.tokenizers[0])
    rows = backbone.add_tokens(["<asset0>", "<asset1>"])
    assert rows == [[base, base + 1], [base, base + 1]]
    assert all(e.get_input_embeddings().num_embeddings >= base + 2 for e in backbone.text_encoders)
    ids = backbone.tokenize("a photo of <asset0>")
    assert all(int((i[0] == base).sum()) == 1 for i in ids)  # one token in each tokenizer
    # the pooled bigG vector is taken at the eos, not at the new (largest) id
    with torch.no_grad():
        _, added = backbone.encode_prompt(ids, 64)
        out = backbone.text_encoders[1](ids[1])
    eos = int((ids[1][0] == backbone.tokenizers[1].eos_token_id).nonzero()[0])
    proj = backbone.text_encoders[1].text_projection(out.last_hidden_state[:, eos])
    assert torch.allclose(added["text_embeds"], proj)


def test_sdxl_loss_layers_and_geometry():
    from breakscene.models.backbones import SDXLBackbone, sdxl_backbone

    tiny = sdxl_backbone(load_sdxl_models("sdxl-tiny"))
    layers = tiny.loss_layers(4)  # latent/4: down_blocks.2 (1 x 2 transformer layers), up_blocks.0 (2 x 2)
    assert len(layers) == 6 and {n.split(".")[0] + n.split(".")[1] for n in layers} == {"down_blocks2", "up_blocks0"}
    assert tiny.geometry().native_resolution == 64 and tiny.geometry().latent_size(64) == 32
    with torch.device("meta"):
        p = build_sdxl_preset("sdxl-base-random")
    base = SDXLBackbone(p["unet"], p["vae"], (p["text_encoder"], p["text_encoder_2"]),
                        (p["tokenizer"], p["tokenizer_2"]))
    # SDXL base: 32x32 at 1024 px; 2 x 10 layers down, 3 x 10 up (the mid block is left out, as published)
    assert len(base.loss_layers(4)) == 50 and len(base.loss_layers(2)) == 2 * 2 + 3 * 2
    with pytest.raises(ValueError):
        base.loss_layers(8)  # no cross-attention at latent/8: SDXL has three levels
    geo = base.geometry()
    assert (geo.vae_scale, geo.native_resolution, geo.scaling_factor) == (8, 1024, 0.13025)


def test_sd2_backbone_matches_the_training_encoding():
    from breakscene.models.backbones import sd2_backbone

    models = load_models("tiny")
    backbone = sd2_backbone(models)
    (ids,) = backbone.tokenize("a photo of a cat")
    with torch.no_grad():
        hidden, added = backbone.encode_prompt((ids,))
        assert torch.equal(hidden, models.text_encoder(ids)[0]) and added is None
    assert backbone.geometry().native_resolution == models.native_resolution == 64
    assert backbone.loss_layers(4) and backbone.family == "sd"


# -- Break-A-Scene on sdxl-tiny --------------------------------------------------------------

SNIPPET_BLOCK = (
    "import importlib.abc, sys\n"
    "class _NoProject(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {PROJECT!r}:\n"
    "            raise ImportError('the snippet imported ' + name)\n"
    "sys.meta_path.insert(0, _NoProject())\n")


def _pixels(img):
    import numpy as np

    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sdxl_bundles(tmp_path_factory):
    """`breakscene extract --model sdxl-tiny` on the toys scene: a `lora` and a `full` bundle,
    2 + 2 steps, a one-seed grid of 3 sampler steps."""
    root = tmp_path_factory.mktemp("sdxl-bundles")
    (root / "fast.yaml").write_text("grid_inference_steps: 3\n")
    out = {}
    for mode in ("lora", "full"):
        out[mode] = root / mode
        assert main(["extract", "--scene", TOYS, "--model", "sdxl-tiny", "--phase2-mode", mode, "--smoke",
                     "--resolution", "64", "--grid-seeds", "1", "--config", str(root / "fast.yaml"),
                     "--device", "cpu", "--out", str(out[mode])]) == 0
    return out


TOYS = "/work/shared/examples/toys"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_bundle_loads_in_plain_diffusers_and_gives_the_grid(sdxl_bundles, tmp_path, mode):
    """The model card's snippet (StableDiffusionXLPipeline from `export-base sdxl-tiny`, both
    encoders' embeddings, the LoRA or the full weights) in a process that cannot import the
    project reproduces the bundle's grid bit for bit."""
    from PIL import Image

    from breakscene.extraction.generate import grid_cell
    from breakscene.files.bundle import read_manifest

    bundle = sdxl_bundles[mode]
    info = read_manifest(str(bundle))
    assert info["model"]["family"] == "sdxl"
    if mode == "lora":
        assert sorted(p.name for p in bundle.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    else:
        assert {"unet", "text_encoder", "text_encoder_2"} <= set(info["files"])
        assert (bundle / "text_encoder_2" / "model.safetensors").is_file()
    from safetensors.torch import load_file

    rows = load_file(bundle / info["files"]["embeddings"][0])
    assert set(rows) == {"clip_l", "clip_g"} and rows["clip_l"].shape == rows["clip_g"].shape == (1, 32)
    assert main(["export-base", "sdxl-tiny", str(tmp_path / "sdxl-tiny-diffusers")]) == 0
    code = re.search(r"```python\n(.*?)```", (bundle / "README.md").read_text(), re.S).group(1)
    assert "StableDiffusionXLPipeline.from_pretrained" in code and "text_encoder=pipe.text_encoder_2" in code
    after = "\nfor i, im in enumerate(grid_images):\n    im.save(f'grid_{i}.png')\n"
    (tmp_path / "snippet.py").write_text(SNIPPET_BLOCK + code + after)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = Image.open(bundle / "grid.png")
    prompts = info["sampler"]["prompts"]
    assert len(prompts) == 4  # three toys alone, then together; one seed
    for i in range(len(prompts)):
        assert (_pixels(Image.open(tmp_path / f"grid_{i}.png")) == _pixels(grid_cell(grid, i, 0, 64))).all(), i


def test_sdxl_generate_reproduces_the_grid(sdxl_bundles, tmp_path, capsys):
    from PIL import Image

    from breakscene.extraction.generate import grid_cell
    from breakscene.files.bundle import read_manifest

    bundle = sdxl_bundles["lora"]
    prompt = read_manifest(str(bundle))["sampler"]["prompts"][0]
    assert main(["generate", "--bundle", str(bundle), "--prompt", prompt, "--device", "cpu",
                 "--out", str(tmp_path / "g.png")]) == 0
    capsys.readouterr()
    cell = grid_cell(Image.open(bundle / "grid.png"), 0, 0, 64)
    assert (_pixels(Image.open(tmp_path / "g.png")) == _pixels(cell)).all()


@pytest.fixture(scope="module")
def sdxl_extractor():
    from breakscene.extraction.extractor import Extractor

    return Extractor("sdxl-tiny", device="cpu", progress=False)


def _prepared(extractor, tmp_path, **overrides):
    from breakscene.scenes.scene import load_scene_dir
    from conftest import quick_config

    cfg = quick_config(prior={"enabled": False}, grid_seeds=0, **overrides)
    return extractor.prepare(load_scene_dir(write_scene(tmp_path / "scene")), cfg)


def _row_names(models) -> list[str]:
    """The names (as _one_step gives them) of both encoders' embedding matrices."""
    return [f"{k}.{n}" for k, e in (("te", models.text_encoder), ("te2", models.text_encoder_2))
            for n, p in e.named_parameters() if p is e.get_input_embeddings().weight]


def _one_step(extractor, prepared, phase):
    """One optimiser step of ``phase``: (parameters marked trainable by name, changed tensors by name)."""
    from breakscene.method.training import run_phase

    m = extractor.models
    named = {f"{k}.{n}": p for k, mod in (("unet", m.unet), ("te", m.text_encoder), ("te2", m.text_encoder_2))
             for n, p in mod.named_parameters()}
    setup = extractor.resident.phase_setup(phase, prepared.config,
                                           after_step=extractor.assets.keep_only_new_rows(prepared.num_concepts))
    named = {f"{k}.{n}": p for k, mod in (("unet", m.unet), ("te", m.text_encoder), ("te2", m.text_encoder_2))
             for n, p in mod.named_parameters()}  # again: LoRA adds layers
    before = {n: p.detach().clone() for n, p in named.items()}
    run_phase(phase, 1, setup, extractor.step_fn(prepared), cfg=prepared.config, device=extractor.device,
              progress=False)
    trainable = {n for n, p in named.items() if p.requires_grad}
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    return trainable, changed, named, before


def test_sdxl_phase1_trains_only_the_new_rows_of_both_encoders(sdxl_extractor, tmp_path):
    ex = sdxl_extractor
    prepared = _prepared(ex, tmp_path)
    n = prepared.num_concepts
    try:
        trainable, changed, named, before = _one_step(ex, prepared, "phase1")
        emb = _row_names(ex.models)
        assert trainable == set(emb) and changed == set(emb)
        for name, ids in zip(emb, ex.assets.ids_per_encoder):
            moved = (named[name].detach() != before[name]).any(dim=1).nonzero().flatten().tolist()
            assert moved == ids[:n], name  # the scene's new rows, in each encoder, and nothing else
    finally:
        ex.reset()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_phase2_trains_only_what_its_mode_allows(sdxl_extractor, tmp_path, mode):
    ex = sdxl_extractor
    prepared = _prepared(ex, tmp_path, phase2_mode=mode)
    try:
        trainable, changed, named, _ = _one_step(ex, prepared, "phase2")
        if mode == "full":
            assert trainable == set(named)  # every UNet and both encoders' weights
            assert {n.split(".")[0] for n in changed} == {"unet", "te", "te2"}
        else:
            rows = set(_row_names(ex.models))
            assert trainable == {n for n in named if "lora_" in n} | rows
            assert {n.split(".")[0] for n in trainable if "lora_" in n} == {"unet", "te", "te2"}
            assert changed <= trainable and any("lora_" in n for n in changed)
    finally:
        ex.reset()
    # reset: the base weights and no adapter left
    assert not any("lora_" in n for n, _ in ex.models.unet.named_parameters())
    assert not any("lora_" in n for n, _ in ex.models.text_encoder_2.named_parameters())


def test_sdxl_masks_latents_and_maps_line_up_off_the_native_size(sdxl_extractor, tmp_path):
    """A 96x64 picture trained at 96 px (sdxl-tiny's native size is 64): latents 48x48, the
    loss maps at latent/4 = 12x12, masks at both sizes, time ids for 96 px."""
    from breakscene.method.training import training_step

    ex = sdxl_extractor
    prepared = _prepared(ex, tmp_path, resolution=96, phase1_steps=1, phase2_steps=1)
    try:
        data = prepared.tensors
        assert data.latent_mean[0].shape[-2:] == (48, 48) and data.latent_size == (48, 48)
        assert data.attn_size == (12, 12)
        maps = ex.train(prepared).attention_maps()
        assert maps.shape == (prepared.num_concepts, 12, 12)
        ids, positions = ex.assets.encode_subset((0, 1))
        assert ids.shape == (1, 154)  # both tokenizers' ids side by side
        hidden, added = ex.resident.backbone.encode_ids(ids, (48, 32))
        assert hidden.shape == (1, 77, 64) and added["time_ids"][0].tolist() == [96, 64, 0, 0, 96, 64]
        # the captured maps have the loss size's queries, the masks that size too
        from breakscene.extraction.tensors import draw_batch
        import random

        batch = draw_batch(data, None, prepared.config, rng=random.Random(0), gen=torch.Generator().manual_seed(0),
                           encode_subset=ex.assets.encode_subset, num_train_timesteps=1000)
        with torch.no_grad():
            terms = training_step(ex.models.unet, ex.models.text_encoder, ex.models.scheduler, ex.store, batch,
                                  prepared.config, backbone=ex.resident.backbone)
        assert torch.isfinite(terms.total) and terms.attention > 0
        assert all(m.shape[-2:] == (12, 12) for m in batch.attn_masks) and batch.union_mask.shape[-2:] == (48, 48)
        assert {v.shape[1] for v in ex.store.maps.values()} == {144}
    finally:
        ex.reset()


def test_sdxl_attention_loss_on_planted_maps_equals_a_hand_computation(monkeypatch):
    """The real SDXL training step (both encoders, pooled embedding and time ids, a non-square
    latent) with the captured cross-attention planted at the capture point: the attention loss
    equals the paper's formula computed by hand in numpy."""
    import numpy as np
    from diffusers import DDPMScheduler

    from breakscene.config import ExtractConfig
    from breakscene.method import attention
    from breakscene.method.training import Batch, training_step
    from breakscene.models.backbones import sdxl_backbone

    models = load_sdxl_models("sdxl-tiny")
    backbone = sdxl_backbone(models)
    store = attention.AttentionStore()
    names = attention.install_capture(models.unet, store, 4)
    h, w = 4, 6  # a 16x24 latent read at latent/4
    rng = np.random.default_rng(0)
    planted = rng.random((77, h * w)).astype(np.float32)  # token -> its map over the 4x6 queries
    seen = []

    def keep(self, probs):
        assert probs.shape[2:] == (h * w, 77)  # queries of this latent, the 77 keys of both encoders side by side
        seen.append(self.name)
        self.store.maps[self.name] = torch.from_numpy(planted.T).expand(probs.shape[0], -1, -1)

    monkeypatch.setattr(attention.CaptureAttnProcessor, "keep", keep)
    ids = backbone.ids(["a photo of <x> and <y>", "a photo of <x>"])
    positions = [torch.tensor([4, 6]), torch.tensor([4])]
    masks = [torch.from_numpy(rng.random((2, h, w)) > 0.5).float(), torch.from_numpy(rng.random((1, h, w)) > 0.5).float()]
    g = torch.Generator().manual_seed(0)
    batch = Batch(latents=torch.randn(2, 4, 16, 24, generator=g), input_ids=ids, token_positions=positions,
                  attn_masks=masks, union_mask=torch.ones(2, 1, 16, 24), noise=torch.randn(2, 4, 16, 24, generator=g),
                  timesteps=torch.tensor([100, 700]))
    cfg = ExtractConfig(lambda_attn=1.0, prior={"enabled": False})
    with torch.no_grad():
        terms = training_step(models.unet, None, DDPMScheduler.from_config(models.scheduler.config), store, batch, cfg,
                              backbone=backbone)
    assert sorted(set(seen)) == sorted(names) and len(names) == 6
    per_example = []
    for pos, mask in zip(positions, masks):
        maps = planted[pos.numpy()].reshape(len(pos), h, w)
        normalised = maps / (maps.max(axis=(1, 2), keepdims=True) + cfg.attn_max_eps)
        per_example.append(((normalised - mask.numpy()) ** 2).mean(axis=(1, 2)).sum())
    assert terms.attention.item() == pytest.approx(np.mean(per_example), rel=1e-5)
