"""Settings every batch job kind shares (the extraction pipeline's ``JobConfig`` and the
robustness study's ``StudyConfig`` are built from them): storage, the diffusion model, the
segmenter, actor resources and the manifest. Nothing here imports torch."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from breakscene.config import DEFAULT_MODEL, RuntimeConfig, StrictModel
from breakscene.files.storage import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, configure


def apply_storage(settings: "StorageConfig | dict | None") -> None:
    """Make the job's storage settings (a ``StorageConfig``, or one as a dict) this
    process's: every worker entry applies them this one way, timeouts and retries
    included, so that no worker keeps the timeouts it happened to get first."""
    if not isinstance(settings, StorageConfig):
        settings = StorageConfig(**(settings or {}))
    settings.apply()


class StorageConfig(StrictModel):
    """fsspec options per protocol, e.g. {"s3": {"client_kwargs": {"endpoint_url": ...}}},
    and the bounds of every remote call: connect and read timeout, retries with backoff.
    S3 settings left out here come from where the AWS tools look (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE, instance credentials);
    s3fs, the Delta table writer (delta-rs) and the lease all get the same resolved values
    (``breakscene.files.storage.s3_settings``)."""

    options: dict[str, dict] = Field(default_factory=dict, description="fsspec options per protocol, e.g. "
                                     "{s3: {client_kwargs: {endpoint_url: ...}}}")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)  # per request: connecting, and each wait for data
    retries: int = Field(DEFAULT_RETRIES, ge=0, le=10)  # after the first attempt (timeouts, refused, 5xx)

    def apply(self) -> None:
        """Make these the settings of this process (the driver, or a worker)."""
        configure(self.options, timeout_s=self.timeout_s, retries=self.retries)


class ModelConfig(StrictModel):
    """The diffusion model: a preset, a diffusers folder, an fsspec URI of one, or a hub id."""

    id: str = Field(DEFAULT_MODEL, description="a preset such as tiny (random weights), a diffusers folder, an "
                                               "fsspec URI of one, or a hub id")
    revision: str | None = Field(None, description="the model's hub revision (branch, tag or commit)")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # channels-last, compile, checkpointing


class SegmenterConfig(StrictModel):
    """Finds masks in the images that come without them: Segment Anything's automatic mask
    generator (``sam``, real weights; ``tiny-sam``, random weights for tests) or scikit-image's
    Felzenszwalb segmentation (``classical``, no weights)."""

    kind: Literal["sam", "tiny-sam", "classical"] = Field("sam", description="which segmenter")
    checkpoint: str | None = None  # SAM weights (.pth): local path or fsspec URI
    model_type: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="SAM's image encoder, as the "
                                                                                "checkpoint was trained")
    points_per_side: int = Field(32, ge=1, description="SAM: a grid of this many point prompts a side")
    points_per_batch: int = Field(64, ge=1)  # prompts per mask-decoder call (256 suits an 80 GB GPU)
    image_batch: int = Field(4, ge=1)  # images per image-encoder forward (and per Segment call)
    pred_iou_thresh: float = Field(0.88, ge=0, le=1, description="SAM: drop masks whose predicted IoU is below")
    stability_score_thresh: float = Field(0.95, ge=0, le=1, description="SAM: drop masks whose stability score "
                                                                        "is below")
    min_mask_region_area: int = Field(0, ge=0, description="SAM: remove islands and holes smaller than this many "
                                                           "pixels (0: off)")
    max_side: int = Field(1024, ge=64)  # images are downscaled to this before segmenting
    # classical (scikit-image Felzenszwalb) parameters
    scale: float = Field(300.0, gt=0, description="classical: Felzenszwalb's scale (larger: larger segments)")
    sigma: float = Field(0.8, ge=0, description="classical: Gaussian smoothing before segmenting")
    min_size_fraction: float = Field(0.01, gt=0, lt=1, description="classical: smallest segment, as a share of "
                                                                   "the image's area")

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> "SegmenterConfig":
        if self.kind == "sam" and not self.checkpoint:
            raise ValueError("segmenter.kind 'sam' needs segmenter.checkpoint (a .pth path or URI)")
        return self


class ResourcesConfig(StrictModel):
    """Actor pools. GPU counts left at null ask for GPUs only when the cluster has them."""

    num_cpus: int | None = Field(None, ge=1)  # embedded local Ray only
    num_gpus: float | None = Field(None, ge=0)  # embedded local Ray only (logical GPUs)
    segment_actors: int = Field(1, ge=1, description="segmenter actors (each holds its model)")
    segment_gpus: float | None = Field(None, ge=0, description="GPUs per segmenter actor (null: a quarter "
                                                               "GPU where the extraction actors leave that spare, "
                                                               "else none)")
    extract_actors: int = Field(1, ge=1, description="extraction actors (each holds the diffusion model)")
    extract_gpus: float | None = Field(None, ge=0, description="GPUs per extraction actor (null: one when "
                                                               "the cluster has a GPU, else none)")
    load_cpus: float = Field(0.25, gt=0)  # per load task (I/O bound: a share of a CPU)
    # The cluster adds nodes on demand (KubeRay / launcher autoscaler): its present size
    # says nothing, so the resource plan is not fitted to it (batchjob/cluster.py).
    autoscaling: bool = Field(False, description="true on a cluster that adds nodes on demand (KubeRay or "
                                                 "launcher autoscaler): the job is not fitted to its present size")


class ManifestConfig(StrictModel):
    """``manifest: URI`` or ``manifest: {uri: URI, columns: {image_uri: url, image_id: key}}``:
    a file, a folder or a glob of shards, and which of its columns hold the project's."""

    uri: str = Field(description="a manifest file (Parquet, JSON Lines, CSV), a folder of shards or a "
                                     "glob")
    columns: dict[str, str] = Field(default_factory=dict, description="project column -> the manifest's column, "
                                                                      "e.g. {image_uri: url, image_id: key}")

    @model_validator(mode="before")
    @classmethod
    def _from_uri(cls, value):
        return {"uri": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> "ManifestConfig":
        from batchjob.manifest import COLUMNS

        unknown = sorted(set(self.columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"manifest.columns: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        return self
