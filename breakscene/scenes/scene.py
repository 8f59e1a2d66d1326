"""A scene: one image and its concept masks, read, checked and prepared for training.

Everything that can be wrong with user input is detected here, before any model work,
and reported as a ``SceneError`` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings as py_warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from breakscene.scenes.masks import (MAX_MID_FRACTION, SAME_REGION_IOU, binarize, center_square, has_alpha, mask_plane, mid_fraction, overlapping_pairs, resize_mask, unit_plane)
from breakscene.errors import SceneError, StorageError
from breakscene.files.storage import read_bytes

log = logging.getLogger(__name__)

# One rule for every command (extract and the pipeline): the still-image formats read, by
# PIL's format name, and the file extensions a scene folder's files may have (any case).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Decompression bombs: images above this many pixels are refused before decoding (PIL's
# default); BREAKSCENE_MAX_IMAGE_PIXELS overrides it (0: no limit).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Images with a side under this are refused: cropped and upscaled to the training
# resolution they hold no detail to learn, and a concept there spans at most two cells of
# the VAE's latent grid (a factor of 8).
MIN_IMAGE_SIDE = 16
# Formats whose later frames are no news: an MPO's first frame is the photo, the rest a
# phone's preview or depth picture.
FIRST_FRAME_IS_THE_PICTURE = frozenset({"MPO"})
FRAMES_KEY = "breakscene.frames"  # the frame count, carried in the decoded image's info


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


def max_image_pixels() -> int | None:
    raw = os.environ.get("BREAKSCENE_MAX_IMAGE_PIXELS", "")
    try:
        limit = int(raw) if raw else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise SceneError(f"BREAKSCENE_MAX_IMAGE_PIXELS={raw!r} is not a whole number") from None
    return limit if limit > 0 else None


def _reason(exc: BaseException) -> str:
    """An exception's message without object reprs such as ``<_io.BytesIO object at 0x...>``."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(exc)).strip()
    return text or type(exc).__name__


