"""Image generation from trained or loaded models, and the labelled sample grid.

Every call is one batched pipeline call with one generator per image, so an image's
starting noise depends only on its seed. The same prompts and seeds in the same batch
give the same pixels bit for bit; the same seed in another batch gives the same image up
to float rounding (matrix kernels may round differently at another batch size).
"""
from __future__ import annotations

import contextlib
import math
import textwrap

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageDraw, ImageFont

from breakscene.method.union_sampling import concept_prompt
from breakscene.models.schedulers import make_scheduler, sampler_name

GRID_CELL = 128  # pixels per grid image; smaller images are enlarged with NEAREST (exact pixel copies)
GRID_LABEL_WIDTH = 180


def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config, sampler: str = "ddim") -> StableDiffusionPipeline:
    """A pipeline over in-memory models, sampling with ``sampler`` (a schedulers.SCHEDULERS name)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(sampler, scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_pipeline(unet, vae, text_encoders: tuple, tokenizers: tuple, scheduler_config, sampler: str = "ddim"):
    """A StableDiffusionXLPipeline over in-memory models (no invisible watermark: a bundle
    then generates the same pixels wherever it is loaded)."""
    from diffusers import StableDiffusionXLPipeline

    (te, te2), (tok, tok2) = text_encoders, tokenizers
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=make_scheduler(sampler, scheduler_config),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def models_pipeline(models, sampler: str = "ddim"):
    """The generation pipeline of a ``loading.DiffusionModels`` or ``loading.SDXLModels``."""
    m = models
    if m.family == "sdxl":
        return make_sdxl_pipeline(m.unet, m.vae, m.text_encoders, m.tokenizers, m.scheduler.config, sampler)
    return make_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler.config, sampler)


@contextlib.contextmanager
def fused_attention(unet):
    """Plain SDPA in every layer while generating (no maps are needed), then back."""
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def generators(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_images(pipe: StableDiffusionPipeline, prompt: str | list[str], seeds: list[int], steps: int,
                    guidance_scale: float, resolution: int | None = None, *, height: int | None = None,
                    width: int | None = None, negative_prompt: str | None = None,
                    lora_scale: float | None = None) -> list[Image.Image]:
    """One image per seed in one batched call; ``prompt`` is one prompt for all seeds or one per
    seed. Each image has its own generator, so its starting noise depends only on its seed."""
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=generators(seeds, pipe.unet.device),
               height=height or resolution, width=width or resolution, output_type="pil",
               negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
               cross_attention_kwargs=None if lora_scale is None else {"scale": lora_scale})
    return out.images


def grid_prompts(tokens: list[str]) -> list[str]:
    """Each concept alone, then all together (when there is more than one)."""
    prompts = [concept_prompt([t]) for t in tokens]
    if len(tokens) > 1:
        prompts.append(concept_prompt(tokens))
    return prompts


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], cell: int | tuple[int, int] = GRID_CELL) -> Image.Image:
    """Rows of images with their prompt as a label on the left; ``cell`` is a side or (width, height)."""
    label_w = GRID_LABEL_WIDTH
    cw, ch = (cell, cell) if isinstance(cell, int) else cell
    ncols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + ncols * cw, len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        draw.multiline_text((4, r * ch + 4), "\n".join(textwrap.wrap(label, 26)), fill="black", font=font)
        for c, img in enumerate(images):
            if img.size != (cw, ch):
                img = img.resize((cw, ch), Image.NEAREST if img.width < cw else Image.BICUBIC)
            grid.paste(img, (label_w + c * cw, r * ch))
    return grid


def grid_batch(tokens: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """The grid's one batch: every grid prompt with every seed, row by row."""
    prompts = grid_prompts(tokens)
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def sample_grid(pipe: StableDiffusionPipeline, tokens: list[str], seeds: list[int], steps: int,
                guidance_scale: float, resolution: int) -> Image.Image:
    """Each concept alone and all together, one column per seed, from one batched call."""
    prompts, batch_seeds = grid_batch(tokens, seeds)
    images = generate_images(pipe, prompts, batch_seeds, steps, guidance_scale, resolution)
    k = len(seeds)
    return labelled_grid([(prompts[i], images[i:i + k]) for i in range(0, len(images), k)])


def grid_cell(grid: Image.Image, row: int, col: int, size: int) -> Image.Image:
    """The image at (row, col) of a ``sample_grid`` of ``size``-pixel images, as it was
    generated when ``size`` divides the cell (enlarged by pixel copies), else as shown."""
    x, y = GRID_LABEL_WIDTH + col * GRID_CELL, row * GRID_CELL
    cell = grid.crop((x, y, x + GRID_CELL, y + GRID_CELL))
    if size < GRID_CELL and GRID_CELL % size == 0:
        return cell.resize((size, size), Image.NEAREST)
    return cell


def sampler_record(pipe: StableDiffusionPipeline, *, steps: int, guidance_scale: float, height: int, width: int,
                   seeds: list[int], prompts: list[str]) -> dict:
    """What a user needs to sample as the grid did: scheduler class and config, steps,
    guidance, size, and the batch (prompts and seeds in order, one generator per image)."""
    sched = pipe.scheduler
    # strict JSON: a non-finite float (DPM-Solver's lambda_min_clipped = -inf) is written as text
    config = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in dict(sched.config).items() if not k.startswith("_")}
    return {"name": sampler_name(sched), "class": type(sched).__name__, "config": config,
            "num_inference_steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
            "generator_device": pipe.unet.device.type, "seeds": seeds, "prompts": prompts,
            "batch": "one call: prompts[i] with torch.Generator(generator_device).manual_seed(seeds[i])",
            "cell_pixels": GRID_CELL, "label_width": GRID_LABEL_WIDTH}
