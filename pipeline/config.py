"""The job's settings: the library's ExtractConfig plus the pipeline's own, validated up
front so that an unknown key or a bad value stops the run with its name. Reading the
YAML file is ``jobfile.load_job``; nothing here imports torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from breakscene.config import MAX_GROUP_IMAGES, ExtractConfig, StrictModel

from batchjob.settings import ManifestConfig, ModelConfig, ResourcesConfig, SegmenterConfig, StorageConfig


class SelectionConfig(StrictModel):
    """Which of an image's masks become concepts: those in the area range, mostly inside the
    centre square, at or above ``min_quality``, overlapping a chosen one by at most
    ``max_overlap``, best quality first, up to ``extract.max_concepts``. Automatic masks always
    go through it; user masks only with ``filter_user_masks``."""

    # How many concepts an image keeps is the job's one limit, ``extract.max_concepts``.
    # User masks (a manifest's mask_uris) all become concepts by default: the user drew or
    # chose them, and a low score on a hand-drawn mask of an unusual object is more often
    # the score's error than the mask's. True holds them to the same gate as automatic
    # masks (min_quality, area, overlap, centre), for manifests of masks of unknown origin.
    filter_user_masks: bool = Field(False, description="true: user masks (a manifest's mask_uris) go through the "
                                    "same gate as automatic masks; false: they all become concepts, the first "
                                    "extract.max_concepts of them")
    # quality is the mask's predicted IoU with its object (breakscene/quality/score.py, model
    # quality-v1): below 0.5 a mask is more likely "bad" (IoU < 0.5) than usable.
    min_quality: float = Field(0.5, ge=0, le=1, description="the lowest mask quality score (the mask's predicted IoU "
                               "with its object) that may become a concept: below 0.5 a mask is more likely bad "
                               "(IoU < 0.5) than usable")
    min_area: float = Field(0.02, ge=0, le=1, description="smallest mask, as a share of the image's area")
    max_area: float = Field(0.6, gt=0, le=1, description="largest mask, as a share of the image's area")
    max_overlap: float = Field(0.1, ge=0, le=1, description="most a mask may overlap one chosen before it, as a "
                                                             "share of the smaller of the two")
    # The extractor trains on the centre square; a mask mostly outside it cannot be learned.
    min_center_fraction: float = Field(0.8, ge=0, le=1)


class GroupsConfig(StrictModel):
    """Concept groups: manifest rows sharing a ``group`` value are learned together, one
    token per label (``pipeline/groups.py``)."""

    max_images: int = Field(16, ge=1, le=MAX_GROUP_IMAGES, description="most images one group is learned from: "
                            "a larger group is capped (the images with the smallest ids are learned; the rest are "
                            "skipped with a warning)")
    min_images: int = Field(1, ge=1, description="fewest images left after failures for a group to be learned; "
                                                 "below it every image of the group fails with the reason")
    draw: Literal["uniform", "balanced"] = Field("uniform", description="how a training step picks its image: "
                                                 "uniformly, or an object uniformly and then an image showing it")
    # A nightly dataset grows: a group already learned that gains images is learned again
    # from all of them (its bundle replaced) unless this is false, when the new images are
    # skipped with a warning and the bundle stays as it was.
    retrain_on_growth: bool = Field(True, description="a learned group that gains images on a later run is learned "
                                    "again from all its images; false: its new images are skipped with a warning")


class DemoInputs(StrictModel):
    """Inputs made by the job itself: scikit-image's sample photos and generated scenes."""

    sample_photos: list[str] = Field(default_factory=lambda: ["astronaut", "coffee", "chelsea", "rocket"],
                                     description="names of scikit-image's sample photos (skimage.data)")
    generated_scenes: int = Field(2, ge=0, description="generated scenes (shapes with exact masks) besides them")
    size: int = Field(256, ge=64, description="pixels a side of the generated scenes")


class JobConfig(StrictModel):
    kind: Literal["extract"] = Field("extract", description="an extraction job (a study job says `kind: study`)")
    name: str = Field("breakscene", description="the job's name, in the run summary and the submitted job's metadata")
    manifest: ManifestConfig | None = Field(None, description="the images (and optional masks) to process: a URI, "
                                                              "or {uri, columns}; this or demo_inputs")
    demo_inputs: DemoInputs | None = Field(None, description="inputs the job makes itself instead of a manifest")
    output: str = Field(description="folder or URI of the output: tables, bundles, run summaries")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="remote storage: fsspec options, "
                                                                          "timeouts and retries")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the diffusion model every concept is "
                                                                        "learned on")
    segmenter: SegmenterConfig = Field(default_factory=lambda: SegmenterConfig(kind="classical"),
                                       description="what finds masks in images that have none")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="which masks become concepts")
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig, description="concept groups: manifest rows with "
                                                                          "the same `group` learned together")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="actor pools: how many, "
                                                                                "with how many GPUs and CPUs")
    force: bool = False  # redo images whose outputs are complete
    # "score": load, segment, score and select only (images + masks tables, no diffusion model)
    stop_after: Literal["score", "extract"] = "extract"
    # `breakscene run` exits 3 when more than this share of the manifest's rows failed
    # (0: any failure; a nightly job may allow some).
    max_failed_fraction: float = Field(0.0, ge=0, le=1)
    runtime_env: dict = Field(default_factory=dict, description="Ray's runtime_env for `breakscene submit` "
                                                                "(working_dir, pip, env_vars, ...)")

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


# --------------------------------------------------------------------------------------
# What each actor stage needs from the job, built once on the driver (as detectron2's
# ``from_config`` turns one config into a component's arguments): a stage gets its few
# frozen settings, never the whole job to re-validate in every worker.
@dataclass(frozen=True)
class SegmentSettings:
    segmenter: SegmenterConfig
    storage: StorageConfig

    @classmethod
    def from_job(cls, job: JobConfig) -> "SegmentSettings":
        return cls(segmenter=job.segmenter, storage=job.storage)


@dataclass(frozen=True)
class SelectSettings:
    selection: SelectionConfig
    max_concepts: int  # the job's one limit (extract.max_concepts)
    storage: StorageConfig

    @classmethod
    def from_job(cls, job: JobConfig) -> "SelectSettings":
        return cls(selection=job.selection, max_concepts=job.extract.max_concepts, storage=job.storage)


@dataclass(frozen=True)
class ExtractSettings:
    model: ModelConfig
    extract: ExtractConfig
    output: str
    force: bool
    storage: StorageConfig
    groups: GroupsConfig = dataclasses.field(default_factory=GroupsConfig)

    @classmethod
    def from_job(cls, job: JobConfig) -> "ExtractSettings":
        return cls(model=job.model, extract=job.extract, output=job.output, force=job.force, storage=job.storage,
                   groups=job.groups)

    def forced(self) -> "ExtractSettings":
        return dataclasses.replace(self, force=True)
