"""The concept bundle: the unit the pipeline stores, how it is written from a trained scene,
and how to load it back for generation.

Layout (a local folder or any fsspec URI), shaped for diffusers' own loaders::

    bundle.json                      tokens, model, config, sampler, losses, timings, diagnostics (written last)
    README.md                        model card: tokens, base, settings, a plain-diffusers snippet
    embeddings/asset{i}.safetensors  {"<asset{i}>": vector}: diffusers' textual-inversion format
    pytorch_lora_weights.safetensors phase-2 `lora` adapters: ``pipe.load_lora_weights(bundle)``, or
    unet/, text_encoder/             phase-2 `full` weights (diffusers / transformers folders)
    scheduler/                       the grid's sampler (``<Scheduler>.from_pretrained(bundle, subfolder=...)``)
    image.png, masks/mask{i}.png     the image and masks exactly as trained on (after orientation, crop, resize)
    diagnostics/attention_maps.safetensors   the diagnostic's per-token maps
    grid.png                         sample grid: each concept alone and all together

The root holds no other ``.safetensors`` file than the LoRA's: diffusers' LoRA loader
picks a folder's root ``.safetensors`` file.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .errors import BundleError
from .storage import exists, fetch_dir, join, publish_dir, read_bytes

if TYPE_CHECKING:
    from .extraction import ExtractionResult, TrainedScene

MARKER = "bundle.json"
FORMAT = "breakscene-bundle"
VERSION = 2  # 2: LoRA at the root, diagnostics/, scheduler/, image.png, README.md, sampler
READABLE = (1, 2)


def manifest(**fields) -> dict:
    from . import __version__

    return {"format": FORMAT, "version": VERSION, "library_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields}


def is_complete(uri: str) -> bool:
    return exists(join(uri, MARKER))


def read_manifest(uri: str) -> dict:
    if not is_complete(uri):
        raise BundleError(f"{uri} is not a complete bundle (no {MARKER})")
    info = json.loads(read_bytes(join(uri, MARKER)))
    if info.get("format") != FORMAT or info.get("version") not in READABLE:
        raise BundleError(f"{uri}: unsupported bundle format {info.get('format')!r} v{info.get('version')}")
    return info


def save_text_encoder(text_encoder, vocab_rows: int, folder: Path) -> None:
    """Save a fine-tuned text encoder at the base vocabulary size: the asset rows live in the
    textual-inversion files, so the folder loads like any CLIP text encoder."""
    folder.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()}
    emb = text_encoder.get_input_embeddings().weight
    key = next(name for name, p in text_encoder.named_parameters() if p is emb)
    state[key] = state[key][:vocab_rows].contiguous()
    config = text_encoder.config.__class__.from_dict(text_encoder.config.to_dict())
    config.vocab_size = vocab_rows
    config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def write_bundle(out: str, trained: TrainedScene, result: ExtractionResult) -> None:
    """Write ``trained``'s bundle to ``out``: built in a temporary folder, then published with
    ``bundle.json`` last, so a failure leaves nothing. Sets ``result``'s URIs and grid timing."""
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict = {"embeddings": [], "masks": []}
        _write_weights(tmp, trained, result.tokens, files)
        _write_inputs(tmp, trained.prepared.inputs, files)
        # Diagnostics in their own folder: diffusers' LoRA loader reads the root's .safetensors.
        (tmp / "diagnostics").mkdir()
        files["attention_maps"] = "diagnostics/attention_maps.safetensors"
        save_file({"maps": torch.from_numpy(result.attention_maps).contiguous()}, tmp / files["attention_maps"])
        sampler = _write_samples(tmp, trained, result, files)
        info = _bundle_manifest(trained, result, files, sampler)
        files["card"] = "README.md"
        _write_card(tmp, info, out)
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        publish_dir(tmp, out, MARKER)
    result.bundle_uri = out
    result.grid_uri = join(out, "grid.png") if "grid" in files else None


