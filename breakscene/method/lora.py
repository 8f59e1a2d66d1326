"""Phase-2 ``lora`` mode: peft low-rank adapters on UNet attention and the text encoder."""
from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from breakscene.config import LoraConfigFields

ADAPTER = "breakscene"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _config(cfg: LoraConfigFields, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, text_encoder, cfg: LoraConfigFields, seed: int = 0) -> list[torch.nn.Parameter]:
    """Inject fresh adapters (seeded init) and return their parameters, all trainable."""
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet.add_adapter(_config(cfg, UNET_TARGETS), adapter_name=ADAPTER)
        if text_encoder is not None:
            text_encoder.add_adapter(_config(cfg, TEXT_TARGETS), adapter_name=ADAPTER)
    params = [p for model in (unet, text_encoder) if model is not None
              for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def remove_lora(*models) -> None:
    """Unwrap every adapter layer back to its base layer: the base weights were never touched."""
    for model in models:
        if model is None or not getattr(model, "_hf_peft_config_loaded", False):
            continue
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = False


def lora_state_dicts(unet, text_encoder):
    """(unet layers, text-encoder layers, save kwargs) in the layout diffusers' LoRA loader reads."""
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    meta = {"unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    te_sd = None
    if text_encoder is not None:
        te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER))
        meta["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config[ADAPTER].to_dict()
    return unet_sd, te_sd, meta
