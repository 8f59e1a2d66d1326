"""Predicted accelerator memory of one training step, without an accelerator.

The UNet and every text encoder (SDXL: both) are rebuilt from their configs on the
``meta`` device (no storage, no arithmetic), one training step runs there through the
model family's backbone (``models.backbones``: SDXL's pooled embedding and time ids
included), and every tensor autograd saves for the backward pass is counted. Weights,
gradients and AdamW moments (fp32, or bitsandbytes' 8-bit) follow from the parameter
counts. The Extractor uses the prediction to decide whether gradient
checkpointing is needed on the device at hand; the ``memory`` benchmark prints it next
to the measured peak where a GPU is present.

It is an estimate: activations are counted in the autocast dtype throughout (autocast
keeps a few of them, softmax and norms, in fp32), allocator fragmentation and library
workspaces are not modelled, and the checkpointed recompute of one block is not added.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import psutil
import torch.nn.functional as F
from diffusers import DDPMScheduler

from breakscene.config import ExtractConfig, RuntimeConfig
from breakscene.errors import BreakSceneError
from breakscene.method.attention import AttentionStore, install_capture
from breakscene.method.phases import ENCODER_FOLDERS, phase2_mode, phase_setup, set_checkpointing
from breakscene.method.training import (
    ADAMW_8BIT_BLOCK,
    ADAMW_8BIT_MIN_SIZE,
    Batch,
    optimizer_problem,
    training_step,
)
from breakscene.models.loading import SDXL_PARTS, DiffusionModels, SDXLModels, folder_family
from breakscene.models.presets import PRESETS, SDXL_PRESETS, build_preset, build_sdxl_preset
from breakscene.files.storage import is_remote

GIB = 2**30
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held at the peak of one step (the start of the backward pass)."""

    weights: int  # every resident weight, in its stored dtype
    gradients: int  # one per trainable parameter
    optimizer: int  # AdamW's two moments per trainable parameter (``optimizer_state_bytes``)
    weight_casts: int  # the low-precision copies autocast makes of the weights
    activations: int  # tensors saved for the backward pass

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.weight_casts + self.activations

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GIB, 3)}


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def meta_copies(models):
    """Storage-free twins of the UNet and of every text encoder (same configs, same
    vocabulary sizes), and the family's backbone over them."""
    unet = models.unet
    with torch.device("meta"):
        meta_unet = type(unet).from_config(unet.config)
    encoders = tuple(_meta_encoder(e) for e in models.text_encoders)
    twin = replace(models, unet=meta_unet, **dict(zip(ENCODER_FOLDERS, encoders)))
    return meta_unet, encoders, twin.backbone()


def _meta_encoder(text_encoder):
    with torch.device("meta"):
        meta_text = type(text_encoder)(text_encoder.config)
    if meta_text.get_input_embeddings().num_embeddings != text_encoder.get_input_embeddings().num_embeddings:
        meta_text.resize_token_embeddings(text_encoder.get_input_embeddings().num_embeddings)
    return meta_text


def optimizer_state_bytes(params, optimizer: str = "adamw") -> int:
    """AdamW's two moments of ``params``: fp32, 8 bytes a parameter; with bitsandbytes'
    8-bit AdamW ("adamw-8bit") one byte each plus an fp32 scale per block of each moment,
    for tensors of at least ``ADAMW_8BIT_MIN_SIZE`` values (smaller ones keep fp32 moments)."""
    if optimizer != "adamw-8bit":
        return sum(8 * p.numel() for p in params)
    sizes = [p.numel() for p in params]
    return sum(8 * n if n < ADAMW_8BIT_MIN_SIZE else 2 * n + 8 * math.ceil(n / ADAMW_8BIT_BLOCK) for n in sizes)


