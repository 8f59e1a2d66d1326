"""What each actor stage needs from the job, built once on the driver (as detectron2's
``from_config`` turns one config into a component's arguments): a stage gets its few
frozen settings, never the whole job to re-validate in every worker."""
from __future__ import annotations

from dataclasses import dataclass

from breakscene.config import ExtractConfig

from batchjob.settings import ModelConfig, SegmenterConfig, StorageConfig
from pipeline.config import JobConfig, SelectionConfig


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

    @classmethod
    def from_job(cls, job: JobConfig) -> "ExtractSettings":
        return cls(model=job.model, extract=job.extract, output=job.output, force=job.force, storage=job.storage)

    def forced(self) -> "ExtractSettings":
        return ExtractSettings(self.model, self.extract, self.output, True, self.storage)