def _write_weights(tmp: Path, trained: TrainedScene, tokens: list[str], files: dict) -> None:
    """One diffusers textual-inversion file per token; the phase-2 weights (LoRA at the root,
    where ``pipe.load_lora_weights(bundle)`` looks, or whole unet/ and text_encoder/)."""
    from .lora import lora_state_dicts

    (tmp / "embeddings").mkdir()
    assets, m, cfg = trained.assets, trained.models, trained.config
    weight = assets.embedding.weight.detach()
    for i, token in enumerate(tokens):
        rel = f"embeddings/asset{i}.safetensors"
        save_file({token: weight[assets.ids[i]].float().cpu().contiguous()}, tmp / rel)
        files["embeddings"].append(rel)
    if cfg.phase2_mode == "lora":
        unet_sd, te_sd, meta = lora_state_dicts(m.unet, m.text_encoder if cfg.lora.text_encoder else None)
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                                  **meta)
        files["lora"] = "pytorch_lora_weights.safetensors"
        if not (tmp / files["lora"]).is_file():
            raise RuntimeError(f"diffusers wrote no {files['lora']}")
    else:
        m.unet.save_pretrained(tmp / "unet")
        save_text_encoder(m.text_encoder, assets.base_embedding_rows, tmp / "text_encoder")
        files["unet"], files["text_encoder"] = "unet", "text_encoder"


def _write_inputs(tmp: Path, inputs, files: dict) -> None:
    """The image and masks exactly as trained on (after orientation, crop and resize): the
    pixels are uint8 / 127.5 - 1, so the PNG holds them without loss."""
    import numpy as np
    from PIL import Image

    from .scene import rgb_values

    image = rgb_values(inputs.pixels).to(torch.uint8)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / "image.png")
    files["image"] = "image.png"
    (tmp / "masks").mkdir()
    for i, mask in enumerate(inputs.masks):
        rel = f"masks/mask{i}.png"
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp / rel)
        files["masks"].append(rel)


def _write_samples(tmp: Path, trained: TrainedScene, result: ExtractionResult, files: dict) -> dict:
    """The sample grid in one batched call (timed on its own), and its sampler, saved for
    diffusers' loaders; returns the sampler record for the manifest."""
    from . import generate

    cfg, resolution = trained.config, trained.prepared.resolution
    pipe = trained.pipeline(cfg.grid_scheduler)
    seeds = list(range(cfg.grid_seeds))
    prompts, batch_seeds = generate.grid_batch(result.tokens, seeds) if seeds else ([], [])
    if seeds:
        clock = time.perf_counter()
        with generate.fused_attention(trained.models.unet), trained.resident.loaded_layout():
            grid = generate.sample_grid(pipe, result.tokens, seeds, cfg.grid_inference_steps, cfg.guidance_scale,
                                        resolution)
        result.timings["grid"] = round(time.perf_counter() - clock, 3)
        grid.save(tmp / "grid.png")
        files["grid"] = "grid.png"
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    files["scheduler"] = "scheduler"
    return generate.sampler_record(pipe, steps=cfg.grid_inference_steps, guidance_scale=cfg.guidance_scale,
                                   height=resolution, width=resolution, seeds=batch_seeds, prompts=prompts)


def _bundle_manifest(trained: TrainedScene, result: ExtractionResult, files: dict, sampler: dict) -> dict:
    m, scene, cfg = trained.models, trained.prepared.scene, trained.config
    return manifest(
        tokens=result.tokens, phase2_mode=cfg.phase2_mode, resolution=trained.prepared.resolution,
        model={"id": m.model_id, "revision": m.revision, "preset": m.is_preset,
               **base_reference(m.model_id, m.revision, m.is_preset)},
        sampler=sampler, config=cfg.model_dump(mode="json"), losses=result.losses, timings=result.timings,
        runtime=result.runtime,
        image={"name": scene.image_name, "sha256": scene.image_hash, "width": scene.image.width,
               "height": scene.image.height},
        concepts=[{**c, "mask": files["masks"][c["index"]]} for c in result.concepts],
        files=files, warnings=scene.warnings,
    )


