"""Loading the diffusion model: a built-in preset, a local diffusers folder, an fsspec URI
(copied once into a local cache) or a hub id, all through one function."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from breakscene.config import DEFAULT_MODEL
from breakscene.errors import DeviceError, ModelLoadError
from breakscene.models.folders import (SDXL_PARTS, SDXL_PIPELINES, check_parts, folder_family, local_parts,
                                      looks_like_path)
from breakscene.models.presets import PRESETS, SDXL_PRESETS, build_preset, build_sdxl_preset, preset_family
from breakscene.files.storage import atomic_local_dir, describe_error, filesystem, is_remote


def cache_root() -> Path:
    return Path(os.environ.get("BREAKSCENE_CACHE", Path.home() / ".cache" / "breakscene"))


@dataclass
class DiffusionModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    model_id: str  # preset name, folder, URI or hub id, as given
    revision: str | None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def is_preset(self) -> bool:
        return self.model_id in PRESETS

    family = "sd"

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder,)

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer,)

    def backbone(self):
        from breakscene.models.backbones import sd2_backbone

        return sd2_backbone(self)

    def to(self, device: torch.device) -> "DiffusionModels":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        """Write a standard diffusers folder (what ``from_pretrained`` reads back)."""
        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(str(path))


@dataclass
class SDXLModels:
    """A Stable Diffusion XL model's parts, named as ``StableDiffusionXLPipeline``'s arguments."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: Any  # CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: Any  # as the model ships it (SDXL base: EulerDiscreteScheduler)
    model_id: str
    revision: str | None
    family = "sdxl"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def is_preset(self) -> bool:
        return self.model_id in SDXL_PRESETS

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    def backbone(self):
        from breakscene.models.backbones import sdxl_backbone

        return sdxl_backbone(self)

    def to(self, device: torch.device) -> "SDXLModels":
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.to(device)
        return self

    def pipeline(self):
        from diffusers import StableDiffusionXLPipeline

        parts = {f: getattr(self, f) for f in SDXL_PARTS}
        return StableDiffusionXLPipeline(**parts, add_watermarker=False)  # no invisible-watermark dependency

    def save_pretrained(self, path: str | Path) -> None:
        """Write a standard diffusers SDXL folder (``StableDiffusionXLPipeline.from_pretrained``)."""
        self.pipeline().save_pretrained(str(path))


def sdxl_not_supported(model_id: str) -> ModelLoadError:
    return ModelLoadError(f"model {model_id!r} is Stable Diffusion XL: this loader reads Stable Diffusion "
                          f"1.x/2.x models and the presets {', '.join(PRESETS)} (load_any reads both)")


def _load_folder(folder: Path, model_id: str, revision: str | None) -> DiffusionModels:
    if folder_family(folder) == "sdxl":
        raise sdxl_not_supported(model_id)
    check_parts(model_id, "sd", local_parts(folder))
    return DiffusionModels(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        model_id=model_id, revision=revision,
    )


