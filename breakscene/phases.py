"""Which parameters train in each phase, with which learning rate, and what runs after each
step: the one rule the Extractor, the memory prediction and the benchmarks all follow.

- phase 1: the embedding matrix only, at ``phase1_lr``; after each step every row but the
  scene's new ones goes back (``after_step``, given by the caller who knows those rows).
- phase 2 ``full``: every UNet and text-encoder weight (embeddings included) at
  ``phase2_lr``, as the authors train; nothing after the step.
- phase 2 ``lora``: fresh adapters on the UNet (and the text encoder when
  ``lora.text_encoder``) at ``lora.lr``, plus the embedding matrix at ``phase2_lr`` with
  the same row hygiene as phase 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ExtractConfig
from .lora import add_lora

PHASES = ("phase1", "phase2")


def _nothing() -> None:
    return None


@dataclass
class PhaseSetup:
    groups: list[dict]  # AdamW parameter groups with their learning rates
    trainable: list[torch.nn.Parameter]  # what gradient clipping covers
    after_step: Callable[[], None] = _nothing
    adapters: list[torch.nn.Parameter] = field(default_factory=list)  # added for the phase (LoRA)


def phase_setup(phase: str, cfg: ExtractConfig, unet, text_encoder, *,
                after_step: Callable[[], None] | None = None) -> PhaseSetup:
    """Mark exactly the parameters of ``phase`` ("phase1" or "phase2") trainable (adding LoRA
    adapters in ``lora`` mode) and return them with their optimiser groups.

    ``after_step``: the embedding-row hygiene for the phases that train only some rows."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'phase1' or 'phase2', not {phase!r}")
    keep_rows = after_step or _nothing
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings().weight
    if phase == "phase1":
        setup = PhaseSetup([{"params": [emb], "lr": cfg.phase1_lr}], [emb], keep_rows)
    elif cfg.phase2_mode == "full":
        params = list(unet.parameters()) + list(text_encoder.parameters())
        setup = PhaseSetup([{"params": params, "lr": cfg.phase2_lr}], params)
    else:
        lora = add_lora(unet, text_encoder if cfg.lora.text_encoder else None, cfg.lora)
        setup = PhaseSetup([{"params": lora, "lr": cfg.lora.lr}, {"params": [emb], "lr": cfg.phase2_lr}],
                           lora + [emb], keep_rows, adapters=lora)
    for p in setup.trainable:
        p.requires_grad_(True)
    return setup


def set_checkpointing(unet, text_encoder, on: bool) -> None:
    """Gradient checkpointing of both trained models, on or off together."""
    if on == unet.is_gradient_checkpointing:
        return
    if on:
        unet.enable_gradient_checkpointing()
        text_encoder.activation_checkpointing_enable()
    else:
        unet.disable_gradient_checkpointing()
        text_encoder.activation_checkpointing_disable()
