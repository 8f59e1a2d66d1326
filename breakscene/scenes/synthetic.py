"""Generated scenes whose masks are exact by construction: flat-coloured ellipses and boxes
on a noisy background. Deterministic per seed; used by the demo job, the robustness study
and the benchmarks wherever a scene with known masks is needed without any file."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

COLOURS = [(220, 60, 50), (50, 170, 80), (60, 90, 220), (230, 200, 40)]
LABELS = ["ball", "box"]  # object k is an ellipse ("ball") for even k, a box for odd k


def generated_scene(seed: int, size: int, n_objects: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W, 3) uint8 image and its boolean masks; masks do not overlap (an object that
    finds no free place in 100 tries is left out)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = (rng.normal(128, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
    taken = np.zeros((size, size), bool)
    masks = []
    for k in range(n_objects):
        for _ in range(100):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            ry, rx = rng.uniform(0.08, 0.18, 2) * size
            if k % 2 == 0:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            if not (mask & taken).any():
                break
        else:
            continue
        taken |= mask
        image[mask] = COLOURS[k % len(COLOURS)]
        masks.append(mask)
    return image, masks


def scene_labels(n_objects: int = 3) -> list[str]:
    """The words for ``generated_scene``'s objects, in order."""
    return [LABELS[k % 2] for k in range(n_objects)]


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG encoding of an image array (a boolean mask is written as 0 / 255)."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def generated_extract_scene(seed: int, size: int, name: str = "generated", max_concepts: int = 4):
    """``generated_scene`` as the extractor's checked ``Scene`` (image encoded as PNG)."""
    from breakscene.scenes.scene import build_scene

    image, masks = generated_scene(seed, size)
    return build_scene(png_bytes(image), name, [(f"m{i}", m) for i, m in enumerate(masks)], max_concepts)
