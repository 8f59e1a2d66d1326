"""Batch drawing through its public function (no Extractor): flips keep image and masks
aligned, each prompt position carries its own concept's mask, a seed fixes the batch."""
import random

import pytest
import torch
from conftest import write_scene

from breakscene.scenes.masks import downsample
from breakscene.config import ExtractConfig
from breakscene.models.loading import load_models
from breakscene.method.union_sampling import sample_subset
from breakscene.scenes.scene import load_scene_dir, prepare_scene
from breakscene.extraction.tensors import class_tensors, draw_batch, encode_latents, scene_tensors
from breakscene.method.tokens import AssetTokens

CPU = torch.device("cpu")
# three boxes of different sizes, none mirror-symmetric: red, green, blue
BOXES = ((2, 2, 20, 30), (30, 10, 62, 25), (5, 40, 28, 62))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    models = load_models("tiny")
    assets = AssetTokens(models.tokenizer, models.text_encoder, max_concepts=4)
    folder = write_scene(tmp_path_factory.mktemp("scene") / "s", size=(64, 64), boxes=BOXES)
    prepared = prepare_scene(load_scene_dir(folder), 64)
    return models, assets, prepared, scene_tensors(models.vae, prepared, 4, CPU)


def draw(parts, seed=0, cls=None, **cfg):
    models, assets, _, tensors = parts
    return draw_batch(tensors, cls, ExtractConfig(**cfg), rng=random.Random(seed),
                      gen=torch.Generator().manual_seed(seed), encode_subset=assets.encode_subset,
                      num_train_timesteps=models.scheduler.config.num_train_timesteps)


def test_a_flip_mirrors_image_and_masks_together(parts):
    models, _, prepared, tensors = parts
    # the mirrored masks lie on the mirrored image's boxes: red under mask 0, blue under mask 2
    mirrored = prepared.pixels.flip(-1)
    assert torch.equal(tensors.masks[1], tensors.masks[0].flip(-1))
    red, blue = mirrored[:, tensors.masks[1][0] > 0.5], mirrored[:, tensors.masks[1][2] > 0.5]
    assert red[0].min() > 0.5 and red[2].max() < -0.3 and blue[2].min() > 0.5 and blue[0].max() < -0.3
    plain, flipped = draw(parts, batch_size=4, flip_p=0.0), draw(parts, batch_size=4, flip_p=1.0)
    # the same subsets (the flip is drawn either way), their masks mirrored
    assert all(torch.equal(a, b) for a, b in zip(plain.token_positions, flipped.token_positions))
    assert torch.equal(plain.input_ids, flipped.input_ids)
    assert torch.equal(flipped.union_mask, plain.union_mask.flip(-1))
    assert all(torch.equal(b, a.flip(-1)) for a, b in zip(plain.attn_masks, flipped.attn_masks))
    assert not torch.equal(flipped.union_mask, plain.union_mask)
    # the latents are samples of the mirrored image's own encoding, with the same standard noise
    mean, std = encode_latents(models.vae, mirrored[None], CPU)
    z = (plain.latents - tensors.latent_mean[0]) / tensors.latent_std[0]
    assert torch.allclose(flipped.latents, mean + std * z, atol=1e-4)
    assert not torch.allclose(mean, tensors.latent_mean[0].flip(-1), atol=1e-2)  # not a mirrored latent


def test_each_prompt_position_carries_its_own_concepts_mask(parts):
    _, assets, _, tensors = parts
    batch = draw(parts, batch_size=16, flip_p=0.0)
    orders = []
    for b in range(16):
        positions = batch.token_positions[b].tolist()
        chosen = [assets.ids.index(int(batch.input_ids[b, p])) for p in positions]
        orders.append(chosen)
        assert positions == sorted(positions)  # the prompt names the tokens in the subset's order
        chosen_masks = tensors.masks[0][chosen]
        assert torch.equal(batch.attn_masks[b], downsample(chosen_masks, tensors.attn_size))
        assert torch.equal(batch.union_mask[b], downsample(chosen_masks.amax(0, keepdim=True),
                                                             tensors.latent_size))
    assert any(o != sorted(o) for o in orders)  # a later concept named first happens
    assert {len(o) for o in orders} == {1, 2, 3}
    rng, replay = random.Random(0), []  # the host RNG alone decides: subset, then flip
    for _ in range(16):
        replay.append(sample_subset(rng, 3))
        rng.random()
    assert orders == replay


def _fields(batch):
    return [batch.latents, batch.input_ids, batch.union_mask, batch.noise, batch.timesteps, batch.class_latents,
            batch.class_input_ids, batch.class_noise, batch.class_timesteps, *batch.token_positions,
            *batch.attn_masks]


def test_the_seed_fixes_the_batch(parts):
    models, assets, _, _ = parts
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cls = class_tensors(models.vae, pixels, assets.ids_for_text("a photo at the beach"), CPU)
    a, b, c = (draw(parts, seed, cls, batch_size=3) for seed in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(_fields(a), _fields(b)))
    assert a.class_latents.shape == (3, 4, 32, 32) and torch.equal(a.class_input_ids[0], a.class_input_ids[2])
    for name in ("latents", "noise", "class_latents", "class_noise"):
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
