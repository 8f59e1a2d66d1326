import torch

from breakscene.method.losses import attention_loss, masked_mse, normalize_max


def test_masked_mse_divides_by_mask_area():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # masked squared errors: 1 + 9 = 10 over an area of 2
    assert masked_mse(pred, target, mask, "mask").item() == 5.0
    # the authors' mean over every pixel: 10 / 4
    assert masked_mse(pred, target, mask, "all").item() == 2.5


def test_masked_mse_all_equals_authors_formula_for_binary_masks():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    authors = torch.nn.functional.mse_loss(pred * mask, target * mask)
    assert torch.allclose(masked_mse(pred, target, mask, "all"), authors)


def test_masked_mse_weight_does_not_fall_with_area():
    pred = torch.ones(1, 4, 4, 4)
    target = torch.zeros_like(pred)
    small = torch.zeros(1, 1, 4, 4)
    small[..., 0, 0] = 1
    big = torch.ones(1, 1, 4, 4)
    assert masked_mse(pred, target, small).item() == masked_mse(pred, target, big).item() == 1.0
    assert masked_mse(pred, target, small, "all").item() == 1 / 16


def test_masked_mse_averages_examples_with_their_own_areas():
    pred = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 1.0)])
    mask = torch.stack([torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.ones(1, 2, 2)])
    # example 0: 4 / 1; example 1: 4 / 4 -> mean 2.5
    assert masked_mse(pred, torch.zeros_like(pred), mask).item() == 2.5


def test_normalize_max_keeps_zero_maps_finite():
    maps = torch.zeros(2, 3, 3)
    maps[0, 1, 1] = 4.0
    out = normalize_max(maps, eps=1e-6)
    assert torch.isfinite(out).all()
    assert abs(out[0, 1, 1].item() - 4.0 / (4.0 + 1e-6)) < 1e-7  # float32
    assert out[1].abs().max() == 0


def test_attention_loss_sums_tokens_and_averages_examples():
    # example 0: two tokens; example 1: one token
    m0 = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    k0 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    m1 = torch.tensor([[[0.0, 3.0], [3.0, 0.0]]])
    k1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    eps = 0.0
    # token 0: normalised map equals its mask -> 0; token 1: all ones vs one pixel -> 3/4
    # example 1: normalised [[0,1],[1,0]] vs [[1,0],[0,0]] -> 3/4
    expected = ((0.0 + 0.75) + 0.75) / 2
    assert abs(attention_loss([m0, m1], [k0, k1], eps).item() - expected) < 1e-7


def test_attention_loss_pairs_each_token_with_its_own_mask():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    masks = maps.clone()
    assert attention_loss([maps], [masks], 0.0).item() == 0.0
    # swapping the masks: each map now misses its one pixel and lights one wrong pixel: 2/4 each
    assert attention_loss([maps], [masks.flip(0)], 0.0).item() == 1.0


def test_attention_loss_rejects_mismatched_shapes():
    import pytest

    with pytest.raises(ValueError):
        attention_loss([torch.zeros(2, 2, 2)], [torch.zeros(1, 2, 2)])
