"""Phase-2 ``lora`` mode: peft low-rank adapters on UNet attention and the text encoder."""
from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from breakscene.config import LoraConfigFields
from breakscene.method.tokens import as_tuple

ADAPTER = "breakscene"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _config(cfg: LoraConfigFields, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, text_encoder, cfg: LoraConfigFields, seed: int = 0) -> list[torch.nn.Parameter]:
    """Inject fresh adapters (seeded init) and return their parameters, all trainable.
    ``text_encoder``: None, one, or a tuple of them (each gets adapters, in order)."""
    encoders = () if text_encoder is None else as_tuple(text_encoder)
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet.add_adapter(_config(cfg, UNET_TARGETS), adapter_name=ADAPTER)
        for encoder in encoders:
            encoder.add_adapter(_config(cfg, TEXT_TARGETS), adapter_name=ADAPTER)
    params = [p for model in (unet, *encoders)
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


ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")  # save_lora_weights' argument names


def lora_state_dicts(unet, text_encoders: tuple = ()) -> tuple[dict, dict]:
    """(layers, metadata): the keyword arguments of a pipeline's ``save_lora_weights``
    (``unet_lora_layers``, ``text_encoder_lora_layers``, SDXL's ``text_encoder_2_lora_layers``
    and their ``..._lora_adapter_metadata``), in the layout diffusers' LoRA loader reads."""
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))}
    meta = {"unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    for prefix, encoder in zip(ENCODER_PREFIXES, text_encoders):
        layers[f"{prefix}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(encoder, adapter_name=ADAPTER))
        meta[f"{prefix}_lora_adapter_metadata"] = encoder.peft_config[ADAPTER].to_dict()
    return layers, meta
