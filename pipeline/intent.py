"""A run's table commits as one unit: its commit intent ``OUT/_commits/<run_id>.json``.

Delta commits one table at a time, so a driver killed between the ``masks`` and the
``images`` commit would leave the tables half-committed, and the rerun (which decides what
is done from ``images`` alone) would append the masks a second time. So the driver:
1. stages every table's rows (the workers), then writes its intent: the tables to commit
   and the run's summary;
2. commits table by table (images last), each Delta commit tagged ``breakscene.run_id``;
3. writes ``runs/<run_id>.json`` and ``summary.json``, removes its staging, removes the intent.

A driver killed anywhere in 2-3 leaves the intent and the staged rows. The next holder of
the output's lease (``run``, ``gc``, ``compact``) rolls it forward before anything else:
a table whose latest commits include one tagged with that run is skipped, every other is
committed from the staged rows, and step 3 is finished. A kill before the intent exists
leaves nothing committed: the staging is cleared and the images are processed again (their
records make extraction resume). Either way a rerun leaves one current row per key.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from breakscene.files.storage import exists, filesystem, join, remove, write_bytes

from pipeline.records import IMAGES_SCHEMA, TABLES, scan_images
from pipeline.tables import STAGING, commit, counts, open_table, staged, staging_dir
from breakscene.failpoints import failpoint
from breakscene.files.strictjson import to_json

log = logging.getLogger(__name__)
COMMITS = "_commits"
# The lease keeps other writers out until a killed run's intent is rolled forward, so its
# commits are the newest ones of each table; a few more cover a run's own delete + merge.
HISTORY_LOOKBACK = 8


def intent_uri(out: str, run_id: str) -> str:
    return join(out, COMMITS, f"{run_id}.json")


def write_intent(out: str, run_id: str, tables: list[str], summary: dict) -> None:
    document = {"run_id": run_id, "tables": tables, "summary": summary}
    write_bytes(intent_uri(out, run_id), to_json(document).encode())


def pending(out: str) -> list[dict]:
    """Intents of runs that did not finish their commits, oldest first."""
    fs, root = filesystem(join(out, COMMITS))
    if not fs.exists(root):
        return []
    intents = []
    for path in sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json")):
        with fs.open(path, "rb") as fh:
            intents.append(json.loads(fh.read()))
    return intents


def committed(out: str, name: str, run_id: str) -> bool:
    """Whether table ``name`` already holds a commit of run ``run_id``."""
    dt = open_table(out, name)
    if dt is None:
        return False
    return any(c.get("breakscene.run_id") == run_id for c in dt.history(limit=HISTORY_LOOKBACK))


def commit_tables(out: str, run_id: str, names: list[str], known_ids: pa.Array | None = None) -> dict[str, int]:
    """Commit what run ``run_id`` staged, table by table (images last, so that a reader who
    sees an image's current row also finds its masks and concepts), skipping tables that
    already hold its commit. ``known_ids``: the images table's ids before this run (read
    here when not given). Returns each table's current row count."""
    replace = None
    for name in sorted(names, key=lambda n: n == "images"):
        if committed(out, name, run_id):
            continue
        if replace is None:  # images is committed last, so it still holds the ids from before this run
            replace = replaced_ids(out, run_id, known_ids)
        commit(out, name, TABLES[name], staged(out, run_id, name, TABLES[name]), run_id=run_id,
                 replace_ids=replace)
        failpoint(f"committed-{name}")
    return counts(out, names)


def replaced_ids(out: str, run_id: str, known_ids: pa.Array | None) -> set[str]:
    """Ids this run staged that the images table already holds (a failed image retried, a
    scored one extracted, ``force``): their rows are replaced, the rest appended."""
    if known_ids is None:
        known_ids = scan_images(out, columns=["image_id"]).column("image_id")
    staged_images = staged(out, run_id, "images", IMAGES_SCHEMA)
    if len(known_ids) == 0 or staged_images is None:
        return set()
    ids = staged_images.to_table(columns=["image_id"]).column("image_id")
    return set(pc.filter(ids, pc.is_in(ids, value_set=known_ids)).to_pylist())


def finish(out: str, run_id: str, summary: dict) -> None:
    """Step 3: the run's summary, then its staging and intent removed."""
    data = to_json(summary, indent=2).encode()
    write_bytes(join(out, "runs", f"{run_id}.json"), data)
    write_bytes(join(out, "summary.json"), data)
    failpoint("summary-written")
    remove(staging_dir(out, run_id))
    fs, root = filesystem(join(out, STAGING))
    try:
        fs.rmdir(root)  # only when no other run's staging is left
    except (OSError, NotImplementedError):
        pass
    remove(intent_uri(out, run_id))


def commit_run(out: str, run_id: str, names: list[str], summary: dict, *,
               known_ids: pa.Array | None = None, complete: Callable[[dict], dict] | None = None) -> dict:
    """Steps 1-3 for the driver of run ``run_id``. ``summary``: the run's summary as far as
    it is known before the commits; ``complete(counts)`` gives the final one (with the
    commit's time), else the tables' row counts are added. Returns the summary written."""
    write_intent(out, run_id, names, summary)
    failpoint("intent-written")
    counts = commit_tables(out, run_id, names, known_ids)
    final = complete(counts) if complete else {**summary, "tables": counts}
    finish(out, run_id, final)
    return final


def roll_forward(out: str) -> list[str]:
    """Finish the commits of runs killed after writing their intent (the caller holds the
    lease). Returns their run ids."""
    finished = []
    for intent in pending(out):
        run_id = intent["run_id"]
        counts = commit_tables(out, run_id, intent["tables"])
        if not exists(join(out, "runs", f"{run_id}.json")):
            finish(out, run_id, {**intent["summary"], "tables": counts, "finished_by_rerun": True})
        else:
            finish_leftovers(out, run_id)
        log.warning("run %s was stopped during its commit; its commits were finished now", run_id)
        print(f"run {run_id}: stopped during its commit before; its commits are finished now", flush=True)
        finished.append(run_id)
    return finished


def finish_leftovers(out: str, run_id: str) -> None:
    """A run killed after writing its summary: only its staging and intent are left."""
    remove(staging_dir(out, run_id))
    remove(intent_uri(out, run_id))


__all__ = ["COMMITS", "intent_uri", "write_intent", "pending", "committed", "commit_tables", "replaced_ids",
           "finish", "commit_run", "roll_forward"]