def step_batch(models, cfg: ExtractConfig, resolution: int, dtype: torch.dtype, device: str = "meta") -> Batch:
    """A batch of the shapes one training step sees (values are zeros)."""
    latent = resolution // models.vae_scale
    attn = latent // cfg.attn_downsample
    # one row of every tokenizer's ids side by side, as ``Backbone.ids`` makes them
    b, length = cfg.batch_size, sum(tok.model_max_length for tok in models.tokenizers)
    channels = models.unet.config.in_channels

    def zeros(*shape, kind=dtype):
        return torch.zeros(*shape, device=device, dtype=kind)

    batch = Batch(latents=zeros(b, channels, latent, latent), input_ids=zeros(b, length, kind=torch.long),
                  token_positions=[torch.tensor([1, 3], device=device)] * b,
                  attn_masks=[zeros(2, attn, attn)] * b, union_mask=zeros(b, 1, latent, latent),
                  noise=zeros(b, channels, latent, latent), timesteps=zeros(b, kind=torch.long))
    if cfg.prior.enabled:
        batch.class_latents, batch.class_noise = zeros(b, channels, latent, latent), zeros(b, channels, latent, latent)
        batch.class_input_ids, batch.class_timesteps = zeros(b, length, kind=torch.long), zeros(b, kind=torch.long)
    return batch


