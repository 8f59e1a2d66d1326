"""The study's job file and its grid: scenes x axes (any ExtractConfig field) x noise,
where noise is one clean cell, then family x severity (> 0) x seed, then real
segmenters' masks. A cell's id hashes everything that changes its result."""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from breakscene.config import ExtractConfig, StrictModel
from robustness.evaluation import EvalConfig
from breakscene.scenes.noise import FAMILIES
from breakscene.files.strictjson import to_json
from batchjob.settings import ModelConfig, ResourcesConfig, SegmenterConfig, StorageConfig

from robustness.groundtruth import SceneSources, StudyScene

CLEAN = "clean"
SEGMENTER = "segmenter:"  # family prefix of real segmenter noise ("segmenter:classical")


class NoiseGrid(StrictModel):
    """The noise each scene's clean masks get: one clean cell, then every family at every
    severity and seed, then the masks of real segmenters."""

    families: list[str] = Field(default_factory=lambda: list(FAMILIES),
                                description=f"noise families, of {', '.join(FAMILIES)}")
    severities: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                    description="severities in (0, 1], scaled by each object's size")
    seeds: list[int] = Field(default_factory=lambda: [0], description="noise seeds of each family and severity")
    segmenters: list[str] = Field(default_factory=list)  # real segmenter noise: classical, sam, tiny-sam

    @field_validator("families")
    @classmethod
    def _families(cls, v):
        unknown = [f for f in v if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown noise families {unknown}; known: {', '.join(FAMILIES)}")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v):
        if any(not 0 < s <= 1 for s in v):
            raise ValueError("severities must be in (0, 1]; the clean cell (severity 0) is always included")
        return v


class StudyConfig(StrictModel):
    REFUSED_KEYS: ClassVar[dict[str, str]] = {
        "force": "a study never recomputes finished cells; remove its outputs to redo them"}

    kind: Literal["study"] = Field(description="a noisy-mask study")
    name: str = Field("robustness", description="the study's name, in its summary and lease")
    output: str = Field(description="folder or URI of the study's cells and measurements")
    scenes: SceneSources = Field(default_factory=SceneSources)
    noise: NoiseGrid = Field(default_factory=NoiseGrid)
    axes: dict[str, list] = Field(default_factory=dict, description="extraction settings as grid axes: "
                                                                    "extract field -> values, e.g. "
                                                                    "{lambda_attn: [0, 0.01]}")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the diffusion model every concept is "
                                                                        "learned on")
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="what is measured of each concept")
    segmenter: SegmenterConfig = Field(default_factory=lambda: SegmenterConfig(kind="classical"),
                                       description="settings of the segmenters named in noise.segmenters "
                                                   "(each with its kind from there)")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="remote storage: fsspec options, "
                                                                          "timeouts and retries")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="actor pools: how many, "
                                                                                "with how many GPUs and CPUs")
    seconds_per_step: float | None = Field(None, gt=0)  # for the estimate when no cell is done yet
    runtime_env: dict = Field(default_factory=dict, description="Ray's runtime_env for `breakscene submit` "
                                                                "(working_dir, pip, env_vars, ...)")

    @model_validator(mode="after")
    def _axes_and_scenes(self) -> "StudyConfig":
        for combo in axis_combos(self.axes):  # every combination must be a valid ExtractConfig
            ExtractConfig.model_validate({**self.extract.model_dump(), **combo})
        if self.scenes.is_empty():
            raise ValueError("the study has no scenes: set scenes.generated (a count of generated scenes), "
                             "scenes.manifest (a URI, or {uri, columns}: rows with mask_uris) or scenes.coco")
        return self


def axis_combos(axes: dict[str, list]) -> list[dict]:
    keys = sorted(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))] or [{}]


# Settings added to the configs after studies were first written, by (block, path): left out
# of a cell's id while at this default, so that an upgrade does not rename (and so redo)
# every finished cell. A new setting joins this list with its default.
LATER_SETTINGS = {("model", ("runtime", "optimizer")): "adamw"}


def without_later_defaults(block: str, values: dict) -> dict:
    for (where, path), default in LATER_SETTINGS.items():
        parent = values
        for key in path[:-1]:
            parent = parent.get(key, {})
        if where == block and parent.get(path[-1], default) == default:
            parent.pop(path[-1], None)
    return values


def cell_id(cfg: StudyConfig, scene_id: str, family: str, severity: float, seed: int, axis: dict) -> str:
    payload = to_json([scene_id, family, severity, seed, axis,
                       without_later_defaults("model", cfg.model.model_dump()),
                       without_later_defaults("extract", cfg.extract.model_dump(mode="json")),
                       cfg.evaluation.model_dump()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def noise_settings(noise: NoiseGrid) -> list[tuple[str, float, int]]:
    """(family, severity, seed) of every cell of one scene and axis setting."""
    settings = [(CLEAN, 0.0, 0)]
    settings += [(f, s, seed) for f in noise.families for s in noise.severities for seed in noise.seeds]
    settings += [(f"{SEGMENTER}{name}", float("nan"), 0) for name in noise.segmenters]
    return settings


def build_cells(cfg: StudyConfig, scenes: list[StudyScene]) -> list[dict]:
    cells = []
    for scene, axis in itertools.product(scenes, axis_combos(cfg.axes)):
        for family, severity, seed in noise_settings(cfg.noise):
            cells.append({"cell_id": cell_id(cfg, scene.scene_id, family, severity, seed, axis),
                          "scene": to_json(asdict(scene)), "family": family, "severity": severity, "seed": seed,
                          "axis": to_json(axis, sort_keys=True)})
    return cells
