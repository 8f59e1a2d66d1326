"""A scene: one image and its concept masks, read, checked and prepared for training.

Everything that can be wrong with user input is detected here, before any model work,
and reported as a ``SceneError`` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import masks as M
from .errors import SceneError
from .storage import read_bytes

log = logging.getLogger(__name__)


@dataclass
class Scene:
    image: Image.Image  # RGB
    masks: np.ndarray  # (N, H, W) bool, same size as the image
    image_hash: str  # sha256 of the image file's bytes
    image_name: str = "image"
    mask_names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_concepts(self) -> int:
        return int(self.masks.shape[0])


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SceneError(f"image {name} cannot be decoded: {exc}") from None
    return img.convert("RGB")


def _read(uri: str, what: str) -> bytes:
    try:
        return read_bytes(str(uri))
    except FileNotFoundError:
        raise SceneError(f"{what} {uri} does not exist") from None
    except (OSError, PermissionError) as exc:
        raise SceneError(f"{what} {uri} cannot be read: {exc}") from None


def mask_from_image(img: Image.Image, name: str, size: tuple[int, int], warnings: list[str]) -> np.ndarray:
    """Boolean mask of ``size`` (w, h) from a mask image; checks it binarises and is non-empty."""
    plane = M.mask_channel(img)
    frac = M.mid_fraction(plane)
    if frac > M.MAX_MID_FRACTION:
        raise SceneError(f"mask {name} does not binarise: {frac:.0%} of its pixels are neither "
                         "dark nor bright (expected a black/white mask)")
    mask = M.binarize(plane)
    if mask.shape[::-1] != tuple(size):
        msg = f"mask {name} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}: resized"
        log.warning(msg)
        warnings.append(msg)
        mask = M.resize_mask(mask, size)
    if not mask.any():
        raise SceneError(f"mask {name} is empty (no foreground pixel)")
    return mask


def build_scene(image_bytes: bytes, image_name: str, masks: list[tuple[str, Image.Image | np.ndarray]],
                max_concepts: int) -> Scene:
    """Assemble and check a scene from an encoded image and decoded mask images or arrays."""
    if not masks:
        raise SceneError(f"image {image_name} has no masks: at least one concept mask is needed")
    if len(masks) > max_concepts:
        raise SceneError(f"image {image_name} has {len(masks)} masks, more than max_concepts={max_concepts}")
    image = decode_image(image_bytes, image_name)
    warnings: list[str] = []
    arrays = []
    for name, m in masks:
        img = Image.fromarray(m.astype(np.uint8) * 255) if isinstance(m, np.ndarray) else m
        arrays.append(mask_from_image(img, name, image.size, warnings))
    return Scene(image=image, masks=np.stack(arrays), image_hash=hashlib.sha256(image_bytes).hexdigest(),
                 image_name=image_name, mask_names=[n for n, _ in masks], warnings=warnings)


def load_mask_image(uri: str) -> Image.Image:
    data = _read(uri, "mask")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SceneError(f"mask {uri} cannot be decoded: {exc}") from None


def load_scene(image: str, masks: list[str], max_concepts: int = 4) -> Scene:
    image_bytes = _read(image, "image")
    if len(masks) > max_concepts:  # before decoding anything
        raise SceneError(f"image {image} has {len(masks)} masks, more than max_concepts={max_concepts}")
    return build_scene(image_bytes, image, [(m, load_mask_image(m)) for m in masks], max_concepts)


def scene_dir_files(folder: str | Path) -> tuple[str, list[str]]:
    """The authors' layout: ``img.jpg`` (or .png/.jpeg) and ``mask0.png``, ``mask1.png``, ..."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SceneError(f"scene folder {folder} does not exist")
    images = [folder / n for n in ("img.jpg", "img.jpeg", "img.png") if (folder / n).is_file()]
    if not images:
        raise SceneError(f"scene folder {folder} has no img.jpg / img.png")
    numbered = [(int(m.group(1)), p) for p in folder.iterdir()
                if (m := re.fullmatch(r"mask(\d+)\.png", p.name))]
    if not numbered:
        raise SceneError(f"scene folder {folder} has no mask0.png")
    return str(images[0]), [str(p) for _, p in sorted(numbered)]


def load_scene_dir(folder: str | Path, max_concepts: int = 4) -> Scene:
    image, masks = scene_dir_files(folder)
    return load_scene(image, masks, max_concepts)


@dataclass
class PreparedScene:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    masks: torch.Tensor  # (N, R, R) float {0, 1}


def center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def prepare_masks(masks: np.ndarray, resolution: int, names: list[str] | None = None) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, R, R) float, centre-cropped as ``prepare_scene`` crops."""
    box = center_square((masks.shape[2], masks.shape[1]))
    out = []
    for name, mask in zip(names or [f"mask{i}" for i in range(len(masks))], masks):
        crop = mask[box[1]:box[3], box[0]:box[2]]
        resized = M.resize_mask(crop, (resolution, resolution))
        if not resized.any():
            raise SceneError(f"mask {name} lies outside the centre square of its image: nothing left to learn")
        out.append(torch.from_numpy(resized.astype(np.float32)))
    return torch.stack(out)


def prepare_scene(scene: Scene, resolution: int) -> PreparedScene:
    """Centre-crop image and masks together to a square and resize to ``resolution``."""
    box = center_square(scene.image.size)
    img = scene.image.crop(box).resize((resolution, resolution), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return PreparedScene(pixels=pixels, masks=prepare_masks(scene.masks, resolution, scene.mask_names or None))