def _fetch_uri(uri: str) -> Path:
    """Copy a remote diffusers folder into the local cache once; later loads reuse it."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    target = cache_root() / "models" / key
    if target.is_dir():
        return target
    fs, root = filesystem(uri)  # with the storage timeouts: a silent server cannot hang the load
    try:
        is_folder = fs.isdir(root)
    except Exception as exc:  # noqa: BLE001 - no credentials, timeouts, refused: said as such
        raise ModelLoadError(f"model URI {uri!r} cannot be read: {describe_error(exc)[0]}") from None
    if not is_folder:
        raise ModelLoadError(f"model URI {uri!r} is not a folder that can be read")
    with atomic_local_dir(target) as tmp:
        fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
    return target


HUB_FILES = ("*.json", "*.txt", "*.safetensors", "*.model")  # configs, tokenizers, weights: no .bin duplicates


def hub_snapshot(model_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network errors, unknown repos, offline mode: all one message
        raise ModelLoadError(
            f"model {model_id!r} is not a preset ({', '.join(PRESETS)}), not a local folder, and could "
            f"not be fetched from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def _load_hub(model_id: str, revision: str | None) -> DiffusionModels:
    # the index first: an SDXL repository is named before gigabytes of its weights are fetched
    if folder_family(hub_snapshot(model_id, revision, ["model_index.json"])) == "sdxl":
        raise sdxl_not_supported(model_id)
    folder = hub_snapshot(model_id, revision, list(HUB_FILES))
    return _load_folder(folder, model_id, revision)


def load_models(model: str = DEFAULT_MODEL, revision: str | None = None) -> DiffusionModels:
    """Load UNet, VAE, text encoder, tokenizer and DDPM scheduler in fp32 on the CPU."""
    if model in SDXL_PRESETS:
        raise sdxl_not_supported(model)
    if model in PRESETS:
        unet, vae, text_encoder, tokenizer, scheduler = build_preset(model)
        for module in (unet, vae, text_encoder):
            module.eval()  # as from_pretrained leaves them: a preset runs like its exported folder
        return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler, model, None)
    if is_remote(model):
        return _load_folder(_fetch_uri(model), model, revision)
    local = Path(model.removeprefix("file://")).expanduser()
    if local.is_dir():
        return _load_folder(local, model, revision)
    if looks_like_path(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    return _load_hub(model, revision)


def model_folder(model: str, revision: str | None, hub_files: tuple[str, ...] = HUB_FILES) -> Path:
    """The local diffusers folder of a folder, URI (cached once) or hub id (``hub_files`` of it)."""
    if is_remote(model):
        return _fetch_uri(model)
    local = Path(model.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local
    if looks_like_path(model):
        raise ModelLoadError(f"model folder {model!r} does not exist")
    return hub_snapshot(model, revision, list(hub_files))


def model_family(model: str, revision: str | None = None) -> str:
    """"sd" (Stable Diffusion 1.x/2.x) or "sdxl", from a preset's name or a folder's
    model_index.json (a URI or hub id is fetched first, as a load would)."""
    return preset_family(model) or folder_family(model_folder(model, revision, ("model_index.json",)))


def load_sdxl_models(model: str, revision: str | None = None) -> SDXLModels:
    """An SDXL preset or folder (local, URI or hub id), fp32 on the CPU, in eval mode."""
    if model in SDXL_PRESETS:
        parts = build_sdxl_preset(model)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            parts[name].eval()
        return SDXLModels(**parts, model_id=model, revision=None)
    folder = model_folder(model, revision)
    if folder_family(folder) != "sdxl":
        raise ModelLoadError(f"model {model!r} is not Stable Diffusion XL (its model_index.json names no "
                             f"{' or '.join(SDXL_PIPELINES)})")
    check_parts(model, "sdxl", local_parts(folder))  # one error, not diffusers' about a missing file
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    models = SDXLModels(**{f: getattr(pipe, f) for f in SDXL_PARTS}, model_id=model, revision=revision)
    for encoder, tok in zip(models.text_encoders, models.tokenizers):
        # SDXL base's text_encoder_2 says eos_token_id 2 (legacy): transformers would then pool
        # at the largest id, which becomes an <assetN> token once tokens are added
        encoder.config.eos_token_id = tok.eos_token_id
        for module in encoder.modules():  # the pooling module reads its own copy
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = tok.eos_token_id
    return models


def load_any(model: str, revision: str | None = None) -> DiffusionModels | SDXLModels:
    """``load_models`` or ``load_sdxl_models``, by the model's family (``model_family``)."""
    if model in PRESETS:
        return load_models(model, revision)
    return load_sdxl_models(model, revision) if model_family(model, revision) == "sdxl" else load_models(model, revision)


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, checked against this machine; by default CUDA when present."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"device {requested!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {requested!r}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {requested!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {requested!r}: MPS is not available on this machine (use cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {requested!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device
