"""Image generation from trained or loaded models, and the labelled sample grid."""
from __future__ import annotations

import contextlib
import textwrap

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageDraw, ImageFont

from .sampling import concept_prompt


def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def fused_attention(unet):
    """Plain SDPA in every layer while generating (no maps are needed), then back."""
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


@torch.no_grad()
def generate_images(pipe: StableDiffusionPipeline, prompt: str, seeds: list[int], steps: int,
                    guidance_scale: float, resolution: int) -> list[Image.Image]:
    """One image per seed; each seed has its own generator, so an image depends only on its seed."""
    device = pipe.unet.device
    images = []
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(seed)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                   height=resolution, width=resolution, output_type="pil")
        images.append(out.images[0])
    return images


def grid_prompts(tokens: list[str]) -> list[str]:
    """Each concept alone, then all together (when there is more than one)."""
    prompts = [concept_prompt([t]) for t in tokens]
    if len(tokens) > 1:
        prompts.append(concept_prompt(tokens))
    return prompts


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], cell: int = 128) -> Image.Image:
    """Rows of images with their prompt as a label on the left."""
    label_w = 180
    ncols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + ncols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        draw.multiline_text((4, r * cell + 4), "\n".join(textwrap.wrap(label, 26)), fill="black", font=font)
        for c, img in enumerate(images):
            grid.paste(img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.BICUBIC),
                       (label_w + c * cell, r * cell))
    return grid


def sample_grid(pipe: StableDiffusionPipeline, tokens: list[str], seeds: list[int], steps: int,
                guidance_scale: float, resolution: int) -> Image.Image:
    rows = [(p, generate_images(pipe, p, seeds, steps, guidance_scale, resolution)) for p in grid_prompts(tokens)]
    return labelled_grid(rows)
