"""The two Break-A-Scene losses, as pure functions of tensors."""
from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               normalization: str = "mask", eps: float = 1e-8) -> torch.Tensor:
    """Masked diffusion loss, averaged over the batch.

    pred, target: (B, C, h, w); mask: (B, 1, h, w) weights in [0, 1] (the union mask at
    latent size). "mask" divides each example's masked squared error by its mask area
    (times C), so a small concept weighs as much as a large one; "all" divides by every
    pixel, as the authors' code does (for a binary mask it equals their
    ``mse(pred * m, target * m)``).
    """
    err = ((pred.float() - target.float()) ** 2 * mask).sum(dim=(1, 2, 3))
    channels = pred.shape[1]
    if normalization == "mask":
        denom = mask.sum(dim=(1, 2, 3)).clamp_min(eps) * channels
    elif normalization == "all":
        denom = torch.full_like(err, float(pred[0].numel()))
    else:
        raise ValueError(f"unknown masked loss normalization {normalization!r}")
    return (err / denom).mean()


def normalize_max(maps: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide each (h, w) map by its maximum; eps keeps an all-zero map finite."""
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)


def attention_loss(maps: list[torch.Tensor], masks: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Cross-attention loss: per example, the sum over its chosen tokens of
    MSE(max-normalised map, own mask); then the mean over examples (as published).

    maps[b], masks[b]: (k_b, h, w): example b's chosen tokens, in the same order as
    their masks. Examples may choose different numbers of tokens.
    """
    if len(maps) != len(masks) or not maps:
        raise ValueError("need one (maps, masks) pair per example")
    per_example = []
    for m, target in zip(maps, masks):
        if m.shape != target.shape:
            raise ValueError(f"attention maps {tuple(m.shape)} and masks {tuple(target.shape)} differ")
        per_example.append(((normalize_max(m.float(), eps) - target.float()) ** 2).mean(dim=(-2, -1)).sum())
    return torch.stack(per_example).mean()
