"""Concept groups in the pipeline: the manifest rows that share a ``group`` value are
learned together, one token per label, into one bundle (``breakscene.scenes.group``).

Each image of a group is loaded, segmented, scored and selected like any row; the run's
grouped pass then gathers a group's rows with Ray Data's own grouping
(``groupby("group").map_groups(ExtractGroup)``, ``pipeline/run.py``) and one extract
actor learns them.

- **Failures.** An image that fails (load, masks, a bad label) fails alone; the group is
  learned from the rest, or every image fails with the reason when fewer than
  ``groups.min_images`` remain.
- **Size.** A group of more than ``groups.max_images`` images is capped: the images with
  the smallest ids are learned (the same ones every night), the rest are skipped with a
  warning.
- **Exactly once.** A group is done when its bundle (``OUT/bundles/group.<key>``) is
  committed and then its group record (``OUT/records/group.<key>.json``) names the images
  it was learned from; each image's own record is written between the two. A rerun after
  a kill before the group record learns the group again (its bundle is replaced, never
  doubled); after it, each image resumes from its record. Image keys never hold a dot,
  so a group's names never meet an image's.
- **Growth.** The tables mark each learned image done, so a later run sees only a
  group's new images. When a learned group gains images, it is learned again from all of
  them (the earlier ones rebuilt from their records and refetched) and its bundle is
  replaced; with ``groups.retrain_on_growth: false`` the new images are skipped with a
  warning and the bundle stays as it was. ``force`` learns every group again.
"""
from __future__ import annotations

import time

import pyarrow as pa

from breakscene.errors import BreakSceneError, output_fault
from breakscene.failpoints import failpoint
from breakscene.files.storage import join
from breakscene.scenes.group import build_group
from breakscene.scenes.masks import decode_rle
from breakscene.scenes.scene import build_scene

from batchjob.artifacts import write_json, write_output
from batchjob.keys import storage_key
from pipeline.config import ExtractSettings
from pipeline.records import Status, clear_partial_folder, read_record, record_uri, uri_id
from pipeline.row import FEATURES, MASK, batch_like, new_row, rows_of
from pipeline.stages import Extract, concept_rows, fail_row, read_image

GROUP_PREFIX = "group."  # image keys never hold a dot (batchjob/keys.py)


def group_bundle_uri(out: str, group: str) -> str:
    return join(out, "bundles", GROUP_PREFIX + storage_key(group))


def group_record_uri(out: str, group: str) -> str:
    return join(out, "records", f"{GROUP_PREFIX}{storage_key(group)}.json")


def cap_group(batch: pa.Table, max_images: int) -> pa.Table:
    """One group's manifest rows, before any fetch (``map_groups`` over rows without pixels):
    past ``max_images`` the rows are skipped here, so that a runaway group (a category put in
    the ``group`` column) never gathers its pictures on one actor. Kept: the smallest image
    ids (the image URI where a row has none), the same rows every night."""
    rows = rows_of(batch)
    if len(rows) <= max_images:
        return batch
    rows.sort(key=lambda r: (r["image_id"] or r["image_uri"], r["manifest_label"]))
    for row in rows[max_images:]:
        if row["status"] == Status.OK:
            row["status"], row["image_id"] = Status.SKIPPED, row["image_id"] or uri_id(row["image_uri"])
            row["error"] = (f"extract: group {row['group']!r} has {len(rows)} images, more than "
                            f"groups.max_images={max_images}: the {max_images} with the smallest image ids "
                            "(image URIs where no id is given) are learned")
    return batch_like(rows, batch)


