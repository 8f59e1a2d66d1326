"""Training over a concept group: every step draws one image of the group, then a random
subset of that image's masks (union sampling, per image); the prompt names those masks'
tokens, the masked loss uses their union in that image, and the attention loss ties each
token to its own mask there. A group of one image draws no image: its steps are the
single-scene steps, bit for bit.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from breakscene.config import ExtractConfig
from breakscene.extraction.tensors import ClassTensors, SceneTensors, draw_batch
from breakscene.method.training import Batch
from breakscene.scenes.masks import downsample

# How a step picks its image: "uniform" over images; "balanced" picks an object uniformly,
# then one of the images that show it (an object seen once is not drowned by one seen often).
DRAWS = ("uniform", "balanced")


@dataclass
class GroupTensors:
    images: list[SceneTensors]  # per image of the group, as one scene's
    token_of: list[tuple[int, ...]]  # per image: the token index of each of its masks
    draw: str = "uniform"

    @property
    def num_tokens(self) -> int:
        return 1 + max(t for tokens in self.token_of for t in tokens)


def pick_image(rng: random.Random, group: GroupTensors) -> int:
    """The image of this step (no draw for a group of one)."""
    n = len(group.images)
    if n == 1:
        return 0
    if group.draw == "uniform":
        return rng.randrange(n)
    token = rng.randrange(group.num_tokens)
    holders = [j for j, tokens in enumerate(group.token_of) if token in tokens]
    return holders[rng.randrange(len(holders))]


def draw_group_batch(group: GroupTensors, cls: ClassTensors | None, cfg: ExtractConfig, *, rng: random.Random,
                     gen: torch.Generator, encode_subset: Callable, num_train_timesteps: int) -> Batch:
    """One step's draws: an image, then ``draw_batch`` on it with its masks' tokens."""
    j = pick_image(rng, group)
    tokens = group.token_of[j]
    return draw_batch(group.images[j], cls, cfg, rng=rng, gen=gen,
                      encode_subset=lambda subset: encode_subset(tuple(tokens[i] for i in subset)),
                      num_train_timesteps=num_train_timesteps)


def image_reference_masks(data: SceneTensors) -> np.ndarray:
    """An image's masks at attention size, as booleans (the diagnostic's reference)."""
    return (downsample(data.masks[0], data.attn_size) >= 0.5).cpu().numpy()

