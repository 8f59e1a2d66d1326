"""Built-in random-weight models that need no download.

``tiny``: a few channels, 64 px images, for tests and the demo on a laptop CPU.
``sd21-base-random``: the exact shapes of Stable Diffusion 2.1 base (REFERENCE.md
section 1), random weights, for speed and memory measurements only.

Weights are drawn from a fixed seed, so the same preset is bit-identical in every
process: a bundle trained on a preset regenerates the same image after reload.
Outputs of a random-weight model carry no semantics; grids from them are noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import build_preset_tokenizer

PRESET_SEED = 20230526  # the paper's arXiv date: any fixed value works


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    vocab_size: int = 49408  # CLIP's; the generated tokenizer uses only the first ~730 rows
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            clip_sample=False,
            steps_offset=1,
        )
    )


TINY = Preset(
    name="tiny",
    resolution=64,
    # Three resolution levels so that latent/4 cross-attention layers exist (down_blocks.2
    # and up_blocks.0, 8x8), as at 16x16 in SD 2.1 base. No attention at the full latent
    # size: on a CPU it would cost a third of every step.
    unet=dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    ),
    text=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
    ),
    vocab_size=1024,
)

SD21_BASE_RANDOM = Preset(
    name="sd21-base-random",
    resolution=512,
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        projection_dim=512,
        hidden_act="gelu",
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, SD21_BASE_RANDOM)}


def build_preset(name: str):
    """Return (unet, vae, text_encoder, tokenizer, scheduler) for a preset, fp32, on CPU."""
    preset = PRESETS[name]
    tokenizer = build_preset_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_cfg = CLIPTextConfig(vocab_size=preset.vocab_size, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **preset.text)
        text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDPMScheduler(**preset.scheduler)
    return unet, vae, text_encoder, tokenizer, scheduler