class ExtractGroup:
    """One group's rows per call (Ray Data's ``map_groups``): learned together on this
    actor's Extractor; the rows come back with their concepts, plus a row for each earlier
    image that a grown group was learned again from."""

    def __init__(self, settings: ExtractSettings, run_id: str, threads: int | None = None) -> None:
        self.single = Extract(settings, run_id, threads)
        self.settings = settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = rows_of(batch)
        if rows:
            rows += self.extract_group(rows[0]["group"], rows)
        for row in rows:
            row["image_bytes"] = b""  # results travel back to the driver without pixels
        return batch_like(rows, batch)

    def extract_group(self, group: str, rows: list[dict]) -> list[dict]:
        """Learn (or resume) ``group`` from its ``rows`` (changed in place); the rows of
        earlier images rebuilt for a grown group."""
        for row in rows:
            if row["status"] != Status.OK:
                self.single.process(row)  # a failed or skipped image's record, as alone
        todo = [r for r in rows if r["status"] == Status.OK]
        if not todo:
            return []
        record = None if self.settings.force else read_record(group_record_uri(self.settings.output, group))
        if record is None:
            self.learn(group, todo)
            return []
        members = {m["image_id"] for m in record["members"]}
        new = [r for r in todo if r["image_id"] not in members]
        if not new or not self.settings.groups.retrain_on_growth:
            for row in todo:
                self.resume(row) if row["image_id"] in members else self.skip_growth(row, group, record)
            return []
        arrived = {r["image_id"] for r in todo}
        earlier = [rebuilt_row(m, self.settings.output, group) for m in record["members"]
                   if m["image_id"] not in arrived]
        self.learn(group, todo + earlier)
        return earlier

    def resume(self, row: dict) -> None:
        """An image of a learned group whose record holds its rows (a run killed before its
        table commit): the staging stage stages them."""
        row["status"], row["record_uri"] = Status.RESUMED, record_uri(self.settings.output, row["image_id"])

    def skip_growth(self, row: dict, group: str, record: dict) -> None:
        row["status"] = Status.SKIPPED
        row["error"] = (f"extract: group {group!r} was learned from {len(record['members'])} images by run "
                        f"{record['run_id']}; groups.retrain_on_growth is false, so this new image is not learned")
        self.single.save_record(row, time.time())

    def learn(self, group: str, rows: list[dict]) -> None:
        """Extract the group from ``rows`` (status ok); each row's concepts, bundle and record;
        then the group record."""
        start, started_at = time.perf_counter(), time.time()
        rows = self.cap(group, sorted(rows, key=lambda r: r["image_id"]), started_at)
        scenes, used = self.scenes(rows)
        try:
            if len(used) < self.settings.groups.min_images:
                raise BreakSceneError(f"group {group!r}: {len(used)} of its {len(rows)} images can be learned, "
                                      f"fewer than groups.min_images={self.settings.groups.min_images}")
            bundle, concepts = self.train(group, scenes, used)
        except Exception as exc:  # noqa: BLE001 - every image of the group fails with the reason
            if output_fault(exc):
                raise
            for row in used:
                fail_row(row, exc, "extract")
            concepts, bundle = {}, None
        failpoint("group-bundle-written")
        share = (time.perf_counter() - start) / max(1, len(rows))  # the group's time, shared by its images
        for row in rows:
            if row["image_id"] in concepts:
                row["concepts"], row["bundle_uri"] = concepts[row["image_id"]], bundle
            row["timings"] = {**(row["timings"] or {}), "extract": round(share, 4)}
            self.single.save_record(row, started_at)
        failpoint("group-images-recorded")
        if bundle is not None:  # the group's commit: after its bundle and its images' records
            self.write_group_record(group, bundle, used)

    def cap(self, group: str, rows: list[dict], started_at: float) -> list[dict]:
        limit = self.settings.groups.max_images
        for row in rows[limit:]:
            row["status"] = Status.SKIPPED
            row["error"] = (f"extract: group {group!r} has {len(rows)} images, more than groups.max_images={limit}: "
                            f"the {limit} with the smallest image ids are learned")
            self.single.save_record(row, started_at)
        return rows[:limit]

    def scenes(self, rows: list[dict]) -> tuple[list, list[dict]]:
        """Each row's scene of its selected masks; a row whose scene cannot be built fails alone."""
        scenes, used = [], []
        for row in rows:
            chosen = row["selected"]
            try:
                scenes.append(build_scene(read_image(row), row["image_uri"],
                                          [(f"mask{i}", decode_rle(row["masks"][i]["rle"])) for i in chosen],
                                          max(len(chosen), 1)))
                used.append(row)
            except Exception as exc:  # noqa: BLE001 - this image fails alone
                if output_fault(exc):
                    raise
                fail_row(row, exc, "extract")
        return scenes, used

    def train(self, group: str, scenes: list, rows: list[dict]) -> tuple[str, dict[str, list[dict]]]:
        """The group's bundle and each image's concept rows (its tokens against its own masks)."""
        labels = [[row["labels"][i] for i in row["selected"]] for row in rows]
        found = build_group(scenes, labels, self.settings.extract.max_concepts, [r["image_uri"] for r in rows])
        found.draw = self.settings.groups.draw
        bundle = group_bundle_uri(self.settings.output, group)
        clear_partial_folder(bundle)  # a killed attempt's leftovers, this group only
        result = self.single.extractor.extract(found, self.settings.extract, out=bundle)
        per_image = result.group or [{"concepts": [{**c, "mask_index": c["index"]} for c in result.concepts]}]
        concepts = {}
        for row, image in zip(rows, per_image):
            seen = [{**c, "index": result.tokens.index(c["token"])} for c in image["concepts"]]
            concepts[row["image_id"]] = concept_rows(result, seen, row["selected"], row["features"],
                                                     [found.tokens[c["index"]] for c in seen], group)
        return bundle, concepts

    def write_group_record(self, group: str, bundle: str, rows: list[dict]) -> None:
        out = self.settings.output
        record = {"group": group, "bundle_uri": bundle, "run_id": self.single.run_id,
                  "members": [{"image_id": r["image_id"], "labels": list(r["labels"]),
                               "mask_uris": list(r["mask_uris"])} for r in rows]}
        uri = group_record_uri(out, group)
        write_output(uri, lambda: write_json(uri, record))


def rebuilt_row(member: dict, out: str, group: str) -> dict:
    """An earlier image of a group as a row ready for extraction, from its record (its
    masks, their quality and selection) and the group record's labels; its pixels are
    fetched again when the group is learned."""
    record = read_record(record_uri(out, member["image_id"]))
    if record is None:
        raise BreakSceneError(f"group {group!r}: the record of its image {member['image_id']!r} is missing")
    image, masks = record["image"], record["masks"]
    mask_fields, feature_names = [f.name for f in MASK], [f.name for f in FEATURES]
    files = member.get("mask_uris") or []  # records keep their format: the mask files are the group record's
    masks = [{**m, "mask_uri": files[i] if i < len(files) else None} for i, m in enumerate(masks)]
    return new_row(image_id=image["image_id"], image_uri=image["image_uri"], manifest_row=image["manifest_row"],
                   manifest_file=image.get("manifest_file"), manifest_label=f"group {group}: {image['image_id']}",
                   meta=image.get("meta"), labels=member["labels"], group=group, width=image["width"],
                   height=image["height"], masks=[{k: m.get(k) for k in mask_fields} for m in masks],
                   features=[{k: m.get(k) for k in feature_names} for m in masks],
                   selected=[m["mask_index"] for m in masks if m["selected"]],
                   mask_uris=files, relearned=True)