def open_image(data: bytes, name: str, what: str = "image") -> Image.Image:
    """Decode an image or mask file as people see it: format checked, size checked against
    the pixel limit before decoding, EXIF orientation applied (masks are drawn on the
    displayed photo)."""
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own check, at twice the limit, agrees with ours
    try:
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if limit and pixels > limit:
                raise SceneError(f"{what} {name} has {pixels} pixels, over the limit {limit} "
                                 "(set BREAKSCENE_MAX_IMAGE_PIXELS to raise it)")
            if img.format not in SUPPORTED_FORMATS:
                raise SceneError(f"{what} {name} has unsupported format {img.format} "
                                 f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
            img.load()
            frames = getattr(img, "n_frames", 1) if img.format not in FIRST_FRAME_IS_THE_PICTURE else 1
            img = ImageOps.exif_transpose(img)  # a copy: the frame count travels in its info
            if frames > 1:
                img.info[FRAMES_KEY] = frames
            return img
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise SceneError(f"{what} {name} has {found.group(1) if found else 'too many'} pixels, over the limit "
                         f"{limit} (set BREAKSCENE_MAX_IMAGE_PIXELS to raise it)") from None
    except UnidentifiedImageError:
        raise SceneError(f"{what} {name} cannot be decoded: not an image file "
                         f"({', '.join(sorted(SUPPORTED_FORMATS))})") from None
    except (OSError, ValueError, SyntaxError, TypeError, IndexError, ZeroDivisionError) as exc:
        raise SceneError(f"{what} {name} cannot be decoded: {_reason(exc)}") from None


def to_rgb(img: Image.Image, name: str, warnings: list[str] | None = None) -> Image.Image:
    """RGB of any mode: 16-bit and float planes scaled by their range (not clipped to white),
    CMYK and other colour profiles converted to sRGB, alpha dropped with a warning."""
    notes = frame_notes(img, name, "image")
    unit = unit_plane(img)
    if unit is not None:
        img = Image.fromarray(np.round(unit * 255).astype(np.uint8), "L")
    if has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            notes.append(f"image {name} has transparency: alpha dropped (transparent pixels keep their stored colour)")
        img = img.convert("RGBA").convert("RGB")  # the stored colours (a palette's, resolved)
    icc = img.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if "srgb" not in ImageCms.getProfileDescription(profile).lower():
                img = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            notes.append(f"image {name}: its colour profile could not be applied ({_reason(exc)}): dropped")
    for note in notes:
        log.warning(note)
    if warnings is not None:
        warnings.extend(notes)
    return img.convert("RGB")


def frame_notes(img: Image.Image, name: str, what: str) -> list[str]:
    """The warning for a file of several frames (multi-page TIFF, animated WebP / PNG), of
    which only the first is read."""
    frames = img.info.get(FRAMES_KEY, 1)
    return [f"{what} {name} has {frames} frames: the first is used"] if frames > 1 else []


def decode_image(data: bytes, name: str, warnings: list[str] | None = None) -> Image.Image:
    """An encoded image as the RGB picture people see (see ``open_image`` and ``to_rgb``);
    refused under ``MIN_IMAGE_SIDE`` pixels on a side."""
    img = open_image(data, name, "image")
    if min(img.size) < MIN_IMAGE_SIDE:
        raise SceneError(f"image {name} is {img.width}x{img.height} pixels: smaller than {MIN_IMAGE_SIDE} px on a "
                         "side, too small to learn a concept from")
    return to_rgb(img, name, warnings)


def _read(uri: str, what: str) -> bytes:
    try:
        return read_bytes(str(uri))
    except FileNotFoundError:
        raise SceneError(f"{what} {uri} does not exist") from None
    except IsADirectoryError:
        raise SceneError(f"{what} {uri} is a folder, not a file") from None
    except StorageError as exc:
        raise SceneError(f"{what} {exc}") from None
    except (OSError, PermissionError) as exc:
        raise SceneError(f"{what} {uri} cannot be read: {_reason(exc)}") from None


def mask_from_image(img: Image.Image, name: str, size: tuple[int, int], warnings: list[str]) -> np.ndarray:
    """Boolean mask of ``size`` (w, h) from a mask image; checks it binarises and is non-empty."""
    for note in frame_notes(img, name, "mask"):
        log.warning(note)
        warnings.append(note)
    plane = mask_plane(img)
    frac = mid_fraction(plane)
    if frac > MAX_MID_FRACTION:
        raise SceneError(f"mask {name} does not binarise: {frac:.0%} of its pixels are neither "
                         "dark nor bright (expected a black/white mask)")
    mask = binarize(plane)
    if mask.shape[::-1] != tuple(size):
        msg = f"mask {name} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}: resized"
        log.warning(msg)
        warnings.append(msg)
        mask = resize_mask(mask, size)
    if not mask.any():
        if plane.max() == 0:
            raise SceneError(f"mask {name} is empty (no foreground pixel)")
        raise SceneError(f"mask {name} has no pixel above half brightness (its brightest is {plane.max()} "
                         "of 255): a mask is white, or opaque, on black")
    return mask


def build_scene(image_bytes: bytes, image_name: str, masks: list[tuple[str, Image.Image | np.ndarray]],
                max_concepts: int) -> Scene:
    """Assemble and check a scene from an encoded image and decoded mask images or arrays."""
    if not masks:
        raise SceneError(f"image {image_name} has no masks: at least one concept mask is needed")
    if len(masks) > max_concepts:
        raise SceneError(f"image {image_name} has {len(masks)} masks, more than max_concepts={max_concepts}")
    warnings: list[str] = []
    image = decode_image(image_bytes, image_name, warnings)
    arrays = []
    for name, m in masks:
        img = Image.fromarray(m.astype(np.uint8) * 255) if isinstance(m, np.ndarray) else m
        arrays.append(mask_from_image(img, name, image.size, warnings))
    warnings.extend(overlap_warnings(arrays, [n for n, _ in masks]))
    return Scene(image=image, masks=np.stack(arrays), image_hash=hashlib.sha256(image_bytes).hexdigest(),
                 image_name=image_name, mask_names=[n for n, _ in masks], warnings=warnings)


def overlap_warnings(masks: list[np.ndarray], names: list[str]) -> list[str]:
    """A warning for each pair of concept masks whose tokens would compete for one region
    (``masks.overlapping_pairs``), naming them."""
    notes = []
    for o in overlapping_pairs(masks):
        first, second = sorted((o.smaller, o.larger))
        if o.iou >= SAME_REGION_IOU:
            what = f"masks {names[first]} and {names[second]} are nearly the same region (IoU {o.iou:.2f})"
        else:
            what = (f"mask {names[o.smaller]} lies inside mask {names[o.larger]} "
                    f"({o.contained:.0%} of its pixels; IoU {o.iou:.2f})")
        notes.append(f"{what}: their tokens will compete for it; give each concept its own region")
    for note in notes:
        log.warning(note)
    return notes


def load_mask_image(uri: str) -> Image.Image:
    return open_image(_read(uri, "mask"), uri, "mask")


def load_scene(image: str, masks: list[str], max_concepts: int = 4) -> Scene:
    image_bytes = _read(image, "image")
    if len(masks) > max_concepts:  # before decoding anything
        raise SceneError(f"image {image} has {len(masks)} masks, more than max_concepts={max_concepts}")
    return build_scene(image_bytes, image, [(m, load_mask_image(m)) for m in masks], max_concepts)


def scene_dir_files(folder: str | Path) -> tuple[str, list[str]]:
    """The authors' layout: ``img.jpg`` and ``mask0.png``, ``mask1.png``, ... Any supported
    extension, in any case (``mask1.PNG`` is mask 1); the masks in the order of their numbers."""
    folder = Path(folder)
    if not folder.exists():
        raise SceneError(f"scene folder {folder} does not exist")
    if not folder.is_dir():
        raise SceneError(f"scene folder {folder} is not a folder (give the image with --image and --mask)")
    ext = "|".join(re.escape(e[1:]) for e in EXTENSIONS)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if re.fullmatch(rf"img\.({ext})", p.name, re.IGNORECASE)]
    if not images:
        raise SceneError(f"scene folder {folder} has no img.jpg / img.png ({', '.join(EXTENSIONS)}, any case)")
    if len(images) > 1:
        raise SceneError(f"scene folder {folder} has several images ({', '.join(p.name for p in images)}): keep one")
    numbered: dict[int, Path] = {}
    for p in files:
        m = re.fullmatch(rf"mask(\d+)\.({ext})", p.name, re.IGNORECASE)
        if not m:
            continue
        if int(m.group(1)) in numbered:
            raise SceneError(f"scene folder {folder} has two files for mask {int(m.group(1))}: "
                             f"{numbered[int(m.group(1))].name} and {p.name}")
        numbered[int(m.group(1))] = p
    if not numbered:
        raise SceneError(f"scene folder {folder} has no mask0.png")
    return str(images[0]), [str(numbered[i]) for i in sorted(numbered)]


