"""What the step loop reads, cached once per scene (and per class-image setting), and the
pure drawing of one training batch from it.

``draw_batch`` takes every random decision of a step (subsets and flips from the host
RNG; latent samples, noise and timesteps from the device generator), so the training
step itself is deterministic and a test can replay or compare batches.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from breakscene.scenes.masks import downsample
from breakscene.config import ExtractConfig
from breakscene.method.union_sampling import sample_subset
from breakscene.scenes.scene import PreparedScene
from breakscene.method.training import Batch, autocast_context


@dataclass
class SceneTensors:
    """Everything about one scene the step loop reads, on the device, per flip (0, 1)."""

    latent_mean: list[torch.Tensor]  # (1, 4, h, w), already scaled
    latent_std: list[torch.Tensor]
    masks: list[torch.Tensor]  # (N, R, R) full-resolution float masks
    latent_size: tuple[int, int]
    attn_size: tuple[int, int]
    pixels: torch.Tensor | None = None  # (3, R, R) in [-1, 1], unflipped, on the CPU
    subset_cache: dict = field(default_factory=dict)

    @property
    def num_concepts(self) -> int:
        return int(self.masks[0].shape[0])


@dataclass
class ClassTensors:
    """Prior preservation's class images as latent distributions, per flip."""

    latent_mean: list[torch.Tensor]  # (K, 4, h, w) per flip
    latent_std: list[torch.Tensor]
    input_ids: torch.Tensor  # (1, L) of the class prompt


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: torch.device, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution of ``pixels``, scaled, in fp32."""
    scale = vae.config.scaling_factor
    means, stds = [], []
    for chunk in pixels.split(batch):
        with autocast_context(device, "bf16"):
            dist = vae.encode(chunk.to(device)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


def scene_tensors(vae, prepared: PreparedScene, attn_downsample: int, device: torch.device) -> SceneTensors:
    """Both flips of the image encoded once; masks flipped with them."""
    pixels = torch.stack([prepared.pixels, prepared.pixels.flip(-1)])
    mean, std = encode_latents(vae, pixels, device)
    masks = prepared.masks.to(device)
    latent = mean.shape[-1]
    attn = latent // attn_downsample
    return SceneTensors(latent_mean=[mean[0:1], mean[1:2]], latent_std=[std[0:1], std[1:2]],
                        masks=[masks, masks.flip(-1)], latent_size=(latent, latent), attn_size=(attn, attn),
                        pixels=prepared.pixels)


def class_tensors(vae, pixels: torch.Tensor, input_ids: torch.Tensor, device: torch.device) -> ClassTensors:
    """Class images (K, 3, R, R) in [-1, 1], each flip encoded once."""
    mean, std = encode_latents(vae, pixels, device)
    mean_f, std_f = encode_latents(vae, pixels.flip(-1), device)
    return ClassTensors([mean, mean_f], [std, std_f], input_ids)


def subset_masks(data: SceneTensors, flip: int, subset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention-size masks of ``subset`` in its order, latent-size union mask (1, h, w)),
    cached per (flip, subset)."""
    key = (flip, subset)
    if key not in data.subset_cache:
        chosen = data.masks[flip][list(subset)]
        attn = downsample(chosen, data.attn_size)
        union = downsample(chosen.amax(0, keepdim=True), data.latent_size)
        data.subset_cache[key] = (attn, union)
    return data.subset_cache[key]


def draw_batch(data: SceneTensors, cls: ClassTensors | None, cfg: ExtractConfig, *, rng: random.Random,
               gen: torch.Generator, encode_subset: Callable[[tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]],
               num_train_timesteps: int) -> Batch:
    """All random draws of one step of ``cfg.batch_size`` examples. Per example: a subset of
    the concepts in random order (its prompt names them in that order, ``encode_subset``
    gives ids and positions), a flip, a latent sample; then noise and timesteps; then, with
    ``cls``, one flip for the class rows, class images, their latent samples, noise, timesteps."""
    dev, B, T = gen.device, cfg.batch_size, num_train_timesteps
    latents, ids, positions, attn_masks, unions = [], [], [], [], []
    for _ in range(B):
        subset = tuple(sample_subset(rng, data.num_concepts))
        flip = int(rng.random() < cfg.flip_p)
        mean, std = data.latent_mean[flip], data.latent_std[flip]
        latents.append(mean + std * torch.randn(mean.shape, generator=gen, device=dev))
        prompt_ids, pos = encode_subset(subset)
        attn, union = subset_masks(data, flip, subset)
        ids.append(prompt_ids)
        positions.append(pos)
        attn_masks.append(attn)
        unions.append(union)
    latents_t = torch.cat(latents)
    batch = Batch(latents=latents_t, input_ids=torch.cat(ids), token_positions=positions, attn_masks=attn_masks,
                  union_mask=torch.stack(unions), noise=torch.randn(latents_t.shape, generator=gen, device=dev),
                  timesteps=torch.randint(0, T, (B,), generator=gen, device=dev))
    if cls is not None:
        flip = int(rng.random() < cfg.flip_p)
        idx = torch.randint(0, cls.latent_mean[flip].shape[0], (B,), generator=gen, device=dev)
        mean, std = cls.latent_mean[flip][idx], cls.latent_std[flip][idx]
        batch.class_latents = mean + std * torch.randn(mean.shape, generator=gen, device=dev)
        batch.class_input_ids = cls.input_ids.expand(B, -1)
        batch.class_noise = torch.randn(mean.shape, generator=gen, device=dev)
        batch.class_timesteps = torch.randint(0, T, (B,), generator=gen, device=dev)
    return batch
