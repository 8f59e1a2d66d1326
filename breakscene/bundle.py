"""The concept bundle: the unit the pipeline stores, and how to load it back for generation.

Layout (a local folder or any fsspec URI)::

    bundle.json                      tokens, model, config, losses, timings, diagnostics (written last)
    embeddings/asset{i}.safetensors  {"<asset{i}>": vector}: diffusers' textual-inversion format
    lora/pytorch_lora_weights.safetensors   phase-2 `lora` adapters (diffusers' LoRA format), or
    unet/, text_encoder/             phase-2 `full` weights (diffusers / transformers folders)
    masks/mask{i}.png                the masks as trained on (after crop and resize)
    attention_maps.safetensors       the diagnostic's per-token maps
    grid.png                         sample grid: each concept alone and all together
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
VERSION = 1


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
    if info.get("format") != FORMAT or info.get("version") != VERSION:
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


def load_bundle_pipeline(uri: str, device: str | None = None):
    """(pipeline with the bundle's tokens and weights, manifest), via diffusers' own loaders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .generate import make_pipeline
    from .models import load_models, pick_device

    info = read_manifest(uri)
    files = info["files"]
    models = load_models(info["model"]["id"], info["model"]["revision"])
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        local = fetch_dir(uri, Path(tmp))
        if files.get("unet"):
            models.unet = UNet2DConditionModel.from_pretrained(local / files["unet"])
            models.text_encoder = CLIPTextModel.from_pretrained(local / files["text_encoder"])
        pipe = make_pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer,
                             models.scheduler.config)
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
