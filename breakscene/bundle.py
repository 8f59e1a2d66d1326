"""The concept bundle: the unit the pipeline stores, and how to load it back for generation.

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
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import BundleError
from .storage import exists, fetch_dir, join, read_bytes

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
