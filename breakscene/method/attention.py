"""Cross-attention capture for the attention loss and the diagnostic.

Only the layers the loss reads get an explicit-softmax processor that stores its
probabilities: the cross-attention ("attn2") layers of the down and up blocks whose
spatial size is latent / ``downsample`` (16x16 for SD at 512 px). Every other attention
layer keeps diffusers' fused ``scaled_dot_product_attention`` processor.

Maps are stored per layer as (batch, queries, tokens), averaged over heads, with the
batch layout untouched: callers pick rows by index, never by "second half".
"""
from __future__ import annotations

import re

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

_LAYER = re.compile(r"^(down|up)_blocks\.(\d+)\..*\.attn2\.processor$")


def layer_downsample(processor_name: str, num_up_blocks: int) -> int | None:
    """Spatial downsampling factor (vs. the latent) of a cross-attention layer; None if not one.

    Down block i runs at latent / 2**i (its downsampler comes last); up block j mirrors it at
    latent / 2**(num_up_blocks - 1 - j). Mid-block layers are excluded, as published.
    """
    m = _LAYER.match(processor_name)
    if not m:
        return None
    kind, index = m.group(1), int(m.group(2))
    level = index if kind == "down" else num_up_blocks - 1 - index
    return 2**level


def loss_layers(unet, downsample: int) -> list[str]:
    names = [n for n in unet.attn_processors
             if layer_downsample(n, len(unet.up_blocks)) == downsample]
    if not names:
        raise ValueError(f"the UNet has no down/up cross-attention layer at latent/{downsample}")
    return names


class AttentionStore:
    """Holds the maps of the current forward pass, keyed by layer name."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.enabled = True

    def clear(self) -> None:
        self.maps.clear()

    def mean_map(self) -> torch.Tensor:
        """(batch, queries, tokens), averaged over the captured layers."""
        if not self.maps:
            raise RuntimeError("no attention map was captured in this forward pass")
        return torch.stack(list(self.maps.values())).mean(0)


class CaptureAttnProcessor:
    """Cross-attention with explicit softmax; stores the head-averaged probabilities."""

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"{self.name}: capture supports plain cross-attention layers only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = scores.float().softmax(dim=-1)  # softmax in fp32 even under autocast
        if self.store.enabled:
            self.keep(probs)
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def keep(self, probs: torch.Tensor) -> None:
        """Store this layer's (batch, heads, queries, tokens) probabilities for the loss."""
        self.store.maps[self.name] = probs.mean(dim=1)


def install_capture(unet, store: AttentionStore, downsample: int) -> list[str]:
    """Capture processors on the loss layers, fused SDPA everywhere else. Returns the layer names."""
    names = loss_layers(unet, downsample)
    chosen = set(names)
    unet.set_attn_processor({n: CaptureAttnProcessor(store, n) if n in chosen else AttnProcessor2_0()
                             for n in unet.attn_processors})
    return names


def token_maps(mean_map: torch.Tensor, row: int, positions: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) maps of the tokens at ``positions`` in batch row ``row``."""
    maps = mean_map[row][:, positions]  # (queries, k)
    if maps.shape[0] != size[0] * size[1]:
        raise ValueError(f"captured {maps.shape[0]} queries, expected {size[0]}x{size[1]}")
    return maps.T.reshape(len(positions), *size)
