"""The job's settings: the library's ExtractConfig plus the pipeline's own, validated up
front so that an unknown key or a bad value stops the run with its name. Reading the
YAML file is ``jobfile.load_job``; nothing here imports torch."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from breakscene.config import DEFAULT_MODEL, ExtractConfig, RuntimeConfig, StrictModel
from breakscene.storage import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, configure


class StorageConfig(StrictModel):
    """fsspec options per protocol, e.g. {"s3": {"client_kwargs": {"endpoint_url": ...}}},
    and the bounds of every remote call: connect and read timeout, retries with backoff.
    S3 settings left out here come from where the AWS tools look (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE, instance credentials);
    s3fs, the Delta table writer (delta-rs) and the lease all get the same resolved values
    (``breakscene.storage.s3_settings``)."""

    options: dict[str, dict] = Field(default_factory=dict)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)  # per request: connecting, and each wait for data
    retries: int = Field(DEFAULT_RETRIES, ge=0, le=10)  # after the first attempt (timeouts, refused, 5xx)

    def apply(self) -> None:
        """Make these the settings of this process (the driver, or a worker)."""
        configure(self.options, timeout_s=self.timeout_s, retries=self.retries)


class ModelConfig(StrictModel):
    id: str = DEFAULT_MODEL
    revision: str | None = None
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # channels-last, compile, checkpointing


class SegmenterConfig(StrictModel):
    kind: Literal["sam", "tiny-sam", "classical"] = "sam"
    checkpoint: str | None = None  # SAM weights (.pth): local path or fsspec URI
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)  # prompts per mask-decoder call (256 suits an 80 GB GPU)
    image_batch: int = Field(4, ge=1)  # images per image-encoder forward (and per Segment call)
    pred_iou_thresh: float = Field(0.88, ge=0, le=1)
    stability_score_thresh: float = Field(0.95, ge=0, le=1)
    min_mask_region_area: int = Field(0, ge=0)
    max_side: int = Field(1024, ge=64)  # images are downscaled to this before segmenting
    # classical (scikit-image Felzenszwalb) parameters
    scale: float = Field(300.0, gt=0)
    sigma: float = Field(0.8, ge=0)
    min_size_fraction: float = Field(0.01, gt=0, lt=1)

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> "SegmenterConfig":
        if self.kind == "sam" and not self.checkpoint:
            raise ValueError("segmenter.kind 'sam' needs segmenter.checkpoint (a .pth path or URI)")
        return self


class SelectionConfig(StrictModel):
    max_concepts: int = Field(4, ge=1, le=16)
    # quality is the mask's predicted IoU with its object (breakscene/quality.py, model
    # quality-v1): below 0.5 a mask is more likely "bad" (IoU < 0.5) than usable.
    min_quality: float = Field(0.5, ge=0, le=1)
    min_area: float = Field(0.02, ge=0, le=1)
    max_area: float = Field(0.6, gt=0, le=1)
    max_overlap: float = Field(0.1, ge=0, le=1)
    # The extractor trains on the centre square; a mask mostly outside it cannot be learned.
    min_center_fraction: float = Field(0.8, ge=0, le=1)


class ResourcesConfig(StrictModel):
    """Actor pools. GPU counts left at null ask for GPUs only when the cluster has them."""

    num_cpus: int | None = Field(None, ge=1)  # embedded local Ray only
    num_gpus: float | None = Field(None, ge=0)  # embedded local Ray only (logical GPUs)
    segment_actors: int = Field(1, ge=1)
    segment_gpus: float | None = Field(None, ge=0)
    extract_actors: int = Field(1, ge=1)
    extract_gpus: float | None = Field(None, ge=0)
    load_cpus: float = Field(0.25, gt=0)  # per load task (I/O bound: a share of a CPU)
    # The cluster adds nodes on demand (KubeRay / launcher autoscaler): its present size
    # says nothing, so the resource plan is not fitted to it (pipeline/resources.py).
    autoscaling: bool = False


class DemoInputs(StrictModel):
    """Inputs made by the job itself: scikit-image's sample photos and generated scenes."""

    sample_photos: list[str] = Field(default_factory=lambda: ["astronaut", "coffee", "chelsea", "rocket"])
    generated_scenes: int = Field(2, ge=0)
    size: int = Field(256, ge=64)


class ManifestConfig(StrictModel):
    """``manifest: URI`` or ``manifest: {uri: URI, columns: {image_uri: url, image_id: key}}``:
    a file, a folder or a glob of shards, and which of its columns hold the project's."""

    uri: str
    columns: dict[str, str] = Field(default_factory=dict)  # project column -> manifest column

    @model_validator(mode="before")
    @classmethod
    def _from_uri(cls, value):
        return {"uri": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> "ManifestConfig":
        from .manifest import COLUMNS

        unknown = sorted(set(self.columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"manifest.columns: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        return self


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

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if not self.manifest and self.demo_inputs is None:
            raise ValueError("set 'manifest' (a manifest URI) or 'demo_inputs'")
        if self.extract.max_concepts < self.selection.max_concepts:
            raise ValueError(f"extract.max_concepts ({self.extract.max_concepts}) is below "
                             f"selection.max_concepts ({self.selection.max_concepts})")
        return self
