"""Rows in, rows out, whatever the batch format: the stages work on a list of dicts per
batch and give the batch back in the format it came in.

The run hands every stage Arrow batches (``batch_format="pyarrow"``): a pandas batch
costs a conversion each way per call, measured at 12 ms per row for the extract stage's
one-row batches and 1.3 ms per row at eight rows (``benchmarks/scale.py``'s do-nothing
plan), against 0.3 and 0.04 ms as Arrow. Tests and callers may still pass pandas.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa


def rows_of(batch: pa.Table | pd.DataFrame) -> list[dict]:
    """The batch's rows as dicts (Python values from Arrow; pandas values from pandas)."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    return batch.to_dict("records")


def batch_like(rows: list[dict], batch: pa.Table | pd.DataFrame, schema: pa.Schema | None = None):
    """``rows`` in ``batch``'s format: an Arrow batch keeps its schema (or takes ``schema``,
    for a stage that changes the columns), so every block of a run has the same types."""
    if isinstance(batch, pa.Table):
        return pa.Table.from_pylist(rows, schema=schema or batch.schema)
    return pd.DataFrame(rows)


__all__ = ["batch_like", "rows_of"]
