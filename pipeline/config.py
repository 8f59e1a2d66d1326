"""The job's settings: the library's ExtractConfig plus the pipeline's own, validated up
front so that an unknown key or a bad value stops the run with its name. Reading the
YAML file is ``jobfile.load_job``; nothing here imports torch."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from breakscene.config import ExtractConfig, StrictModel

from batchjob.settings import ManifestConfig, ModelConfig, ResourcesConfig, SegmenterConfig, StorageConfig


class SelectionConfig(StrictModel):
    # How many concepts an image keeps is the job's one limit, ``extract.max_concepts``.
    # User masks (a manifest's mask_uris) all become concepts by default: the user drew or
    # chose them, and a low score on a hand-drawn mask of an unusual object is more often
    # the score's error than the mask's. True holds them to the same gate as automatic
    # masks (min_quality, area, overlap, centre), for manifests of masks of unknown origin.
    filter_user_masks: bool = False
    # quality is the mask's predicted IoU with its object (breakscene/quality/score.py, model
    # quality-v1): below 0.5 a mask is more likely "bad" (IoU < 0.5) than usable.
    min_quality: float = Field(0.5, ge=0, le=1)
    min_area: float = Field(0.02, ge=0, le=1)
    max_area: float = Field(0.6, gt=0, le=1)
    max_overlap: float = Field(0.1, ge=0, le=1)
    # The extractor trains on the centre square; a mask mostly outside it cannot be learned.
    min_center_fraction: float = Field(0.8, ge=0, le=1)


class DemoInputs(StrictModel):
    """Inputs made by the job itself: scikit-image's sample photos and generated scenes."""

    sample_photos: list[str] = Field(default_factory=lambda: ["astronaut", "coffee", "chelsea", "rocket"])
    generated_scenes: int = Field(2, ge=0)
    size: int = Field(256, ge=64)


class JobConfig(StrictModel):
    kind: Literal["extract"] = "extract"
    name: str = "breakscene"
    manifest: ManifestConfig | None = None
    demo_inputs: DemoInputs | None = None
    output: str
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    segmenter: SegmenterConfig = Field(default_factory=lambda: SegmenterConfig(kind="classical"))
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    force: bool = False  # redo images whose outputs are complete
    # "score": load, segment, score and select only (images + masks tables, no diffusion model)
    stop_after: Literal["score", "extract"] = "extract"
    # `breakscene run` exits 3 when more than this share of the manifest's rows failed
    # (0: any failure; a nightly job may allow some).
    max_failed_fraction: float = Field(0.0, ge=0, le=1)
    runtime_env: dict = Field(default_factory=dict)  # for `breakscene submit`

    @model_validator(mode="before")
    @classmethod
    def _one_max_concepts(cls, data):
        """``selection.max_concepts`` (job files before the one limit) is ``extract.max_concepts``."""
        selection = data.get("selection") if isinstance(data, dict) else None
        if not isinstance(selection, dict) or "max_concepts" not in selection:
            return data
        selection = dict(selection)
        value = selection.pop("max_concepts")
        extract = data.get("extract") if isinstance(data.get("extract"), dict) else {}
        if "max_concepts" in extract and extract["max_concepts"] != value:
            raise ValueError(f"selection.max_concepts ({value}) and extract.max_concepts "
                             f"({extract['max_concepts']}) differ: set extract.max_concepts only")
        return {**data, "selection": selection, "extract": {**extract, "max_concepts": value}}

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if not self.manifest and self.demo_inputs is None:
            raise ValueError("set 'manifest' (a manifest URI) or 'demo_inputs'")
        return self
