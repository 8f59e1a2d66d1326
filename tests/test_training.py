import random

import pytest
import torch

from breakscene.method.attention import AttentionStore
from breakscene.config import ExtractConfig
from breakscene.extraction.extractor import Extractor
from breakscene.scenes.scene import load_scene_dir
from breakscene.extraction.tensors import draw_batch
from breakscene.method.training import Batch, training_step


class InjectedStore(AttentionStore):
    """Returns known maps instead of what the UNet computed."""

    def __init__(self, maps):
        super().__init__()
        self.injected = maps

    def mean_map(self):
        return self.injected


def _masks():
    left_half = torch.zeros(8, 8)
    left_half[:, :4] = 1
    corner = torch.zeros(8, 8)
    corner[:2, :2] = 1
    return left_half, corner


def _batch(ex, token_order, attn_masks, with_class):
    ids, pos = ex.assets.encode_prompt(token_order)
    latents = torch.zeros(1, 4, 32, 32)
    batch = Batch(latents=latents, input_ids=ids, token_positions=[pos], attn_masks=[attn_masks],
                  union_mask=torch.ones(1, 1, 32, 32), noise=torch.ones_like(latents),
                  timesteps=torch.tensor([500]))
    if with_class:
        batch.class_latents = torch.zeros_like(latents)
        batch.class_input_ids = ex.assets.ids_for_text("a photo at the beach")
        batch.class_noise = torch.ones_like(latents)
        batch.class_timesteps = torch.tensor([500])
    return batch, pos


@pytest.mark.parametrize("with_class", [False, True])
def test_attention_loss_reads_own_token_row_and_mask(tiny_extractor, with_class):
    ex = tiny_extractor
    left_half, corner = _masks()
    order = ("<asset1>", "<asset0>")  # prompt order differs from token numbering
    rows = 2 if with_class else 1
    maps = torch.zeros(rows, 64, 77)
    _, pos = ex.assets.encode_prompt(order)
    maps[0, :, pos[0]] = 3 * left_half.flatten()  # <asset1> attends to the left half
    maps[0, :, pos[1]] = 5 * corner.flatten()  # <asset0> to the corner
    if with_class:  # a class row that would give a different loss if it were read
        maps[1] = 1.0
    cfg = ExtractConfig(lambda_attn=0.01, attn_max_eps=1e-6)
    m = ex.models
    store = InjectedStore(maps)

    batch, _ = _batch(ex, order, torch.stack([left_half, corner]), with_class)
    with torch.no_grad():
        right = training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)
    assert right.attention.item() == pytest.approx(0.0, abs=1e-10)

    batch, _ = _batch(ex, order, torch.stack([corner, left_half]), with_class)
    with torch.no_grad():
        swapped = training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)
    # |left_half xor corner| = 32 - 4 = 28 pixels of 64, once per token
    assert swapped.attention.item() == pytest.approx(2 * 28 / 64, rel=1e-5)
    expected_total = swapped.diffusion + cfg.prior.loss_weight * swapped.prior + 0.01 * swapped.attention
    assert swapped.total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert (swapped.prior.item() > 0) == with_class


def test_lambda_zero_skips_attention(tiny_extractor):
    ex = tiny_extractor
    left_half, _ = _masks()
    batch, _ = _batch(ex, ("<asset0>",), left_half[None], False)
    m = ex.models
    with torch.no_grad():
        terms = training_step(m.unet, m.text_encoder, m.scheduler, AttentionStore(), batch,
                              ExtractConfig(lambda_attn=0.0))
    assert terms.attention.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.diffusion.item())


def test_attention_loss_alone_overfits_a_real_scene(examples):
    """Noise and timestep fixed, attention loss only: the maps must learn the masks."""
    ex = Extractor("tiny", progress=False)
    cfg = ExtractConfig(prior={"enabled": False}, lambda_attn=1.0)
    prepared = ex.prepare(load_scene_dir(examples / "chicken"), cfg)
    m = ex.models
    batch = draw_batch(prepared.tensors, None, cfg, rng=random.Random(0), gen=torch.Generator().manual_seed(0),
                       encode_subset=ex.assets.encode_subset,
                       num_train_timesteps=m.scheduler.config.num_train_timesteps)
    batch.timesteps = torch.tensor([300])
    params = list(m.unet.parameters()) + list(m.text_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(120):
        terms = training_step(m.unet, m.text_encoder, m.scheduler, ex.store, batch, cfg)
        opt.zero_grad()
        terms.attention.backward()
        opt.step()
        losses.append(terms.attention.item())
    assert losses[0] > 0.1
    assert min(losses[-10:]) < 0.15 * losses[0]
