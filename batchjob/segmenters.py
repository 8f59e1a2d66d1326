"""Automatic segmenters behind one interface, chosen from a registry.

A segmenter is built once per actor and called per image:
``segmenter(image: HxWx3 uint8) -> list[{"mask": HxW bool, "predicted_iou", "stability_score"}]``.

- ``sam``: Segment Anything's automatic mask generator with real weights.
- ``tiny-sam``: the same generator over a random-weight SAM with a small image encoder
  (tests and demos; its masks are arbitrary).
- ``classical``: scikit-image's Felzenszwalb graph segmentation, no weights at all.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from breakscene.errors import BreakSceneError
from breakscene.scenes.masks import resize_mask
from breakscene.models.loading import cache_root
from breakscene.files.storage import filesystem, is_remote

from batchjob.settings import SegmenterConfig

log = logging.getLogger(__name__)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def local_checkpoint(uri: str) -> Path:
    """A checkpoint readable from local disk; remote ones are copied once per node."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise BreakSceneError(f"SAM checkpoint {uri} does not exist")
        return path
    target = cache_root() / "sam" / (hashlib.sha256(uri.encode()).hexdigest()[:16] + ".pth")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fs, path = filesystem(uri)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        fs.get_file(path, str(tmp))
        os.replace(tmp, target)  # concurrent actors on one node: last rename wins, same bytes
    return target


def _precomputed_predictor(sam):
    """A SamPredictor whose ``set_image`` takes the next embedding from a queue filled by
    one batched image-encoder pass, and encodes by itself only when the queue is empty."""
    from segment_anything import SamPredictor

    class PrecomputedPredictor(SamPredictor):
        def __init__(self, model) -> None:
            super().__init__(model)
            self.queue: list[tuple[torch.Tensor, tuple[int, int]]] = []

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if not self.queue:
                return super().set_image(image, image_format)
            self.reset_image()
            self.features, self.input_size = self.queue.pop(0)
            self.original_size = image.shape[:2]
            self.is_image_set = True

    return PrecomputedPredictor(sam)


class SamSegmenter:
    def __init__(self, cfg: SegmenterConfig, device: str | None = None) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        sam = self.build_model().to(self.device).eval()
        self.generator = SamAutomaticMaskGenerator(
            sam, points_per_side=cfg.points_per_side, points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh,
            min_mask_region_area=cfg.min_mask_region_area, output_mode="binary_mask")
        self.generator.predictor = _precomputed_predictor(sam)  # one crop per image: one embedding each

    def build_model(self):
        from segment_anything import sam_model_registry

        return sam_model_registry[self.cfg.model_type](checkpoint=str(local_checkpoint(self.cfg.checkpoint)))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda"))

    def _embed(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Image embeddings, ``cfg.image_batch`` images per encoder forward."""
        predictor = self.generator.predictor
        inputs, sizes = [], []
        for image in images:
            resized = torch.as_tensor(predictor.transform.apply_image(image), device=self.device)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(resized.shape[-2:]))
            inputs.append(predictor.model.preprocess(resized))  # normalised, padded to the encoder size
        features = []
        for start in range(0, len(inputs), self.cfg.image_batch):
            with self._autocast():
                features.append(predictor.model.image_encoder(torch.cat(inputs[start:start + self.cfg.image_batch])))
        stacked = torch.cat(features)
        return [(stacked[i:i + 1], size) for i, size in enumerate(sizes)]

    @torch.no_grad()
    def segment_many(self, images: list[np.ndarray]) -> list[list[dict]]:
        """Masks of several images; their embeddings are computed in batches."""
        small = [_downscale(image, self.cfg.max_side) for image in images]
        predictor = self.generator.predictor
        predictor.queue = self._embed(small)
        try:
            results = []
            for image, scaled in zip(images, small):
                with self._autocast():
                    found = self.generator.generate(scaled)
                results.append([{"mask": resize_mask(m["segmentation"], image.shape[1::-1]),
                                 "predicted_iou": float(m["predicted_iou"]),
                                 "stability_score": float(m["stability_score"])} for m in found])
            return results
        finally:
            predictor.queue = []

    def __call__(self, image: np.ndarray) -> list[dict]:
        return self.segment_many([image])[0]


class TinySamSegmenter(SamSegmenter):
    """Random weights, 256 px encoder of depth 2 and width 64: seconds per image on a CPU."""

    SEED = 0

    def build_model(self):
        from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                               TwoWayTransformer)

        size, patch, dim = 256, 16, 256
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.SEED)
            return Sam(
                image_encoder=ImageEncoderViT(
                    depth=2, embed_dim=64, img_size=size, mlp_ratio=4, num_heads=2, patch_size=patch,
                    qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=dim,
                    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)),
                prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                             input_image_size=(size, size), mask_in_chans=16),
                mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3,
                                         iou_head_hidden_dim=dim,
                                         transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=512,
                                                                       num_heads=8)),
                pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
            )


class ClassicalSegmenter:
    """Felzenszwalb regions (scikit-image); small regions are dropped."""

    def __init__(self, cfg: SegmenterConfig, device: str | None = None) -> None:
        self.cfg = cfg

    def __call__(self, image: np.ndarray) -> list[dict]:
        from skimage.segmentation import felzenszwalb

        small = _downscale(image, min(self.cfg.max_side, 512))
        labels = felzenszwalb(small, scale=self.cfg.scale, sigma=self.cfg.sigma,
                              min_size=max(1, int(self.cfg.min_size_fraction * labels_area(small))))
        out = []
        for value in np.unique(labels):
            mask = labels == value
            if mask.mean() >= self.cfg.min_size_fraction:
                out.append({"mask": resize_mask(mask, image.shape[1::-1]), "predicted_iou": None,
                            "stability_score": None})
        return out


    def segment_many(self, images: list[np.ndarray]) -> list[list[dict]]:
        return [self(image) for image in images]


def labels_area(image: np.ndarray) -> int:
    return int(image.shape[0] * image.shape[1])


SEGMENTERS = {"sam": SamSegmenter, "tiny-sam": TinySamSegmenter, "classical": ClassicalSegmenter}


def build_segmenter(cfg: SegmenterConfig, device: str | None = None):
    return SEGMENTERS[cfg.kind](cfg, device)
