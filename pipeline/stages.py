"""Ray Data stages, each ``batch -> batch`` on Arrow (in a run) or pandas batches. The actor stages are
classes whose setup (config, storage settings) is done once in ``__init__``; their models
are built there (``Extract``) or on first use (``Segment``: rows with user masks need
none). A row that fails gets ``status="failed"`` and an ``error`` message and flows on, so
one bad image never stops the dataset.

Row columns: image_id, image_uri, manifest_row, mask_uris, labels, gt_mask_uris (JSON
lists), image_bytes, width, height, status, error, warnings (JSON), masks (JSON list of
{rle, source, predicted_iou, stability_score}), features (JSON), selected (JSON list),
timings (JSON), record (JSON, after extraction).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback

import numpy as np
import pandas as pd

from breakscene import masks as M
from breakscene.errors import BreakSceneError, StorageError
from breakscene.quality import score_masks, select_masks
# SUPPORTED_FORMATS: the library's one format rule (extract and the pipeline), re-exported
from breakscene.scene import SUPPORTED_FORMATS, build_scene, decode_image, load_mask_image, mask_from_image  # noqa: F401
from breakscene.storage import configure, read_bytes

from . import records as R
from .batches import batch_like, rows_of
from .config import JobConfig

log = logging.getLogger(__name__)


def _rows(batch) -> list[dict]:
    return rows_of(batch)


def _batch(rows: list[dict], like):
    """``rows`` in the format of the batch they came in (Arrow in a run: ``pipeline/batches.py``)."""
    return batch_like(rows, like)


def _fail(row: dict, exc: BaseException, stage: str) -> None:
    row["status"] = "failed"
    if isinstance(exc, BreakSceneError):
        row["error"] = f"{stage}: {exc}"
    else:
        row["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        log.error("%s failed on %s\n%s", stage, row.get("image_uri"), traceback.format_exc())


def _time(row: dict, stage: str, seconds: float) -> None:
    timings = json.loads(row.get("timings") or "{}")
    timings[stage] = round(seconds, 4)
    row["timings"] = json.dumps(timings)


def _warn(row: dict, messages: list[str]) -> None:
    if messages:
        row["warnings"] = json.dumps(json.loads(row.get("warnings") or "[]") + messages)


def initial_row(item: dict) -> dict:
    return {"image_id": item["image_id"] or "", "image_uri": item["image_uri"], "manifest_row": item["manifest_row"],
            "mask_uris": json.dumps(item["mask_uris"]), "labels": json.dumps(item["labels"]),
            "gt_mask_uris": json.dumps(item["gt_mask_uris"]), "image_bytes": b"", "width": 0, "height": 0,
            "status": "ok", "error": "", "warnings": "[]", "masks": "[]", "features": "[]", "selected": "[]",
            "timings": "{}", "record": ""}


class ContentClaims:
    """Which manifest row owns each content-hash id in this run (a Ray actor): two rows
    of the same picture without explicit ids get the same id and must not both be
    segmented and extracted. A retried row claims again with its own row number and
    keeps its claim."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def claim(self, image_id: str, manifest_row: str) -> str:
        return self.owner.setdefault(image_id, manifest_row)


def load_images(batch: pd.DataFrame, storage: dict, claims=None, *, timeout_s: float | None = None,
                retries: int | None = None) -> pd.DataFrame:
    """Fetch and decode each image; assign a content-hash id where the manifest gave none
    (``claims``, a ContentClaims actor, marks later rows of the same content "duplicate").
    ``storage``: fsspec options; ``timeout_s``/``retries``: the job's bounds on each fetch.
    A plain task: no model to keep, so no actor."""
    configure(storage, timeout_s=timeout_s, retries=retries)
    rows = _rows(batch)
    for row in rows:
        start = time.perf_counter()
        try:
            try:
                data = read_bytes(row["image_uri"])
            except FileNotFoundError:
                raise BreakSceneError(f"image {row['image_uri']} does not exist") from None
            except IsADirectoryError:
                raise BreakSceneError(f"image {row['image_uri']} is a folder, not a file") from None
            except StorageError as exc:  # timeout, HTTP status, refused, credentials: said as such
                raise BreakSceneError(f"image {exc}") from None
            warnings: list[str] = []
            # the library's rule (breakscene.scene.SUPPORTED_FORMATS), as for `breakscene extract`
            image = decode_image(data, row["image_uri"], warnings)
            _warn(row, warnings)
            row.update(image_bytes=data, width=image.width, height=image.height)
            if not row["image_id"]:
                row["image_id"] = hashlib.sha256(data).hexdigest()[:16]
                _claim(row, claims)
        except Exception as exc:  # noqa: BLE001 - recorded per row
            _fail(row, exc, "load")
            row["image_id"] = row["image_id"] or R.uri_id(row["image_uri"])
        _time(row, "load", time.perf_counter() - start)
    return _batch(rows, batch)