def saved_activation_bytes(unet, text_encoder, scheduler, cfg: ExtractConfig, batch: Batch, backbone=None) -> int:
    """Bytes autograd saves for backward in one ``training_step`` (``text_encoder``: one or a
    tuple; ``backbone``: the family's encoding, as ``training_step`` takes it)."""
    encoders = text_encoder if isinstance(text_encoder, tuple) else (text_encoder,)
    params = {id(p) for m in (unet, *encoders) for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in params and id(tensor) not in params:  # weights are counted apart
            saved[id(base)] = base.numel() * base.element_size()
            kept.append(base)  # keep ids unique while counting
        return tensor

    kept: list[torch.Tensor] = []
    store = AttentionStore()
    install_capture(unet, store, cfg.attn_downsample)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _fused_attention_on_meta():
        training_step(unet, encoders[0], scheduler, store, batch, cfg, backbone=backbone)
    return sum(saved.values())


@contextlib.contextmanager
def _fused_attention_on_meta():
    """On ``meta`` SDPA falls back to its math path, which saves the whole attention
    matrix; accelerators (and the CPU) run a fused kernel that saves only q, k, v, the
    output and the log-sum-exp. Route meta calls to a fused op with that footprint."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def predict_step_memory(models, cfg: ExtractConfig, resolution: int, phase: str, checkpointing: bool,
                        mixed_precision: bool = True, optimizer: str = "adamw") -> MemoryEstimate:
    """Predicted peak bytes of one step of ``phase`` ("phase1" or "phase2") on an accelerator.

    ``models``: a ``DiffusionModels`` or an ``SDXLModels`` (real or on ``meta``).
    ``mixed_precision``: whether the step runs under autocast (CUDA with cfg.mixed_precision
    other than "no"); on the CPU the Extractor trains in fp32. ``optimizer``: a
    ``RuntimeConfig.optimizer`` ("adamw-8bit" keeps 8-bit moments)."""
    unet, encoders, backbone = meta_copies(models)
    cast = AUTOCAST_DTYPES.get(cfg.mixed_precision) if mixed_precision else None
    # the Extractor's own rule: the same parameters train, adapters are added the same way
    setup = phase_setup(phase, cfg, unet, encoders if len(encoders) > 1 else encoders[0])
    trainable_bytes = sum(p.numel() * 4 for p in setup.trainable)  # fp32 master weights
    adapters = sum(p.numel() * 4 for p in setup.adapters)
    resident = sum(_nbytes(m.parameters()) for m in (models.unet, *models.text_encoders, models.vae)) + adapters
    # autocast keeps a low-precision copy of each weight a matmul or convolution uses
    casts = sum(_nbytes(m.parameters()) for m in (unet, *encoders)) // 2 if cast else 0

    for module in (unet, *encoders):
        if cast is not None:
            module.to(cast)
        module.train()
    set_checkpointing(unet, encoders, checkpointing)
    batch = step_batch(models, cfg, resolution, cast or torch.float32)
    # a twin of the training scheduler (``ResidentModels`` trains with DDPM from the model's
    # config): add_noise moves its tables to the batch's device, here ``meta``
    scheduler = DDPMScheduler.from_config(models.scheduler.config)
    activations = saved_activation_bytes(unet, encoders, scheduler, cfg, batch, backbone)
    return MemoryEstimate(weights=resident, gradients=trainable_bytes,
                          optimizer=optimizer_state_bytes(setup.trainable, optimizer),
                          weight_casts=casts, activations=activations)


# --------------------------------------------------------------------------------------
# Whether a run fits this machine, decided before any weights are loaded.
#
# The base model is rebuilt from its configs alone on the ``meta`` device (no storage), and
# ``memory.predict_step_memory`` counts one training step of each phase on it; the peak is
# compared with what the device has: free RAM for the CPU (within a container's limit), the
# GPU's memory for CUDA. A setting that cannot fit (a resolution, a batch) is one error
# instead of a process the kernel kills gigabytes later.
log = logging.getLogger(__name__)
CGROUP = Path("/sys/fs/cgroup")
MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def meta_models(model: str, revision: str | None = None) -> DiffusionModels | SDXLModels | None:
    """``model``'s modules on the meta device, built from its configs; None where the configs
    are not on this machine (a remote URI or hub id not fetched yet: its load reports problems)."""
    if model in PRESETS:
        with torch.device("meta"):
            unet, vae, text_encoder, tokenizer, scheduler = build_preset(model)
        return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler, model, revision)
    if model in SDXL_PRESETS:
        with torch.device("meta"):
            return SDXLModels(**build_sdxl_preset(model), model_id=model, revision=revision)
    folder = local_model_folder(model, revision)
    parts = SDXL_PARTS if folder is not None and folder_family(folder) == "sdxl" else MODEL_PARTS
    if folder is None or not all((folder / sub).is_dir() for sub in parts):
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


def meta_from_folder(folder: Path, model: str, revision: str | None) -> DiffusionModels | SDXLModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = folder_family(folder) == "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    # the config is all a prediction reads: SDXL's ships Euler's, which DDPM reads as well
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler"))
    if not sdxl:
        return DiffusionModels(unet, vae, text_encoder, tokenizer, scheduler, model, revision)
    return SDXLModels(unet, vae, text_encoder, text_encoder_2, tokenizer,
                      CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"), scheduler, model, revision)


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


def resolution_multiple(models: DiffusionModels | SDXLModels, attn_downsample: int) -> int:
    """The pixels a training resolution must be a multiple of: each UNet level halves the
    latent, and the attention maps divide it by ``attn_downsample``."""
    return models.vae_scale * max(2 ** (len(models.unet.down_blocks) - 1), attn_downsample)


def predicted_peak(models: DiffusionModels | SDXLModels, cfg: ExtractConfig, resolution: int, device: torch.device,
                   runtime: RuntimeConfig) -> tuple[int, str]:
    """(bytes, phase) of the larger predicted step peak of the phases that run, with the
    checkpointing and precision the Extractor will use on ``device`` ("auto" turns it on
    on CUDA when needed, so a run is refused only if it cannot fit even then)."""
    cuda = device.type == "cuda"
    checkpointing = runtime.gradient_checkpointing == "on" or (cuda and runtime.gradient_checkpointing == "auto")
    mixed = cuda and cfg.mixed_precision != "no"
    phases = [p for p, steps in (("phase1", cfg.phase1_steps), ("phase2", cfg.phase2_steps)) if steps]
    return max((predict_step_memory(models, cfg, resolution, p, checkpointing, mixed, runtime.optimizer).total, p)
               for p in phases)


def levers(phase: str, cfg: ExtractConfig, device: torch.device, runtime: RuntimeConfig) -> str:
    """The settings that lower a step's peak and are not in use yet, as one phrase."""
    cuda = device.type == "cuda"
    found = ["lower --resolution or --batch-size"]
    lighter = phase2_mode(cfg).lighter
    if phase == "phase2" and lighter:
        found.append(f"--phase2-mode {lighter}")
    if runtime.gradient_checkpointing == "off" or (not cuda and runtime.gradient_checkpointing == "auto"):
        found.append("--gradient-checkpointing on")
    if cuda and runtime.optimizer != "adamw-8bit":
        found.append("8-bit AdamW (runtime.optimizer: adamw-8bit, with bitsandbytes)")
    return ", or ".join(found)


def check_fits(model: str, revision: str | None, cfg: ExtractConfig, device: torch.device,
               runtime: RuntimeConfig) -> None:
    """BreakSceneError when the resolution does not suit ``model`` or a training step of
    ``cfg`` is predicted to need more memory than ``device`` has, or ``runtime`` asks for an
    optimizer ``device`` cannot run; nothing is loaded."""
    problem = optimizer_problem(runtime.optimizer, device)
    if problem:
        raise BreakSceneError(problem)
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
            f"{levers(phase, cfg, device, runtime)}")
