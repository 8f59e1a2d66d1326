"""Which parameters train in each phase, with which learning rate, and what runs after each
step: the one rule the Extractor, the memory prediction and the benchmarks all follow.

- phase 1: the embedding matrix only, at ``phase1_lr``; after each step every row but the
  scene's new ones goes back (``after_step``, given by the caller who knows those rows).
- phase 2: what its mode trains: one object per mode below (``PHASE2_MODES``), which also
  says what is kept before it trains, what a bundle saves and how it is undone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from breakscene.config import ExtractConfig
from breakscene.method.lora import add_lora, lora_state_dicts, remove_lora
from breakscene.method.tokens import as_tuple

PHASES = ("phase1", "phase2")


def phase_setup(phase: str, cfg: ExtractConfig, unet, text_encoder, *,
                after_step: Callable[[], None] | None = None) -> PhaseSetup:
    """Mark exactly the parameters of ``phase`` ("phase1" or "phase2") trainable (adding LoRA
    adapters in ``lora`` mode) and return them with their optimiser groups.

    ``text_encoder``: one, or a tuple of every text encoder (SDXL: both, trained alike).

    ``after_step``: the embedding-row hygiene for the phases that train only some rows."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'phase1' or 'phase2', not {phase!r}")
    keep_rows = after_step or nothing
    unet.requires_grad_(False)
    for encoder in as_tuple(text_encoder):
        encoder.requires_grad_(False)
    if phase == "phase1":
        rows = embedding_weights(text_encoder)
        setup = PhaseSetup([{"params": rows, "lr": cfg.phase1_lr}], rows, keep_rows)
    else:
        setup = phase2_mode(cfg).setup(cfg, unet, text_encoder, keep_rows)
    for p in setup.trainable:
        p.requires_grad_(True)
    return setup


def embedding_weights(text_encoder) -> list[torch.nn.Parameter]:
    """The input embedding matrix of each text encoder (one, or a tuple of them)."""
    return [e.get_input_embeddings().weight for e in as_tuple(text_encoder)]


def set_checkpointing(unet, text_encoder, on: bool) -> None:
    """Gradient checkpointing of the trained models, on or off together."""
    if on == unet.is_gradient_checkpointing:
        return
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    for encoder in as_tuple(text_encoder):
        if on:
            encoder.activation_checkpointing_enable()
        else:
            encoder.activation_checkpointing_disable()


# --------------------------------------------------------------------------------------
# Phase 2's two modes, each said once: what trains, what is kept before it trains, what a
# bundle saves, and how it is undone so that the next scene starts from the base model.
#
# - ``full`` (the paper's): every UNet and text-encoder weight at ``phase2_lr``; the
#   pristine weights are copied to the CPU once, before the first full phase 2 of a process,
#   and loaded back to undo it; a bundle saves ``unet/`` and ``text_encoder/``.
# - ``lora``: fresh peft adapters on the UNet (and the text encoder when ``lora.text_encoder``)
#   at ``lora.lr``, plus the embedding matrix at ``phase2_lr`` with phase 1's row hygiene;
#   nothing to keep (the base weights never change); undone by removing the adapters; a
#   bundle saves ``pytorch_lora_weights.safetensors`` where diffusers' ``load_lora_weights``
#   looks.
LORA_FILE = "pytorch_lora_weights.safetensors"


def nothing() -> None:
    return None


@dataclass
class PhaseSetup:
    groups: list[dict]  # AdamW parameter groups with their learning rates
    trainable: list[torch.nn.Parameter]  # what gradient clipping covers
    after_step: Callable[[], None] = nothing
    adapters: list[torch.nn.Parameter] = field(default_factory=list)  # added for the phase (LoRA)


class FullMode:
    name = "full"
    lighter = "lora"  # the mode a step that does not fit is pointed to (models/memory.py)

    def setup(self, cfg: ExtractConfig, unet, text_encoder, keep_rows: Callable[[], None]) -> PhaseSetup:
        params = list(unet.parameters()) + [p for e in as_tuple(text_encoder) for p in e.parameters()]
        return PhaseSetup([{"params": params, "lr": cfg.phase2_lr}], params)

    def snapshot(self, unet, text_encoder, kept: dict | None) -> dict:
        """The pristine weights on the CPU, taken once (``kept`` when already taken)."""
        if kept is not None:
            return kept
        models = {"unet": unet, **dict(zip(encoder_folders(text_encoder), as_tuple(text_encoder)))}
        return {name: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
                for name, m in models.items()}

    def undo(self, unet, text_encoder, kept: dict | None) -> None:
        unet.load_state_dict(kept["unet"])
        for name, encoder in zip(encoder_folders(text_encoder), as_tuple(text_encoder)):
            encoder.load_state_dict(kept[name])

    def save(self, folder: Path, unet, text_encoder, cfg: ExtractConfig, save_text_encoder) -> dict:
        """``unet/`` and each encoder's folder (``text_encoder/``, SDXL's ``text_encoder_2/``)."""
        unet.save_pretrained(folder / "unet")
        names = encoder_folders(text_encoder)
        for name, encoder in zip(names, as_tuple(text_encoder)):
            save_text_encoder(encoder, folder / name)
        return {"unet": "unet", **{name: name for name in names}}


class LoraMode:
    name = "lora"
    lighter = None

    def setup(self, cfg: ExtractConfig, unet, text_encoder, keep_rows: Callable[[], None]) -> PhaseSetup:
        rows = embedding_weights(text_encoder)
        lora = add_lora(unet, text_encoder if cfg.lora.text_encoder else None, cfg.lora)
        return PhaseSetup([{"params": lora, "lr": cfg.lora.lr}, {"params": rows, "lr": cfg.phase2_lr}],
                          lora + rows, keep_rows, adapters=lora)

    def snapshot(self, unet, text_encoder, kept: dict | None) -> dict | None:
        return kept  # the base weights never change

    def undo(self, unet, text_encoder, kept: dict | None) -> None:
        remove_lora(unet, *as_tuple(text_encoder))

    def save(self, folder: Path, unet, text_encoder, cfg: ExtractConfig, save_text_encoder) -> dict:
        """Where ``load_lora_weights`` looks: StableDiffusionPipeline's layout, or with two
        encoders StableDiffusionXLPipeline's (``text_encoder_2_lora_layers``)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        encoders = as_tuple(text_encoder)
        layers, meta = lora_state_dicts(unet, encoders if cfg.lora.text_encoder else ())
        pipeline = StableDiffusionXLPipeline if len(encoders) == 2 else StableDiffusionPipeline
        pipeline.save_lora_weights(folder, **layers, **meta)
        if not (folder / LORA_FILE).is_file():
            raise RuntimeError(f"diffusers wrote no {LORA_FILE}")
        return {"lora": LORA_FILE}


PHASE2_MODES = {"full": FullMode(), "lora": LoraMode()}
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")  # as diffusers' pipelines name them


def encoder_folders(text_encoder) -> tuple[str, ...]:
    return ENCODER_FOLDERS[:len(as_tuple(text_encoder))]


def phase2_mode(cfg: ExtractConfig) -> FullMode | LoraMode:
    return PHASE2_MODES[cfg.phase2_mode]
