"""Phase 2's two modes, each said once: what trains, what is kept before it trains, what a
bundle saves, and how it is undone so that the next scene starts from the base model.

- ``full`` (the paper's): every UNet and text-encoder weight at ``phase2_lr``; the
  pristine weights are copied to the CPU once, before the first full phase 2 of a process,
  and loaded back to undo it; a bundle saves ``unet/`` and ``text_encoder/``.
- ``lora``: fresh peft adapters on the UNet (and the text encoder when ``lora.text_encoder``)
  at ``lora.lr``, plus the embedding matrix at ``phase2_lr`` with phase 1's row hygiene;
  nothing to keep (the base weights never change); undone by removing the adapters; a
  bundle saves ``pytorch_lora_weights.safetensors`` where diffusers' ``load_lora_weights``
  looks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from breakscene.config import ExtractConfig
from breakscene.method.lora import add_lora, lora_state_dicts, remove_lora

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

    def setup(self, cfg: ExtractConfig, unet, text_encoder, keep_rows: Callable[[], None]) -> PhaseSetup:
        params = list(unet.parameters()) + list(text_encoder.parameters())
        return PhaseSetup([{"params": params, "lr": cfg.phase2_lr}], params)

    def snapshot(self, unet, text_encoder, kept: dict | None) -> dict:
        """The pristine weights on the CPU, taken once (``kept`` when already taken)."""
        if kept is not None:
            return kept
        return {"unet": {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()},
                "text_encoder": {k: v.detach().to("cpu", copy=True) for k, v in text_encoder.state_dict().items()}}

    def undo(self, unet, text_encoder, kept: dict | None) -> None:
        unet.load_state_dict(kept["unet"])
        text_encoder.load_state_dict(kept["text_encoder"])

    def save(self, folder: Path, unet, text_encoder, cfg: ExtractConfig, save_text_encoder) -> dict:
        unet.save_pretrained(folder / "unet")
        save_text_encoder(text_encoder, folder / "text_encoder")
        return {"unet": "unet", "text_encoder": "text_encoder"}


class LoraMode:
    name = "lora"

    def setup(self, cfg: ExtractConfig, unet, text_encoder, keep_rows: Callable[[], None]) -> PhaseSetup:
        emb = text_encoder.get_input_embeddings().weight
        lora = add_lora(unet, text_encoder if cfg.lora.text_encoder else None, cfg.lora)
        return PhaseSetup([{"params": lora, "lr": cfg.lora.lr}, {"params": [emb], "lr": cfg.phase2_lr}],
                          lora + [emb], keep_rows, adapters=lora)

    def snapshot(self, unet, text_encoder, kept: dict | None) -> dict | None:
        return kept  # the base weights never change

    def undo(self, unet, text_encoder, kept: dict | None) -> None:
        remove_lora(unet, text_encoder)

    def save(self, folder: Path, unet, text_encoder, cfg: ExtractConfig, save_text_encoder) -> dict:
        from diffusers import StableDiffusionPipeline

        unet_sd, te_sd, meta = lora_state_dicts(unet, text_encoder if cfg.lora.text_encoder else None)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                                  **meta)
        if not (folder / LORA_FILE).is_file():
            raise RuntimeError(f"diffusers wrote no {LORA_FILE}")
        return {"lora": LORA_FILE}


PHASE2_MODES = {"full": FullMode(), "lora": LoraMode()}


def phase2_mode(cfg: ExtractConfig) -> FullMode | LoraMode:
    return PHASE2_MODES[cfg.phase2_mode]
