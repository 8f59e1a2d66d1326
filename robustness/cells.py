"""The study's outputs: one JSON document per measured cell (OUT/cells/<cell_id>.json, the
done-marker, holding the cell's measurement rows) and the measurements table rebuilt from
all of them (OUT/measurements/part-0.parquet), through ``batchjob.artifacts``."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from breakscene.files.storage import join
from batchjob.artifacts import read_json_folder, write_parquet

MEASUREMENT_COLUMNS = ["cell_id", "scene_id", "concept_index", "family", "severity", "seed", "config", "status",
                       "reason", "mask_iou", "mask_boundary_f", "predicted_quality", "quality_version",
                       "attention_iou", "attention_leak", "assigned_correct", "recon_in", "recon_out",
                       "identity_sim", "prompt_sim", "bundle_uri", "grid_uri", "train_seconds", "train_steps"]


def cell_uri(out: str, cid: str) -> str:
    return join(out, "cells", f"{cid}.json")


def read_cells(out: str) -> dict[str, dict]:
    """Every finished cell under ``out``, by id."""
    return {cell["cell_id"]: cell for cell in read_json_folder(join(out, "cells"))}


def write_measurements(out: str, cells: dict[str, dict]) -> int:
    """The measurements table from ``cells``' rows (every known column, then the axis
    columns); returns its row count (0: nothing written)."""
    rows = [r for c in cells.values() for r in c["rows"]]
    if not rows:
        return 0
    df = pd.DataFrame(rows)
    for col in MEASUREMENT_COLUMNS:
        if col not in df:
            df[col] = None
    axis_cols = sorted(c for c in df.columns if c.startswith("axis_"))
    df = df[MEASUREMENT_COLUMNS + axis_cols].sort_values(["scene_id", "family", "severity", "seed", "concept_index"])
    write_parquet(join(out, "measurements", "part-0.parquet"), pa.Table.from_pandas(df, preserve_index=False))
    return len(df)
