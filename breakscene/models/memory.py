"""Predicted accelerator memory of one training step, without an accelerator.

The UNet and text encoder are rebuilt from their configs on the ``meta`` device (no
storage, no arithmetic), one training step runs there, and every tensor autograd saves
for the backward pass is counted. Weights, gradients and AdamW moments follow from the
parameter counts. The Extractor uses the prediction to decide whether gradient
checkpointing is needed on the device at hand; the ``memory`` benchmark prints it next
to the measured peak where a GPU is present.

It is an estimate: activations are counted in the autocast dtype throughout (autocast
keeps a few of them, softmax and norms, in fp32), allocator fragmentation and library
workspaces are not modelled, and the checkpointed recompute of one block is not added.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from breakscene.method.attention import AttentionStore, install_capture
from breakscene.config import ExtractConfig
from breakscene.method.phases import phase_setup, set_checkpointing
from breakscene.method.training import Batch, training_step

GIB = 2**30
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held at the peak of one step (the start of the backward pass)."""

    weights: int  # every resident weight, in its stored dtype
    gradients: int  # one per trainable parameter
    optimizer: int  # AdamW: two fp32 moments per trainable parameter
    weight_casts: int  # the low-precision copies autocast makes of the weights
    activations: int  # tensors saved for the backward pass

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.weight_casts + self.activations

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GIB, 3)}


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _meta_copies(models):
    """Storage-free twins of the UNet and text encoder (same configs, same vocabulary size)."""
    unet, text_encoder = models.unet, models.text_encoder
    with torch.device("meta"):
        meta_unet = type(unet).from_config(unet.config)
        meta_text = type(text_encoder)(text_encoder.config)
    if meta_text.get_input_embeddings().num_embeddings != text_encoder.get_input_embeddings().num_embeddings:
        meta_text.resize_token_embeddings(text_encoder.get_input_embeddings().num_embeddings)
    return meta_unet, meta_text


def step_batch(models, cfg: ExtractConfig, resolution: int, dtype: torch.dtype, device: str = "meta") -> Batch:
    """A batch of the shapes one training step sees (values are zeros)."""
    latent = resolution // models.vae_scale
    attn = latent // cfg.attn_downsample
    b, length = cfg.batch_size, models.tokenizer.model_max_length
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


def saved_activation_bytes(unet, text_encoder, scheduler, cfg: ExtractConfig, batch: Batch) -> int:
    params = {id(p) for m in (unet, text_encoder) for p in m.parameters()}
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
        training_step(unet, text_encoder, scheduler, store, batch, cfg)
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
                        mixed_precision: bool = True) -> MemoryEstimate:
    """Predicted peak bytes of one step of ``phase`` ("phase1" or "phase2") on an accelerator.

    ``mixed_precision``: whether the step runs under autocast (CUDA with cfg.mixed_precision
    other than "no"); on the CPU the Extractor trains in fp32."""
    unet, text_encoder = _meta_copies(models)
    cast = AUTOCAST_DTYPES.get(cfg.mixed_precision) if mixed_precision else None
    # the Extractor's own rule: the same parameters train, adapters are added the same way
    setup = phase_setup(phase, cfg, unet, text_encoder)
    trainable_bytes = sum(p.numel() * 4 for p in setup.trainable)  # fp32 master weights
    adapters = sum(p.numel() * 4 for p in setup.adapters)
    resident = sum(_nbytes(m.parameters()) for m in (models.unet, models.text_encoder, models.vae)) + adapters
    # autocast keeps a low-precision copy of each weight a matmul or convolution uses
    casts = (_nbytes(unet.parameters()) + _nbytes(text_encoder.parameters())) // 2 if cast else 0

    if cast is not None:
        unet.to(cast)
        text_encoder.to(cast)
    set_checkpointing(unet, text_encoder, checkpointing)
    unet.train()
    text_encoder.train()
    batch = step_batch(models, cfg, resolution, cast or torch.float32)
    # a twin scheduler: add_noise moves its tables to the batch's device, here ``meta``
    scheduler = type(models.scheduler).from_config(models.scheduler.config)
    activations = saved_activation_bytes(unet, text_encoder, scheduler, cfg, batch)
    return MemoryEstimate(weights=resident, gradients=trainable_bytes, optimizer=2 * trainable_bytes,
                          weight_casts=casts, activations=activations)
