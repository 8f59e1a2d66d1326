"""Built-in random-weight models that need no download.

``tiny``: a few channels, 64 px images, for tests and the demo on a laptop CPU.
``sd21-base-random``: the exact shapes of Stable Diffusion 2.1 base (REFERENCE.md
section 1), random weights, for speed and memory measurements only.
``sdxl-tiny`` and ``sdxl-base-random``: the same two for Stable Diffusion XL (two text
encoders, micro-conditioning), in ``SDXL_PRESETS``; ``PRESETS`` holds the SD 1.x/2.x family.

Weights are drawn from a fixed seed, so the same preset is bit-identical in every
process: a bundle trained on a preset regenerates the same image after reload.
Outputs of a random-weight model carry no semantics; grids from them are noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from breakscene.models.tokenizer import build_preset_tokenizer

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
        text_encoder = CLIPTextModel(text_config(tokenizer, preset.vocab_size, preset.text))
    scheduler = DDPMScheduler(**preset.scheduler)
    return unet, vae, text_encoder, tokenizer, scheduler


# -- Stable Diffusion XL ------------------------------------------------------------------

SDXL_TIME_IDS = 6  # original size, crop top-left, target size: (h, w) each, SDXL's micro-conditioning


@dataclass(frozen=True)
class SDXLPreset:
    """SDXL's parts: a CLIP ViT-L text encoder (``text``) and an OpenCLIP bigG one with a
    projection (``text_2``); the UNet attends to both hidden states side by side and adds
    the pooled bigG embedding and the time ids to its time embedding."""
    name: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    text_2: dict[str, Any]
    vocab_size: int = 49408
    # the sampler SDXL base ships with (its scheduler/scheduler_config.json)
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
            use_karras_sigmas=False,
        )
    )


def sdxl_unet(text_hidden: int, text_2_hidden: int, text_2_projection: int, time_embed_dim: int,
              **shape: Any) -> dict[str, Any]:
    """An SDXL UNet config: cross-attention over both encoders' hidden states, and an added
    embedding of the pooled bigG vector and the six time ids."""
    return dict(
        in_channels=4, out_channels=4, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_hidden + text_2_hidden,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * time_embed_dim + text_2_projection,
        **shape,
    )


SDXL_TINY = SDXLPreset(
    name="sdxl-tiny",
    resolution=64,
    # SDXL's layout at tiny width: no attention at the full latent size, cross-attention at
    # latent/2 and latent/4, more transformer layers at the lowest level (SDXL: 2 and 10).
    unet=sdxl_unet(32, 32, 32, 8, sample_size=32, block_out_channels=(32, 32, 64), layers_per_block=1,
                   transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), norm_num_groups=8),
    vae=TINY.vae,
    text=dict(TINY.text, hidden_act="quick_gelu"),  # CLIP ViT-L's activation
    text_2=dict(TINY.text, num_hidden_layers=3),  # the UNet reads the penultimate layer of both
    vocab_size=1024,
)

SDXL_BASE_RANDOM = SDXLPreset(
    name="sdxl-base-random",
    resolution=1024,
    # stabilityai/stable-diffusion-xl-base-1.0's configs
    unet=sdxl_unet(768, 1280, 1280, 256, sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20)),
    vae=dict(SD21_BASE_RANDOM.vae, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
)

SDXL_PRESETS: dict[str, SDXLPreset] = {p.name: p for p in (SDXL_TINY, SDXL_BASE_RANDOM)}


def preset_family(name: str) -> str | None:
    """"sd" (SD 1.x/2.x), "sdxl", or None for a name that is no preset."""
    return "sd" if name in PRESETS else "sdxl" if name in SDXL_PRESETS else None


def text_config(tokenizer, vocab_size: int, shape: dict[str, Any]) -> CLIPTextConfig:
    # the tokenizer's own eos id: CLIP pools at the first eos (with the legacy id 2 it would
    # pool at the largest id, which is a learned token's once tokens are added)
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)


def build_sdxl_preset(name: str) -> dict[str, Any]:
    """An SDXL preset's parts, fp32 on CPU (or the ambient ``torch.device``), keyed as
    ``StableDiffusionXLPipeline``'s arguments."""
    preset = SDXL_PRESETS[name]
    tokenizer = build_preset_tokenizer()
    tokenizer_2 = build_preset_tokenizer(pad_token="!")  # SDXL's tokenizer_2 pads with "!", as OpenCLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        parts = dict(
            unet=UNet2DConditionModel(**preset.unet),
            vae=AutoencoderKL(**preset.vae),
            text_encoder=CLIPTextModel(text_config(tokenizer, preset.vocab_size, preset.text)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, preset.vocab_size, preset.text_2)),
        )
    with torch.device("cpu"):  # its tables stay real when the modules are built on "meta"
        scheduler = EulerDiscreteScheduler(**preset.scheduler)
    return dict(parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)
