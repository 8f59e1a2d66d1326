"""Inputs the demo job makes for itself: scikit-image's bundled sample photos (segmented
automatically) and generated scenes whose masks are exact by construction (given as
``mask_uris``). Deterministic, so re-running the demo finds its earlier work done."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from breakscene.storage import exists, join, write_bytes

from .config import DemoInputs

COLOURS = [(220, 60, 50), (50, 170, 80), (60, 90, 220), (230, 200, 40)]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def generated_scene(seed: int, size: int, n_objects: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ellipses and boxes of flat colours on a noisy background; masks do not overlap."""
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


def build_demo_inputs(cfg: DemoInputs, out: str) -> str:
    """Write the demo's images and manifest under OUT/inputs; return the manifest URI."""
    import skimage.data

    root = join(out, "inputs")
    manifest = join(root, "manifest.jsonl")
    lines = []
    for name in cfg.sample_photos:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"demo_inputs.sample_photos: scikit-image has no sample photo {name!r}")
        uri = join(root, f"{name}.png")
        if not exists(uri):
            write_bytes(uri, _png(loader()))
        lines.append({"image_uri": uri, "image_id": name})
    for i in range(cfg.generated_scenes):
        image, masks = generated_scene(seed=i, size=cfg.size)
        uri = join(root, f"generated{i}", "img.png")
        mask_uris = [join(root, f"generated{i}", f"mask{k}.png") for k in range(len(masks))]
        if not exists(uri):
            for m_uri, m in zip(mask_uris, masks):
                write_bytes(m_uri, _png(m.astype(np.uint8) * 255))
            write_bytes(uri, _png(image))
        lines.append({"image_uri": uri, "image_id": f"generated{i}", "mask_uris": mask_uris,
                      "labels": ["ball", "box", "ball"][: len(masks)]})
    write_bytes(manifest, "\n".join(json.dumps(line) for line in lines).encode() + b"\n")
    return manifest
