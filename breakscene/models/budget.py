"""Whether a run fits this machine, decided before any weights are loaded.

The base model is rebuilt from its configs alone on the ``meta`` device (no storage), and
``memory.predict_step_memory`` counts one training step of each phase on it; the peak is
compared with what the device has: free RAM for the CPU (within a container's limit), the
GPU's memory for CUDA. A setting that cannot fit (a resolution, a batch) is one error
instead of a process the kernel kills gigabytes later.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import psutil
import torch

from breakscene.config import ExtractConfig, RuntimeConfig
from breakscene.errors import BreakSceneError
from breakscene.models.memory import GIB, predict_step_memory
from breakscene.models.loading import DiffusionModels
from breakscene.models.presets import PRESETS, build_preset
from breakscene.files.storage import is_remote

log = logging.getLogger(__name__)
CGROUP = Path("/sys/fs/cgroup")
MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def meta_models(model: str, revision: str | None = None) -> DiffusionModels | None:
    """``model``'s modules on the meta device, built from its configs; None where the configs
    are not on this machine (a remote URI or hub id not fetched yet: its load reports problems)."""
    if model in PRESETS:
        with torch.device("meta"):
            unet, vae, text_encoder, tokenizer, scheduler = build_preset(model)
        return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler, model, revision)
    folder = local_model_folder(model, revision)
    if folder is None or not all((folder / sub).is_dir() for sub in MODEL_PARTS):
        return None
    try:
        return meta_from_folder(folder, model, revision)
    except Exception as exc:  # noqa: BLE001 - a broken config: the loader names it
        log.info("memory check skipped: %s cannot be rebuilt from its configs (%s)", model, exc)
        return None


def local_model_folder(model: str, revision: str | None) -> Path | None:
    """The diffusers folder ``model`` names: a local folder, or a hub id already in the cache."""
    if is_remote(model):
        return None
    local = Path(model.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.txt"],
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo id: the loader says which
        return None


def meta_from_folder(folder: Path, model: str, revision: str | None) -> DiffusionModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return DiffusionModels(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                           DDPMScheduler.from_pretrained(folder, subfolder="scheduler"), model, revision)


def available_bytes(device: torch.device) -> int | None:
    """What a run may use: free RAM on the CPU (a container's cgroup limit included), the
    GPU's memory on CUDA; None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    free = psutil.virtual_memory().available
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2, or no limit ("max")
        limit = int((CGROUP / "memory.max").read_text())
        free = min(free, limit - int((CGROUP / "memory.current").read_text()))
    return free


def resolution_multiple(models: DiffusionModels, attn_downsample: int) -> int:
    """The pixels a training resolution must be a multiple of: each UNet level halves the
    latent, and the attention maps divide it by ``attn_downsample``."""
    return models.vae_scale * max(2 ** (len(models.unet.down_blocks) - 1), attn_downsample)


def predicted_peak(models: DiffusionModels, cfg: ExtractConfig, resolution: int, device: torch.device,
                   runtime: RuntimeConfig) -> tuple[int, str]:
    """(bytes, phase) of the larger predicted step peak of the phases that run, with the
    checkpointing and precision the Extractor will use on ``device`` ("auto" turns it on
    on CUDA when needed, so a run is refused only if it cannot fit even then)."""
    cuda = device.type == "cuda"
    checkpointing = runtime.gradient_checkpointing == "on" or (cuda and runtime.gradient_checkpointing == "auto")
    mixed = cuda and cfg.mixed_precision != "no"
    phases = [p for p, steps in (("phase1", cfg.phase1_steps), ("phase2", cfg.phase2_steps)) if steps]
    return max((predict_step_memory(models, cfg, resolution, p, checkpointing, mixed).total, p) for p in phases)


def check_fits(model: str, revision: str | None, cfg: ExtractConfig, device: torch.device,
               runtime: RuntimeConfig) -> None:
    """BreakSceneError when the resolution does not suit ``model`` or a training step of
    ``cfg`` is predicted to need more memory than ``device`` has; nothing is loaded."""
    models = meta_models(model, revision)
    if models is None:
        log.info("memory check skipped: %s is not on this machine yet", model)
        return
    resolution = cfg.resolution or models.native_resolution
    multiple = resolution_multiple(models, cfg.attn_downsample)
    if resolution % multiple:
        raise BreakSceneError(f"resolution {resolution} must be a multiple of {multiple} for model {model!r}")
    have = available_bytes(device)
    if have is None:
        return
    headroom = runtime.memory_headroom if device.type == "cuda" else 1.0
    need, phase = predicted_peak(models, cfg, resolution, device, runtime)
    log.info("predicted training peak %.2f GiB (%s) of %.2f GiB usable on %s", need / GIB, phase,
             have * headroom / GIB, device)
    if need > have * headroom:
        raise BreakSceneError(
            f"a training step ({phase}, {resolution} px, batch {cfg.batch_size}) is predicted to need "
            f"{need / GIB:.1f} GiB, more than the {have * headroom / GIB:.1f} GiB of memory {device.type} has: "
            "lower --resolution or --batch-size, or use --phase2-mode lora or --gradient-checkpointing on")
