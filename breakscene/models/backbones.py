"""What the method needs from a model family, behind one small interface (issue 19).

Stable Diffusion 1.x/2.x conditions the UNet on one text encoder's last hidden state.
SDXL conditions it on two (CLIP ViT-L and OpenCLIP bigG, penultimate layers, side by
side) and adds the pooled bigG embedding and six "time ids" (original size, crop corner,
target size) to the time embedding. A backbone turns prompt ids into the UNet's
conditioning, owns the new token rows in each text encoder, names the cross-attention
layers the loss reads and gives the latent geometry.

A training batch carries one row of ids per example: each tokenizer's padded ids side
by side (``Backbone.ids``), so the batch, its cache and its drawing stay family-blind;
``encode_ids`` splits them again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from breakscene.method.attention import loss_layers


@dataclass(frozen=True)
class LatentGeometry:
    vae_scale: int  # pixels per latent cell
    channels: int
    scaling_factor: float  # latents = vae.encode(x).latent_dist.sample() * scaling_factor
    native_resolution: int  # pixels a side the UNet was configured for

    def latent_size(self, resolution: int) -> int:
        return resolution // self.vae_scale


class Backbone:
    """Shared by the families: tokenizers and text encoders in matching order."""
    family = ""

    def __init__(self, unet, vae, text_encoders: tuple, tokenizers: tuple) -> None:
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = tuple(text_encoders), tuple(tokenizers)

    def tokenize(self, text: str | list[str]) -> tuple[torch.Tensor, ...]:
        """(batch, L) padded ids of ``text``, one tensor per tokenizer."""
        return tuple(tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tok in self.tokenizers)

    def ids(self, text: str | list[str]) -> torch.Tensor:
        """(batch, sum of L): every tokenizer's padded ids of ``text``, side by side."""
        return torch.cat(self.tokenize(text), dim=-1)

    def split_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``ids``' (batch, sum of L) back into one (batch, L) per tokenizer."""
        return ids.split([tok.model_max_length for tok in self.tokenizers], dim=-1)

    def encode_ids(self, ids: torch.Tensor, latent_size: tuple[int, int]):
        """(encoder_hidden_states, added_cond_kwargs or None) of ``Backbone.ids`` rows, for
        latents of ``latent_size`` (h, w): what the UNet's forward takes."""
        raise NotImplementedError

    def add_tokens(self, names: list[str]) -> list[list[int]]:
        """Adds ``names`` to every tokenizer (a row each in its text encoder); their ids per encoder."""
        for tok, encoder in zip(self.tokenizers, self.text_encoders):
            if tok.add_tokens(names) != len(names):
                raise ValueError(f"a tokenizer already holds one of {names}")
            if len(tok) > encoder.get_input_embeddings().num_embeddings:
                encoder.resize_token_embeddings(len(tok))
        return self.token_rows(names)

    def token_rows(self, names: list[str]) -> list[list[int]]:
        """The embedding rows of ``names`` in each text encoder, in encoder order."""
        return [tok.convert_tokens_to_ids(names) for tok in self.tokenizers]

    def loss_layers(self, downsample: int) -> list[str]:
        """The cross-attention processors at latent / ``downsample`` that feed the loss."""
        return loss_layers(self.unet, downsample)

    def geometry(self) -> LatentGeometry:
        vae = self.vae.config
        scale = 2 ** (len(vae.block_out_channels) - 1)
        return LatentGeometry(scale, int(vae.latent_channels), float(vae.scaling_factor),
                              int(self.unet.config.sample_size) * scale)


class SD2Backbone(Backbone):
    """Stable Diffusion 1.x/2.x: one text encoder, no added conditioning."""
    family = "sd"

    def encode_prompt(self, ids: tuple[torch.Tensor, ...], resolution: int | None = None):
        (encoder,), (input_ids,) = self.text_encoders, ids
        return encoder(input_ids.to(encoder.device))[0], None

    def encode_ids(self, ids: torch.Tensor, latent_size: tuple[int, int]):
        return self.text_encoders[0](ids)[0], None


class SDXLBackbone(Backbone):
    """SDXL: encoders (CLIP ViT-L, OpenCLIP bigG with projection), as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` uses them (no clip skip)."""
    family = "sdxl"

    def encode_prompt(self, ids: tuple[torch.Tensor, ...], resolution: int | tuple[int, int]):
        """(encoder_hidden_states (B, L, hidden + hidden_2), added_cond_kwargs) for a
        ``resolution`` (side, or (height, width)) image, uncropped: what the UNet's forward takes."""
        states, pooled = [], None
        for encoder, input_ids in zip(self.text_encoders, ids):
            out = encoder(input_ids.to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both
            pooled = out[0]  # the last encoder's projected pooled embedding (text_embeds)
        hidden = torch.cat(states, dim=-1)
        time_ids = self.add_time_ids(resolution, hidden.dtype, hidden.device).repeat(hidden.shape[0], 1)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids}

    def encode_ids(self, ids: torch.Tensor, latent_size: tuple[int, int]):
        scale = self.geometry().vae_scale
        return self.encode_prompt(self.split_ids(ids), (latent_size[0] * scale, latent_size[1] * scale))

    @staticmethod
    def add_time_ids(resolution: int | tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
        """(1, 6): original size, crop top-left, target size, each (height, width); a training
        crop is the whole image, so the model is told "uncropped, at this size"."""
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)


def sd2_backbone(models) -> SD2Backbone:
    """The backbone of a ``loading.DiffusionModels``."""
    return SD2Backbone(models.unet, models.vae, (models.text_encoder,), (models.tokenizer,))


def sdxl_backbone(models) -> SDXLBackbone:
    """The backbone of a ``loading.SDXLModels``."""
    return SDXLBackbone(models.unet, models.vae, (models.text_encoder, models.text_encoder_2),
                        (models.tokenizer, models.tokenizer_2))