def load_scene_dir(folder: str | Path, max_concepts: int = 4) -> Scene:
    image, masks = scene_dir_files(folder)
    return load_scene(image, masks, max_concepts)


@dataclass
class PreparedScene:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    masks: torch.Tensor  # (N, R, R) float {0, 1}


def prepare_masks(masks: np.ndarray, resolution: int, names: list[str] | None = None) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, R, R) float, centre-cropped as ``prepare_scene`` crops."""
    box = center_square((masks.shape[2], masks.shape[1]))
    out = []
    for name, mask in zip(names or [f"mask{i}" for i in range(len(masks))], masks):
        crop = mask[box[1]:box[3], box[0]:box[2]]
        resized = resize_mask(crop, (resolution, resolution))
        if not resized.any():
            raise SceneError(f"mask {name} lies outside the centre square of its image: nothing left to learn")
        out.append(torch.from_numpy(resized.astype(np.float32)))
    return torch.stack(out)


def prepare_scene(scene: Scene, resolution: int) -> PreparedScene:
    """Centre-crop image and masks together to a square and resize to ``resolution``."""
    box = center_square(scene.image.size)
    img = scene.image.crop(box).resize((resolution, resolution), Image.BICUBIC)
    pixels = model_pixels(np.asarray(img))
    return PreparedScene(pixels=pixels, masks=prepare_masks(scene.masks, resolution, scene.mask_names or None))


def model_pixels(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], the models' pixel range."""
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32)).movedim(-1, -3) / 127.5 - 1.0


def rgb_values(pixels: torch.Tensor) -> torch.Tensor:
    """``model_pixels`` undone: rounded values 0..255 (exact for pixels it made)."""
    return ((pixels + 1.0) * 127.5).round().clamp(0, 255)