def _claim(row: dict, claims) -> None:
    if claims is None:
        return
    import ray

    # a row's label is unique in the run ("3", or "shard.jsonl:3" for a sharded manifest)
    label = row.get("manifest_label") or str(int(row["manifest_row"]))
    owner = ray.get(claims.claim.remote(row["image_id"], label))
    if owner != label:
        row.update(status="duplicate", image_bytes=b"",
                   error=f"same image content as manifest row {owner} (id {row['image_id']}): processed once")


class Segment:
    """User masks when the row has them, else the configured automatic segmenter."""

    def __init__(self, job: dict) -> None:
        self.job = JobConfig.model_validate(job)
        self.job.storage.apply()
        self._segmenter = None  # built on first use: rows with masks need no model
        self.kind = self.job.segmenter.kind

    @property
    def segmenter(self):
        if self._segmenter is None:
            from .segmenters import build_segmenter

            self._segmenter = build_segmenter(self.job.segmenter)
        return self._segmenter

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = _rows(batch)
        automatic = []
        for row in rows:
            if row["status"] != "ok":
                continue
            start = time.perf_counter()
            try:
                user = json.loads(row["mask_uris"])
                if user:
                    size, warnings = (int(row["width"]), int(row["height"])), []
                    found = [{"mask": mask_from_image(load_mask_image(u), u, size, warnings), "source": "user",
                              "predicted_iou": None, "stability_score": None} for u in user]
                    _warn(row, warnings)
                    self._store(row, found)
                else:
                    automatic.append((row, np.asarray(decode_image(row["image_bytes"], row["image_uri"]))))
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc, "segment")
            _time(row, "segment", time.perf_counter() - start)
        if automatic:
            self._segment_together(automatic)
        return _batch(rows, batch)

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
                self._store(row, [{**m, "source": self.kind} for m in found])
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc, "segment")
            _time(row, "segment", share + time.perf_counter() - start)

    @staticmethod
    def _store(row: dict, found: list[dict]) -> None:
        row["masks"] = json.dumps([{"rle": M.encode_rle(m["mask"]), "source": m["source"],
                                    "predicted_iou": m["predicted_iou"],
                                    "stability_score": m["stability_score"]} for m in found])


class ScoreAndSelect:
    """Quality features and the predicted-IoU ``quality`` of every mask (from the masks and
    the decoded photograph); choose the concepts (user masks: all of them). The job is
    read and its storage settings applied once, in ``__init__``."""

    def __init__(self, job: dict) -> None:
        job_cfg = JobConfig.model_validate(job)
        job_cfg.storage.apply()
        self.selection = job_cfg.selection

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = _rows(batch)
        for row in rows:
            if row["status"] != "ok":
                continue
            start = time.perf_counter()
            try:
                self.score_row(row)
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc, "score")
            _time(row, "score", time.perf_counter() - start)
        return _batch(rows, batch)

    def score_row(self, row: dict) -> None:
        sel = self.selection
        found = json.loads(row["masks"])
        masks = [M.decode_rle(m["rle"]) for m in found]
        size = (int(row["width"]), int(row["height"]))
        warnings: list[str] = []
        gt = [mask_from_image(load_mask_image(u), u, size, warnings) for u in json.loads(row["gt_mask_uris"])]
        _warn(row, warnings)
        # the score reads the photograph too: evidence at analysis size, computed once per image
        image = np.asarray(decode_image(row["image_bytes"], row["image_uri"]))
        feats = score_masks(image, masks, predicted_ious=[f["predicted_iou"] for f in found],
                            stability_scores=[f["stability_score"] for f in found], gt_masks=gt)
        if found and found[0]["source"] == "user":
            chosen = list(range(min(len(masks), sel.max_concepts)))
            if len(masks) > sel.max_concepts:
                _warn(row, [f"{len(masks)} user masks; the first {sel.max_concepts} become concepts"])
            reason = None
        else:
            chosen, reason = select_masks(feats, masks, sel.max_concepts, sel.min_quality, sel.min_area,
                                          sel.max_area, sel.max_overlap, sel.min_center_fraction)
        row["features"] = json.dumps(feats)
        row["selected"] = json.dumps(chosen)
        if reason:
            row["status"], row["error"] = "skipped", f"select: {reason}"


def score_and_select(batch: pd.DataFrame, job: dict) -> pd.DataFrame:
    """``ScoreAndSelect`` as a plain Ray Data task (no model to keep, so no actor pool):
    its setup is once per batch, not per row."""
    return ScoreAndSelect(job)(batch)


