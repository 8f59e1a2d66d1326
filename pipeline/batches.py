"""What every stage function does around its work: rows in, rows out: a stage takes
the batch's rows as dicts and gives them back as an Arrow batch with the same schema
(``pipeline/row.py``'s row schema in a run).

The run hands every stage Arrow batches (``batch_format="pyarrow"``): a pandas batch
cost a conversion each way per call, measured at 12 ms per row for the extract stage's
one-row batches and 1.3 ms per row at eight rows (``benchmarks/scale.py``'s do-nothing
plan), against 0.3 and 0.04 ms as Arrow.
"""
from __future__ import annotations

import pyarrow as pa


def rows_of(batch: pa.Table) -> list[dict]:
    """The batch's rows as dicts of Python values (nested columns as lists and dicts)."""
    return batch.to_pylist()


def batch_like(rows: list[dict], batch: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """``rows`` with ``batch``'s schema (or ``schema``, for a stage that changes the
    columns), so that every block of a run has the same types."""
    return pa.Table.from_pylist(rows, schema=schema or batch.schema)


__all__ = ["batch_like", "rows_of"]