def _write_card(tmp: Path, info: dict, out: str) -> None:
    from . import modelcard

    bundle_path, base, base_comment = card_paths(info, out)
    (tmp / "README.md").write_text(modelcard.render(info, bundle_path=bundle_path, base=base,
                                                    base_comment=base_comment))


def base_reference(model_id: str, revision: str | None, preset: bool) -> dict:
    """What diffusers can load as this bundle's base, or how to make it (for bundle.json)."""
    from .storage import is_remote

    if preset:
        return {"diffusers_base": None, "hub": False,
                "make_base": f"a random-weight preset: `breakscene export-base {model_id} DIR` writes it as a "
                             "diffusers folder for StableDiffusionPipeline.from_pretrained(DIR)"}
    if is_remote(model_id):
        return {"diffusers_base": None, "hub": False,
                "make_base": f"copy the diffusers folder {model_id} to a local folder and load that"}
    local = Path(model_id.removeprefix("file://")).expanduser()
    if local.is_dir():
        return {"diffusers_base": str(local.resolve()), "hub": False}
    return {"diffusers_base": model_id, "hub": True}


def card_paths(info: dict, uri: str) -> tuple[str, str, str]:
    """(bundle path, base, comment on the base) for the model card's snippet."""
    from .storage import is_remote

    model = info["model"]
    bundle_path = "path/to/a/local/copy/of/this/bundle" if is_remote(uri) else \
        str(Path(uri.removeprefix("file://")).expanduser().resolve())
    if model.get("diffusers_base"):
        return bundle_path, model["diffusers_base"], "the base model" + (" on the Hugging Face Hub" if model.get("hub") else "")
    if model.get("preset"):
        folder = f"{model['id']}-diffusers"
        return bundle_path, folder, f"made by: breakscene export-base {model['id']} {folder}"
    return bundle_path, "path/to/a/local/copy/of/the/base", f"a local copy of {model['id']}"


def load_bundle_pipeline(uri: str, device: str | None = None, sampler: str | None = None):
    """(pipeline with the bundle's tokens, weights and sampler, manifest), via diffusers' own
    loaders. ``sampler`` (a schedulers.SCHEDULERS name) replaces the bundle's recorded one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .generate import make_pipeline
    from .models import load_models, pick_device
    from .schedulers import SCHEDULERS, make_scheduler

    info = read_manifest(uri)
    files = info["files"]
    models = load_models(info["model"]["id"], info["model"]["revision"])
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        local = fetch_dir(uri, Path(tmp))
        if files.get("unet"):
            models.unet = UNet2DConditionModel.from_pretrained(local / files["unet"])
            models.text_encoder = CLIPTextModel.from_pretrained(local / files["text_encoder"])
        pipe = make_pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer,
                             models.scheduler.config)  # version 1 bundles sampled with DDIM
        recorded = info.get("sampler")
        if recorded and files.get("scheduler"):
            if recorded.get("name") not in SCHEDULERS:
                raise BundleError(f"{uri}: sampler {recorded.get('name')!r} is not one of {', '.join(SCHEDULERS)}")
            import diffusers

            cls = getattr(diffusers, SCHEDULERS[recorded["name"]])
            pipe.scheduler = cls.from_pretrained(local / files["scheduler"])
        if sampler and sampler != (recorded or {}).get("name", "ddim"):
            pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
        pipe.to(pick_device(device))
        if files.get("lora"):
            pipe.load_lora_weights(str(local / files["lora"]))
        pipe.load_textual_inversion([str(local / f) for f in files["embeddings"]], token=info["tokens"])
    return pipe, info


def load_embeddings(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    info = read_manifest(uri)
    out = {}
    for rel in info["files"]["embeddings"]:
        out.update(load(read_bytes(join(uri, rel))))
    return out
