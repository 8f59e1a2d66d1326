"""Builders for the robustness study's tests: a small COCO-style annotation file."""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask


def write_coco_fixture(folder: Path, scenes: list[tuple[np.ndarray, list[np.ndarray], list[str]]]) -> Path:
    """``instances.json`` and one PNG per scene under ``folder``; ``scenes``: (image, masks,
    class names). Categories are numbered in name order, annotations as pycocotools writes
    them (RLE segmentation, bbox, area)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted({n for _, _, ns in scenes for n in ns})
    cats = [{"id": i + 1, "name": n, "supercategory": "thing"} for i, n in enumerate(names)]
    images, anns = [], []
    for i, (image, masks, ns) in enumerate(scenes):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": image.shape[0], "width": image.shape[1]})
        for m, n in zip(masks, ns):
            rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": names.index(n) + 1, "iscrowd": 0,
                         "area": float(m.sum()), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path
