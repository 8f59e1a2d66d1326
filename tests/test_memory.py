"""The memory prediction: its meta-device count against real tensors and a real optimiser."""
import pytest
import torch

from breakscene.config import ExtractConfig
from breakscene.models.memory import (
    GIB,
    predict_step_memory,
    saved_activation_bytes,
    step_batch,
)
from breakscene.models.loading import DiffusionModels, load_models
from breakscene.method.phases import phase_setup, set_checkpointing
from breakscene.models.presets import build_preset
from breakscene.method.training import training_step


def _trainable(models, cfg, phase):
    return phase_setup(phase, cfg, models.unet, models.text_encoder).trainable


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_count_equals_the_count_on_real_tensors(checkpointing):
    """The meta-device step saves exactly what the same step on real CPU tensors saves."""
    cfg = ExtractConfig(phase2_mode="full")
    predicted = predict_step_memory(load_models("tiny"), cfg, 64, "phase2", checkpointing, mixed_precision=False)
    real = load_models("tiny")
    _trainable(real, cfg, "phase2")
    set_checkpointing(real.unet, real.text_encoder, checkpointing)
    real.unet.train()
    real.text_encoder.train()
    counted = saved_activation_bytes(real.unet, real.text_encoder, real.scheduler, cfg,
                                     step_batch(real, cfg, 64, torch.float32, device="cpu"))
    assert counted == predicted.activations > 0


@pytest.mark.parametrize("phase,mode", [("phase1", "full"), ("phase2", "full"), ("phase2", "lora")])
def test_gradient_and_optimizer_bytes_match_a_real_adamw_step(phase, mode):
    cfg = ExtractConfig(phase2_mode=mode)
    predicted = predict_step_memory(load_models("tiny"), cfg, 64, phase, checkpointing=False)
    real = load_models("tiny")
    params = _trainable(real, cfg, phase)
    opt = torch.optim.AdamW(params)
    terms = training_step(real.unet, real.text_encoder, real.scheduler, _store(real, cfg), 
                          step_batch(real, cfg, 64, torch.float32, device="cpu"), cfg)
    terms.total.backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    moments = sum(v.numel() * v.element_size() for state in opt.state.values()
                  for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    assert (predicted.gradients, predicted.optimizer) == (grads, moments)
    resident = sum(p.numel() * p.element_size() for m in (real.unet, real.text_encoder, real.vae)
                   for p in m.parameters())
    assert predicted.weights == resident  # adapters included, for lora


def _store(models, cfg):
    from breakscene.method.attention import AttentionStore, install_capture

    store = AttentionStore()
    install_capture(models.unet, store, cfg.attn_downsample)
    return store


def test_checkpointing_and_autocast_shrink_activations():
    models = load_models("tiny")
    cfg = ExtractConfig()
    plain = predict_step_memory(models, cfg, 64, "phase2", checkpointing=False)
    ckpt = predict_step_memory(models, cfg, 64, "phase2", checkpointing=True)
    fp32 = predict_step_memory(models, cfg, 64, "phase2", checkpointing=False, mixed_precision=False)
    assert ckpt.activations < 0.3 * plain.activations
    assert plain.activations < fp32.activations
    assert fp32.weight_casts == 0 and plain.weight_casts > 0


def test_sd21_full_phase2_needs_checkpointing_to_fit_24_gb():
    """SD 2.1 base shapes on the meta device: the published parameter counts, and the
    reason `auto` checkpointing exists (full fine-tuning is ~26 GiB without it)."""
    with torch.device("meta"):
        unet, vae, te, tok, sch = build_preset("sd21-base-random")
    models = DiffusionModels(unet, vae, te, tok, sch, "sd21-base-random", None)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    cfg = ExtractConfig(phase2_mode="full")
    plain = predict_step_memory(models, cfg, 512, "phase2", checkpointing=False)
    ckpt = predict_step_memory(models, cfg, 512, "phase2", checkpointing=True)
    trainable = sum(p.numel() for m in (unet, te) for p in m.parameters())
    assert plain.gradients == 4 * trainable and plain.optimizer == 8 * trainable
    # "auto" turns it on for a 24 GB card (0.9 headroom); with it, >= 1 GB stays free for the
    # CUDA context and library workspaces
    assert plain.total > 0.9 * 24e9 and ckpt.total < 23e9
    lora = predict_step_memory(models, ExtractConfig(phase2_mode="lora"), 512, "phase2", checkpointing=False)
    assert lora.total < 16 * GIB
