"""The mask quality model: evidence columns in, predicted IoU in [0, 1] out.

A standardised linear model fitted by ridge regression on the IoU of noisy masks with
their clean masks (``python -m benchmarks quality --fit`` writes it), stored as JSON
(feature names, means, scales, coefficients): no pickle, loadable anywhere numpy is.

    quality = clip(intercept + sum_i coef_i * (x_i - mean_i) / scale_i, 0, 1)

SAM's own ``predicted_iou`` x ``stability_score`` is not among the fitted features (no SAM
masks with ground truth to fit on here): where present it is blended in with the fixed,
documented weight ``sam_weight`` (``blend``); where absent the image model stands alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

MODEL_FILE = "quality_model_v1.json"
SAM_WEIGHT = 0.25  # share of SAM's self-assessment in the blend (a prior, not fitted)


@dataclass(frozen=True)
class QualityModel:
    version: str
    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    sam_weight: float = SAM_WEIGHT
    info: dict = field(default_factory=dict)  # how it was fitted and how it scored (documentation)

    @classmethod
    def from_dict(cls, d: dict) -> "QualityModel":
        n = len(d["features"])
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "coef")}
        if any(a.shape != (n,) for a in arrays.values()):
            raise ValueError(f"quality model {d.get('version')!r}: mean/scale/coef must have {n} entries")
        return cls(version=d["version"], features=list(d["features"]), intercept=float(d["intercept"]),
                   sam_weight=float(d.get("sam_weight", SAM_WEIGHT)), info=d.get("info", {}), **arrays)

    def to_dict(self) -> dict:
        return {"version": self.version, "features": self.features, "mean": self.mean.round(6).tolist(),
                "scale": self.scale.round(6).tolist(), "coef": self.coef.round(6).tolist(),
                "intercept": round(self.intercept, 6), "sam_weight": self.sam_weight, "info": self.info}

    def predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """(N, len(features)) evidence -> (N,) predicted IoU, before any SAM blend."""
        z = (np.asarray(rows, np.float64) - self.mean) / self.scale
        return np.clip(self.intercept + z @ self.coef, 0.0, 1.0)

    def predict(self, evidence: dict) -> float:
        """Predicted IoU of one mask from its evidence dict (SAM blended where present)."""
        image_q = float(self.predict_rows(np.array([[evidence[k] for k in self.features]]))[0])
        return blend(image_q, evidence.get("predicted_iou"), evidence.get("stability_score"), self.sam_weight)


def blend(image_quality: float, predicted_iou: float | None, stability_score: float | None,
          weight: float = SAM_WEIGHT) -> float:
    """Image-model quality, moved towards SAM's self-assessment where SAM gave one."""
    sam = [min(1.0, max(0.0, v)) for v in (predicted_iou, stability_score)
           if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not sam:
        return image_quality
    return float((1 - weight) * image_quality + weight * math.prod(sam))


@lru_cache(maxsize=1)
def load_model(path: str | None = None) -> QualityModel:
    """The shipped model (``breakscene/quality/data/quality_model_v1.json``) or one at ``path``."""
    if path is None:
        text = resources.files("breakscene.quality").joinpath("data", MODEL_FILE).read_text()
    else:
        with open(path) as f:
            text = f.read()
    return QualityModel.from_dict(json.loads(text))


def fit_model(rows: np.ndarray, iou: np.ndarray, features: list[str], *, version: str, alpha: float = 1.0,
              info: dict | None = None) -> QualityModel:
    """Ridge regression of IoU on standardised evidence (deterministic: closed form)."""
    from sklearn.linear_model import Ridge

    rows = np.asarray(rows, np.float64)
    mean = rows.mean(axis=0)
    scale = rows.std(axis=0)
    scale[scale < 1e-9] = 1.0
    reg = Ridge(alpha=alpha).fit((rows - mean) / scale, np.asarray(iou, np.float64))
    return QualityModel(version=version, features=list(features), mean=mean, scale=scale,
                        coef=np.asarray(reg.coef_, np.float64), intercept=float(reg.intercept_), info=info or {})
