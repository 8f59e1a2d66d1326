"""Ray Data stages, each ``pyarrow.Table -> pyarrow.Table`` over the typed row of
``pipeline/row.py`` (nested columns: no stage parses what the one before it wrote). The
actor stages are classes whose setup (config, storage settings) is done once in
``__init__``; their models are built there (``Extract``) or on first use (``Segment``:
rows with user masks need none). A row that fails gets ``status`` failed and an
``error`` message and flows on, so one bad image never stops the dataset.

The photograph is fetched once (load) and travels on as ``image_bytes``; each stage that
needs its pixels (load's checks, an automatic segmenter, the score's evidence, the
extraction) decodes it once.
"""
from __future__ import annotations

import hashlib
import logging
import time
import traceback

import numpy as np
import pyarrow as pa

from breakscene.scenes.masks import decode_rle, encode_rle
from breakscene.errors import BreakSceneError, StorageError, output_fault
from breakscene.quality.score import score_masks, select_masks
# SUPPORTED_FORMATS: the library's one format rule (extract and the pipeline), re-exported
from breakscene.scenes.scene import (SUPPORTED_FORMATS, build_scene, decode_image, load_mask_image,  # noqa: F401
                              mask_from_image, overlap_warnings)
from breakscene.files.storage import read_bytes
from breakscene.files.strictjson import finite

from pipeline.records import (DONE_STATUSES, build_record, bundle_uri, clear_partial_bundle, read_record, record_uri, uri_id, write_record)
from batchjob.artifacts import write_output
from pipeline.row import batch_like, rows_of
from batchjob.settings import apply_storage
from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
from pipeline.records import Status

log = logging.getLogger(__name__)
USER = "user"  # the source of a mask the manifest gave


