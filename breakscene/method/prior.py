"""Class images for prior preservation: from a folder, or generated once per
(model, prompt, size, count, steps) and cached for every later scene."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from breakscene.config import PriorConfig
from breakscene.errors import BreakSceneError
from breakscene.extraction.generate import fused_attention, generate_images, models_pipeline
from breakscene.models.loading import DiffusionModels, SDXLModels, cache_root
from breakscene.files.storage import atomic_local_dir
from breakscene.files.strictjson import to_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
GENERATION_SEED = 0


def cache_key(model_id: str, revision: str | None, prompt: str, resolution: int, num: int, steps: int) -> str:
    payload = to_json([model_id, revision, prompt, resolution, num, steps, GENERATION_SEED])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_folder(folder: str | Path, num: int, resolution: int) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BreakSceneError(f"class data folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:num]
    if not files:
        raise BreakSceneError(f"class data folder {folder} holds no .png/.jpg image")
    images = []
    for f in files:
        try:
            images.append(Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC))
        except OSError as exc:
            raise BreakSceneError(f"class image {f} cannot be decoded: {exc}") from None
    return images


def class_images(models: DiffusionModels | SDXLModels, cfg: PriorConfig, resolution: int, progress: bool = True) -> list[Image.Image]:
    """The class images for prior preservation; generates and caches them on first use."""
    if cfg.class_data_dir:
        return load_folder(cfg.class_data_dir, cfg.num_class_images, resolution)
    key = cache_key(models.model_id, models.revision, cfg.class_prompt, resolution, cfg.num_class_images,
                    cfg.generation_steps)
    folder = cache_root() / "class_images" / key
    if not (folder / "images.json").is_file():  # the marker is written last
        pipe = models_pipeline(models)  # the same backbone as training
        with atomic_local_dir(folder) as tmp, fused_attention(models.unet):
            for i in tqdm(range(cfg.num_class_images), desc="class images", disable=not progress, leave=False):
                (img,) = generate_images(pipe, cfg.class_prompt, [GENERATION_SEED + i], cfg.generation_steps,
                                         7.5, resolution)
                img.save(tmp / f"{i:04d}.png")
            (tmp / "images.json").write_text(to_json({"model": models.model_id, "prompt": cfg.class_prompt,
                                                         "count": cfg.num_class_images}))
    return load_folder(folder, cfg.num_class_images, resolution)


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    import numpy as np

    from breakscene.scenes.scene import model_pixels

    return model_pixels(np.stack([np.asarray(i) for i in images]))
