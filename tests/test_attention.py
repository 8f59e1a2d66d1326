import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from breakscene.method.attention import AttentionStore, CaptureAttnProcessor, install_capture, layer_downsample
from breakscene.models.presets import SD21_BASE_RANDOM, TINY


def test_sd21_loss_layers_are_the_five_16x16_cross_attentions():
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD21_BASE_RANDOM.unet)
    names = install_capture(unet, AttentionStore(), downsample=4)
    assert len(names) == 5
    assert sum(n.startswith("down_blocks.2.") for n in names) == 2
    assert sum(n.startswith("up_blocks.1.") for n in names) == 3
    assert all(n.endswith("attn2.processor") for n in names)
    procs = unet.attn_processors
    captured = {n for n, p in procs.items() if isinstance(p, CaptureAttnProcessor)}
    assert captured == set(names)
    # every other layer (self-attention, mid block, other sizes) keeps the fused kernel
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n not in captured)
    assert not any("mid_block" in n for n in names)


def test_layer_downsample_mirrors_up_blocks():
    assert layer_downsample("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 4) == 1
    assert layer_downsample("up_blocks.3.attentions.0.transformer_blocks.0.attn2.processor", 4) == 1
    assert layer_downsample("up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor", 4) == 4
    assert layer_downsample("up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor", 4) is None
    assert layer_downsample("mid_block.attentions.0.transformer_blocks.0.attn2.processor", 4) is None


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY.unet).eval()


def test_capture_matches_fused_attention_and_reads_the_right_size():
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 32, 48, generator=g)  # not square
    states = torch.randn(2, 7, TINY.unet["cross_attention_dim"], generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        ref = unet(latents, t, states).sample
        store = AttentionStore()
        names = install_capture(unet, store, 4)
        out = unet(latents, t, states).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert set(store.maps) == set(names)
    for m in store.maps.values():
        assert m.shape == (2, (32 // 4) * (48 // 4), 7)  # (batch, 8x12 queries, tokens)
        assert torch.allclose(m.sum(-1), torch.ones(2, 96), atol=1e-5)  # softmax rows


def test_batch_rows_are_not_mixed():
    """Row b of a captured map must depend on batch element b only."""
    unet = _tiny_unet()
    store = AttentionStore()
    install_capture(unet, store, 4)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(3, 4, 32, 32, generator=g)
    states = torch.randn(3, 5, 32, generator=g)
    t = torch.tensor([100, 400, 900])
    with torch.no_grad():
        unet(latents, t, states)
        together = store.mean_map().clone()
        for b in range(3):
            unet(latents[b:b + 1], t[b:b + 1], states[b:b + 1])
            assert torch.allclose(store.mean_map()[0], together[b], atol=1e-5)
