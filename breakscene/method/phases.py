"""Which parameters train in each phase, with which learning rate, and what runs after each
step: the one rule the Extractor, the memory prediction and the benchmarks all follow.

- phase 1: the embedding matrix only, at ``phase1_lr``; after each step every row but the
  scene's new ones goes back (``after_step``, given by the caller who knows those rows).
- phase 2: what its mode trains (``phase2_modes``: ``full`` or ``lora``).
"""
from __future__ import annotations

from collections.abc import Callable

from breakscene.config import ExtractConfig
from breakscene.method.phase2_modes import PhaseSetup, nothing, phase2_mode

PHASES = ("phase1", "phase2")


def phase_setup(phase: str, cfg: ExtractConfig, unet, text_encoder, *,
                after_step: Callable[[], None] | None = None) -> PhaseSetup:
    """Mark exactly the parameters of ``phase`` ("phase1" or "phase2") trainable (adding LoRA
    adapters in ``lora`` mode) and return them with their optimiser groups.

    ``after_step``: the embedding-row hygiene for the phases that train only some rows."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'phase1' or 'phase2', not {phase!r}")
    keep_rows = after_step or nothing
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings().weight
    if phase == "phase1":
        setup = PhaseSetup([{"params": [emb], "lr": cfg.phase1_lr}], [emb], keep_rows)
    else:
        setup = phase2_mode(cfg).setup(cfg, unet, text_encoder, keep_rows)
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
