"""What every stage function does around its work: the job's storage settings applied
in the worker (as the actor stages apply theirs), and rows in, rows out: a stage takes
the batch's rows as dicts and gives them back as an Arrow batch with the same schema
(``pipeline/row.py``'s row schema in a run).

The run hands every stage Arrow batches (``batch_format="pyarrow"``): a pandas batch
cost a conversion each way per call, measured at 12 ms per row for the extract stage's
one-row batches and 1.3 ms per row at eight rows (``benchmarks/scale.py``'s do-nothing
plan), against 0.3 and 0.04 ms as Arrow.
"""
from __future__ import annotations

import pyarrow as pa

from breakscene.storage import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, configure


def apply_storage(settings: dict | None) -> None:
    """Make the job's storage settings (``StorageConfig`` as a dict: fsspec ``options``,
    ``timeout_s``, ``retries``) this worker's, exactly as ``StorageConfig.apply`` does for
    the actor stages (a key left out takes the same default): a worker must not keep the
    timeouts it happened to get first."""
    settings = settings or {}
    configure(settings.get("options") or {}, timeout_s=settings.get("timeout_s", DEFAULT_TIMEOUT_S),
              retries=settings.get("retries", DEFAULT_RETRIES))


def rows_of(batch: pa.Table) -> list[dict]:
    """The batch's rows as dicts of Python values (nested columns as lists and dicts)."""
    return batch.to_pylist()


def batch_like(rows: list[dict], batch: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """``rows`` with ``batch``'s schema (or ``schema``, for a stage that changes the
    columns), so that every block of a run has the same types."""
    return pa.Table.from_pylist(rows, schema=schema or batch.schema)


__all__ = ["apply_storage", "batch_like", "rows_of"]
