"""Scenes with clean masks for the robustness study: manifest rows with ``mask_uris``,
COCO annotations (pycocotools) with the paper's scene filter, and generated scenes whose
masks are exact by construction. Each source yields ``StudyScene`` objects."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from breakscene.config import StrictModel
from breakscene.errors import SceneError
from breakscene.scenes.scene import decode_image, load_mask_image, mask_from_image
from breakscene.files.storage import read_bytes
from breakscene.scenes.synthetic import generated_scene, png_bytes, scene_labels
from batchjob.settings import ManifestConfig
from batchjob.manifest import read_manifest


@dataclass
class StudyScene:
    scene_id: str
    image_uri: str | None  # None: the image is generated in the worker from ``generated_seed``
    mask_uris: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    generated_seed: int | None = None
    generated_size: int = 256
    coco: dict | None = None  # {"annotations": path, "image_id": int, "ann_ids": [...]}


class CocoSource(StrictModel):
    """COCO scenes as the paper chose them: images with at least ``min_instances`` segments,
    each covering at least ``min_area`` of the image."""

    annotations: str  # instances_*.json
    images: str  # folder (or URI prefix) of the images
    max_scenes: int = Field(50, ge=1, description="scenes taken, in image id order")
    min_instances: int = Field(2, ge=1)  # the paper: >= 2 "thing" segments ...
    min_area: float = Field(0.15, gt=0, le=1)  # ... each covering >= 15% of the image
    max_instances: int = Field(4, ge=1, description="the largest this many segments of a scene are its masks")
    exclude_classes: list[str] = Field(default_factory=list, description="COCO class names left out")


class SceneSources(StrictModel):
    """Where the study's scenes come from (a study needs at least one). ``manifest`` is the same spec
    as an extraction job's (a URI, or ``{uri, columns}``), its rows with ``mask_uris``."""

    generated: int = Field(0, ge=0, description="generated scenes (shapes with exact masks)")
    generated_size: int = Field(256, ge=64, description="pixels a side of the generated scenes")
    manifest: ManifestConfig | None = Field(None, description="photos with their clean masks: rows with mask_uris")
    coco: CocoSource | None = Field(None, description="scenes from COCO annotations, filtered as in the paper")

    def is_empty(self) -> bool:
        return not (self.generated or self.manifest or self.coco)


def coco_scenes(src: CocoSource) -> list[StudyScene]:
    from pycocotools.coco import COCO

    coco = COCO(src.annotations)
    excluded = {c["id"] for c in coco.loadCats(coco.getCatIds()) if c["name"] in set(src.exclude_classes)}
    scenes = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        area = info["width"] * info["height"]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
                if a["category_id"] not in excluded and a["area"] >= src.min_area * area]
        if len(anns) < src.min_instances:
            continue
        anns = sorted(anns, key=lambda a: -a["area"])[: src.max_instances]
        names = [coco.loadCats(a["category_id"])[0]["name"] for a in anns]
        scenes.append(StudyScene(scene_id=f"coco-{image_id}", image_uri=f"{src.images.rstrip('/')}/{info['file_name']}",
                                 labels=names, coco={"annotations": src.annotations, "image_id": image_id,
                                                     "ann_ids": [a["id"] for a in anns]}))
        if len(scenes) == src.max_scenes:
            break
    return scenes


def collect_scenes(src: SceneSources) -> list[StudyScene]:
    scenes = [StudyScene(scene_id=f"generated{i}", image_uri=None, generated_seed=i, generated_size=src.generated_size,
                         labels=scene_labels()) for i in range(src.generated)]
    if src.manifest:
        for row in read_manifest(src.manifest.uri, dict(src.manifest.columns)):
            scenes.append(StudyScene(scene_id=row["image_id"] or f"row{row['manifest_row']}", image_uri=row["image_uri"],
                                     mask_uris=row["mask_uris"], labels=row["labels"]))
    if src.coco:
        scenes += coco_scenes(src.coco)
    return scenes


def load_clean(scene: StudyScene) -> tuple[bytes, np.ndarray]:
    """(encoded image, (N, H, W) clean masks); raises BreakSceneError for unusable input."""
    if scene.generated_seed is not None:
        image, masks = generated_scene(scene.generated_seed, scene.generated_size)
        return png_bytes(image), np.stack(masks)
    data = read_bytes(scene.image_uri) if scene.image_uri else b""
    image = decode_image(data, scene.image_uri)
    if scene.coco:
        coco = coco_index(scene.coco["annotations"])
        masks = [coco.annToMask(coco.loadAnns(a)[0]).astype(bool) for a in scene.coco["ann_ids"]]
    else:
        if not scene.mask_uris:
            raise SceneError(f"scene {scene.scene_id} has no clean masks (mask_uris is empty)")
        masks = [mask_from_image(load_mask_image(u), u, image.size, []) for u in scene.mask_uris]
    return data, np.stack(masks)


@functools.cache
def coco_index(path: str):
    """pycocotools' index of an annotation file, built once per file and process."""
    from pycocotools.coco import COCO

    return COCO(path)