def fail_row(row: dict, exc: BaseException, stage: str) -> None:
    """The row failed at ``stage``: its status and one-line error (a traceback in the log
    for an error that is not the project's own)."""
    row["status"] = Status.FAILED
    if isinstance(exc, BreakSceneError):
        row["error"] = f"{stage}: {exc}"
    else:
        row["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        log.error("%s failed on %s\n%s", stage, row.get("image_uri"), traceback.format_exc())


def _time(row: dict, stage: str, seconds: float) -> None:
    row["timings"] = {**(row["timings"] or {}), stage: round(seconds, 4)}


def _warn(row: dict, messages: list[str]) -> None:
    if messages:
        row["warnings"] = [*row["warnings"], *messages]


class ContentClaims:
    """Which manifest row owns each content-hash id in this run (a Ray actor): two rows
    of the same picture without explicit ids get the same id and must not both be
    segmented and extracted. A batch claims all its ids in one call (a call per row made
    100,000 rows of one picture a quarter of an hour of round trips). A retried row
    claims again with its own row label and keeps its claim."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def claim(self, image_ids: list[str], labels: list[str]) -> list[str]:
        """The label of the row that owns each id (the first to claim it)."""
        return [self.owner.setdefault(i, label) for i, label in zip(image_ids, labels)]


def read_image(row: dict) -> bytes:
    """The row's encoded picture: the bytes it carries, else fetched again (a concept
    group's earlier image, rebuilt from its record)."""
    return row["image_bytes"] or _fetch(row["image_uri"])


def _fetch(uri: str) -> bytes:
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise BreakSceneError(f"image {uri} does not exist") from None
    except IsADirectoryError:
        raise BreakSceneError(f"image {uri} is a folder, not a file") from None
    except StorageError as exc:  # timeout, HTTP status, refused, credentials: said as such
        raise BreakSceneError(f"image {exc}") from None


def load_images(batch: pa.Table, storage: dict | None = None, claims=None) -> pa.Table:
    """Fetch and decode each image; assign a content-hash id where the manifest gave none.
    ``claims`` (a ContentClaims actor, or an instance): rows of content an earlier row
    holds are marked "duplicate" before decoding, with one call per batch (rows repeating
    an id-less row's URI never get here: ``shards.read_shard``). Rows that are not
    "ok" pass untouched.
    ``storage``: the job's storage settings (``StorageConfig`` as a dict: fsspec options,
    the timeout and retries of each fetch). A plain task: no model to keep, so no actor."""
    apply_storage(storage)
    rows = rows_of(batch)
    todo = [r for r in rows if r["status"] == Status.OK]
    seconds = [0.0] * len(todo)
    fetched: dict[str, bytes] = {}  # a URI repeated with explicit ids is fetched once per batch
    hashed = []
    for i, row in enumerate(todo):
        start = time.perf_counter()
        try:
            data = fetched[row["image_uri"]] if row["image_uri"] in fetched else _fetch(row["image_uri"])
            fetched[row["image_uri"]] = row["image_bytes"] = data
            if not row["image_id"]:
                row["image_id"] = hashlib.sha256(data).hexdigest()[:16]
                hashed.append(row)
        except Exception as exc:  # noqa: BLE001 - recorded per row
            _load_failed(row, exc)
        seconds[i] += time.perf_counter() - start
    start = time.perf_counter()
    _claim(hashed, claims)
    share = (time.perf_counter() - start) / max(1, len(todo))
    for i, row in enumerate(todo):
        start = time.perf_counter()
        if row["status"] == Status.OK:
            _decode(row)
        _time(row, "load", seconds[i] + share + time.perf_counter() - start)
    return batch_like(rows, batch)


def _decode(row: dict) -> None:
    try:
        warnings: list[str] = []
        # the library's rule (breakscene.scenes.scene.SUPPORTED_FORMATS), as for `breakscene extract`
        image = decode_image(row["image_bytes"], row["image_uri"], warnings)
        _warn(row, warnings)
        row.update(width=image.width, height=image.height)
    except Exception as exc:  # noqa: BLE001 - recorded per row
        _load_failed(row, exc)


def _load_failed(row: dict, exc: BaseException) -> None:
    fail_row(row, exc, "load")
    row["image_bytes"] = b""
    row["image_id"] = row["image_id"] or uri_id(row["image_uri"])


def _claim(rows: list[dict], claims) -> None:
    """Mark the rows whose content id an earlier row of the run holds (one call)."""
    if claims is None or not rows:
        return
    # a row's label is unique in the run ("3", or "shard.jsonl:3" for a sharded manifest)
    labels = [row["manifest_label"] for row in rows]
    ids = [row["image_id"] for row in rows]
    if isinstance(claims, ContentClaims):  # an instance (tests), not the run's actor
        owners = claims.claim(ids, labels)
    else:
        import ray

        owners = ray.get(claims.claim.remote(ids, labels))
    for row, label, owner in zip(rows, labels, owners):
        if owner != label:
            row.update(status=Status.DUPLICATE, image_bytes=b"",
                       error=f"same image content as manifest row {owner} (id {row['image_id']}): processed once")


class Segment:
    """User masks when the row has them, else the configured automatic segmenter."""

    def __init__(self, settings: SegmentSettings) -> None:
        apply_storage(settings.storage)
        self.settings = settings
        self._segmenter = None  # built on first use: rows with masks need no model
        self.kind = settings.segmenter.kind

    @property
    def segmenter(self):
        if self._segmenter is None:
            from batchjob.segmenters import build_segmenter

            self._segmenter = build_segmenter(self.settings.segmenter)
        return self._segmenter

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = rows_of(batch)
        automatic = []
        for row in rows:
            if row["status"] != Status.OK:
                continue
            start = time.perf_counter()
            try:
                if row["mask_uris"]:
                    row["masks"] = mask_entries(self._user_masks(row))
                else:
                    automatic.append((row, np.asarray(decode_image(row["image_bytes"], row["image_uri"]))))
            except Exception as exc:  # noqa: BLE001
                fail_row(row, exc, "segment")
            _time(row, "segment", time.perf_counter() - start)
        if automatic:
            self._segment_together(automatic)
        return batch_like(rows, batch)

    @staticmethod
    def _user_masks(row: dict) -> list[dict]:
        size, warnings = (int(row["width"]), int(row["height"])), []
        found = [{"mask": mask_from_image(load_mask_image(u), u, size, warnings), "source": USER,
                  "predicted_iou": None, "stability_score": None, "mask_uri": u} for u in row["mask_uris"]]
        _warn(row, warnings)
        return found

    def _segment_together(self, work: list[tuple[dict, np.ndarray]]) -> None:
        """One batched segmenter call (shared image-encoder passes); if it fails, each image
        alone, so that one bad image costs only its own row."""
        start = time.perf_counter()
        try:
            results = self.segmenter.segment_many([image for _, image in work])
        except Exception:  # noqa: BLE001 - retried one by one below
            results = None
        share = (time.perf_counter() - start) / len(work)
        for i, (row, image) in enumerate(work):
            start = time.perf_counter()
            try:
                found = results[i] if results is not None else self.segmenter(image)
                row["masks"] = mask_entries([{**m, "source": self.kind} for m in found])
            except Exception as exc:  # noqa: BLE001
                fail_row(row, exc, "segment")
            _time(row, "segment", share + time.perf_counter() - start)



def mask_entries(found: list[dict]) -> list[dict]:
    """The row's ``masks`` from a segmenter's (or the user's) masks: RLE, source, scores
    (a non-finite score is null, as in the tables and records), the user mask's file."""
    return [{"rle": encode_rle(m["mask"]), "source": m["source"], "predicted_iou": finite(m["predicted_iou"]),
             "stability_score": finite(m["stability_score"]), "mask_uri": m.get("mask_uri")} for m in found]


class ScoreAndSelect:
    """Quality features and the predicted-IoU ``quality`` of every mask (from the masks and
    the decoded photograph); choose the concepts. User masks all become concepts (up to
    ``max_concepts``) unless ``selection.filter_user_masks`` holds them to the same quality
    gate as automatic masks. Storage settings are applied once, in ``__init__``."""

    def __init__(self, settings: SelectSettings) -> None:
        apply_storage(settings.storage)
        self.selection = settings.selection
        self.max_concepts = settings.max_concepts

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = rows_of(batch)
        for row in rows:
            if row["status"] != Status.OK:
                continue
            start = time.perf_counter()
            try:
                self.score_row(row)
            except Exception as exc:  # noqa: BLE001
                fail_row(row, exc, "score")
            _time(row, "score", time.perf_counter() - start)
        return batch_like(rows, batch)

    def score_row(self, row: dict) -> None:
        sel = self.selection
        found = row["masks"]
        masks = [decode_rle(m["rle"]) for m in found]
        size = (int(row["width"]), int(row["height"]))
        warnings: list[str] = []
        gt = [mask_from_image(load_mask_image(u), u, size, warnings) for u in row["gt_mask_uris"]]
        _warn(row, warnings)
        # the score reads the photograph too: evidence at analysis size, computed once per image
        image = np.asarray(decode_image(row["image_bytes"], row["image_uri"]))
        feats = score_masks(image, masks, predicted_ious=[f["predicted_iou"] for f in found],
                            stability_scores=[f["stability_score"] for f in found], gt_masks=gt)
        if found and found[0]["source"] == USER and not sel.filter_user_masks:
            chosen = list(range(min(len(masks), self.max_concepts)))
            if len(masks) > self.max_concepts:
                _warn(row, [f"{len(masks)} user masks; the first {self.max_concepts} become concepts"])
            reason = None
        else:
            chosen, reason = select_masks(feats, masks, self.max_concepts, sel.min_quality, sel.min_area,
                                          sel.max_area, sel.max_overlap, sel.min_center_fraction)
        names = row["mask_uris"] or [f"mask{i}" for i in range(len(masks))]  # as the masks table
        _warn(row, overlap_warnings([masks[i] for i in chosen], [names[i] for i in chosen]))
        row["features"] = finite(feats)  # a non-finite measurement is null, as in the tables and records
        row["selected"] = chosen
        if reason:
            row["status"], row["error"] = Status.SKIPPED, f"select: {reason}"


def score_and_select(batch: pa.Table, settings: SelectSettings) -> pa.Table:
    """``ScoreAndSelect`` as a plain Ray Data task (no model to keep, so no actor pool):
    its setup is once per batch, not per row."""
    return ScoreAndSelect(settings)(batch)


class Extract:
    """The library's Extractor, loaded once per actor; writes bundle, then record."""

    def __init__(self, settings: ExtractSettings, run_id: str, threads: int | None = None) -> None:
        import torch

        from breakscene.extraction.extractor import Extractor

        if threads:
            torch.set_num_threads(threads)
        apply_storage(settings.storage)
        self.settings = settings
        self.run_id = run_id
        self.extractor = Extractor(settings.model.id, settings.model.revision, runtime=settings.model.runtime,
                                   max_concepts=settings.extract.max_concepts, progress=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = rows_of(batch)
        for row in rows:
            self.process(row)
            row["image_bytes"] = b""  # results travel back to the driver without pixels
        return batch_like(rows, batch)

    def process(self, row: dict) -> None:
        """Extract one row (or resume it from an earlier attempt's record); write its record."""
        if row["status"] in (Status.DUPLICATE, Status.RESUMED):
            # a duplicate's twin's record is the image's record: writing one would overwrite
            # it; a resumed row is already done in the tables
            return
        out = self.settings.output
        start = time.perf_counter()
        started_at = time.time()
        if row["status"] == Status.OK:
            uri = record_uri(out, row["image_id"])
            existing = read_record(uri)
            if existing is not None and existing["image"]["status"] in DONE_STATUSES and not self.settings.force:
                # an earlier attempt's record holds the image's rows: the staging stage stages them
                row["status"], row["record_uri"] = Status.RESUMED, uri
                return
            try:
                clear_partial_bundle(out, row["image_id"])  # a killed attempt's leftovers, this image only
                self._extract(row)
            except Exception as exc:  # noqa: BLE001
                if output_fault(exc):  # a full or read-only output: every row after it would fail too
                    raise
                fail_row(row, exc, "extract")
        _time(row, "extract", time.perf_counter() - start)
        self.save_record(row, started_at)

    def save_record(self, row: dict, started_at: float) -> None:
        """The row's record (``OUT/records/<key>.json``): the image's table rows, and the
        wall-clock window of its work (for the actor-utilisation benchmark)."""
        out = self.settings.output
        record = build_record(row, self.run_id)
        record["image"].update(extract_started_at=started_at, extract_ended_at=time.time())
        write_output(record_uri(out, row["image_id"]), lambda: write_record(out, record))

    def _extract(self, row: dict) -> None:
        """Train the row's selected masks; its ``concepts`` and ``bundle_uri`` once the bundle is written."""
        found, chosen = row["masks"], row["selected"]
        scene = build_scene(row["image_bytes"], row["image_uri"],
                            [(f"mask{i}", decode_rle(found[i]["rle"])) for i in chosen],
                            self.settings.extract.max_concepts)
        words = row["labels"][: len(chosen)] if found and found[0]["source"] == USER else []
        bundle = bundle_uri(self.settings.output, row["image_id"])
        result = self.extractor.extract(scene, self.settings.extract, out=bundle, init_words=words)
        labels = [words[i] if i < len(words) else None for i in range(len(result.concepts))]
        row["concepts"] = concept_rows(result, result.concepts, chosen, row["features"], labels)
        row["bundle_uri"] = bundle


def concept_rows(result, concepts: list[dict], chosen: list[int], feats: list[dict], labels: list[str | None],
                 group: str | None = None) -> list[dict]:
    """The row's ``concepts`` from an ``ExtractionResult``'s diagnostics in this image
    (``concepts``: one per token the image shows, with ``index``, ``assigned_mask`` and
    ``mask_index`` into its chosen masks): mask indices into the image's masks, each
    concept's mask quality, label and group."""
    rows = []
    for i, c in enumerate(concepts):
        mask_index = chosen[c.get("mask_index", c["index"])]
        rows.append({"concept_index": c["index"], "token": c["token"], "mask_index": mask_index,
                     "init_word": result.concepts[c["index"]]["init_word"],
                     "quality": feats[mask_index]["quality"] if mask_index < len(feats) else None,
                     "attention_iou": c["attention_iou"], "assigned_mask": chosen[c["assigned_mask"]],
                     "mass_in_mask": c["mass_in_mask"], "final_loss": result.final_loss,
                     "grid_uri": result.grid_uri or "", "group": group, "label": labels[i]})
    return finite(rows)  # a non-finite measurement is null, as in the tables and records