class Extract:
    """The library's Extractor, loaded once per actor; writes bundle, then record."""

    def __init__(self, job: dict, run_id: str, threads: int | None = None) -> None:
        import torch

        from breakscene.extractor import Extractor

        if threads:
            torch.set_num_threads(threads)
        self.job = JobConfig.model_validate(job)
        self.run_id = run_id
        self.job.storage.apply()
        self.extractor = Extractor(self.job.model.id, self.job.model.revision, runtime=self.job.model.runtime,
                                   max_concepts=self.job.extract.max_concepts, progress=False)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = _rows(batch)
        for row in rows:
            self._one(row)
            row["image_bytes"] = b""  # results travel back to the driver without pixels
        return _batch(rows, batch)

    def _one(self, row: dict) -> None:
        if row["status"] in ("duplicate", "resumed"):
            # a duplicate's twin's record is the image's record: writing one would overwrite
            # it; a resumed row is already done in the tables
            return
        out = self.job.output
        start = time.perf_counter()
        started_at = time.time()
        if row["status"] == "ok":
            existing = _existing_record(out, row["image_id"])
            if existing is not None and existing["image"]["status"] in R.DONE_STATUSES and not self.job.force:
                row["status"], row["record"] = "resumed", json.dumps(existing)
                return
            try:
                R.clear_partial_bundle(out, row["image_id"])  # a killed attempt's leftovers, this image only
                result = self._extract(row)
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc, "extract")
                result = None
        else:
            result = None
        _time(row, "extract", time.perf_counter() - start)
        record = build_record(row, result, self.run_id, R.bundle_uri(out, row["image_id"]))
        # wall-clock window of the work, for the actor-utilisation benchmark
        record["image"].update(extract_started_at=started_at, extract_ended_at=time.time())
        R.write_record(out, record)
        row["record"] = json.dumps(record)

    def _extract(self, row: dict):
        found = json.loads(row["masks"])
        chosen = json.loads(row["selected"])
        labels = json.loads(row["labels"])
        scene = build_scene(row["image_bytes"], row["image_uri"],
                            [(f"mask{i}", M.decode_rle(found[i]["rle"])) for i in chosen],
                            self.job.extract.max_concepts)
        words = labels[: len(chosen)] if found and found[0]["source"] == "user" else []
        return self.extractor.extract(scene, self.job.extract, out=R.bundle_uri(self.job.output, row["image_id"]),
                                      init_words=words)


def _existing_record(out: str, image_id: str) -> dict | None:
    try:
        return json.loads(read_bytes(R.record_uri(out, image_id)))
    except FileNotFoundError:
        return None


def build_record(row: dict, result, run_id: str, bundle: str) -> dict:
    """The image's rows for the three tables."""
    timings = json.loads(row["timings"] or "{}")
    found = json.loads(row["masks"] or "[]")
    feats = json.loads(row["features"] or "[]")
    chosen = json.loads(row["selected"] or "[]")
    ok = result is not None
    image = {
        "image_id": row["image_id"], "image_uri": row["image_uri"], "manifest_row": int(row["manifest_row"]),
        "width": int(row["width"]), "height": int(row["height"]), "status": row["status"],
        "error": row["error"] or None,  # null, not "", on rows that did not fail
        "warnings": json.loads(row["warnings"] or "[]"), "mask_source": found[0]["source"] if found else "",
        "n_masks": len(found), "n_concepts": len(chosen) if ok else 0,
        **{f"seconds_{k}": timings.get(k) for k in ("load", "segment", "score", "extract")},
        "bundle_uri": bundle if ok else "", "run_id": run_id,
        "manifest_file": row.get("manifest_file"), "meta": row.get("meta"),
    }
    masks = [{"image_id": row["image_id"], "mask_index": i, "source": f["source"], "rle": f["rle"],
              **{k: v for k, v in (feats[i] if i < len(feats) else {}).items()}, "selected": i in chosen,
              "run_id": run_id}
             for i, f in enumerate(found)]
    concepts = []
    if ok:
        for c in result.concepts:
            mask_index = chosen[c["index"]]
            concepts.append({
                "image_id": row["image_id"], "concept_index": c["index"], "token": c["token"],
                "mask_index": mask_index, "init_word": c["init_word"],
                "quality": feats[mask_index]["quality"] if mask_index < len(feats) else None,
                "attention_iou": c["attention_iou"], "assigned_mask": chosen[c["assigned_mask"]],
                "mass_in_mask": c["mass_in_mask"], "final_loss": result.final_loss, "bundle_uri": bundle,
                "grid_uri": result.grid_uri or "", "run_id": run_id,
            })
    return {"image": image, "masks": masks, "concepts": concepts}
