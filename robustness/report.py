"""``breakscene report RESULTS_URI --out DIR``: the robustness study as a self-contained
HTML page (figures embedded), the figures as PNG, and a Markdown summary.

- Each metric against the measured mask IoU, one panel per noise family, points binned
  by IoU with a bootstrap 95% confidence band of the bin mean. Clean cells (IoU 1) anchor
  every family.
- "IoU at 10% loss": the mask IoU at which the binned mean first moves 10% away from
  the clean mean (down for higher-is-better metrics, up for the others), by linear
  interpolation between bins; "not reached" when the noisiest bin is still within 10%.
- A table per family and axis setting (cells, mean mask IoU, mean of each metric).
- Sample grids (each bundle's grid.png) side by side across severities for a few scenes.
  The page is meant to be shared, and a measurement row's ``grid_uri`` is only a string:
  a grid is embedded only when it lies inside the study's output (symlinks resolved) and
  is a PNG (its signature, then decoded), and then only its pixels, encoded afresh (no
  text chunks). Any other is left out, listed in report.json, summary.md, the page (cell
  and reason) and one warning line.

The bands are ``scipy.stats.bootstrap`` (percentile method); the page is the Jinja2
template ``templates/report.html.j2``, which lists figures from ``_figures`` (one entry per
figure: a new figure needs no template change).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import posixpath
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

from breakscene.errors import BreakSceneError
from breakscene.files.output_checks import check_plain_prefix
from breakscene.files.storage import exists, folder_state, join, publish_dir, read_bytes, refuse_foreign
from breakscene.files.strictjson import to_json

log = logging.getLogger(__name__)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# metric -> (label, higher is better)
METRICS = {
    "attention_iou": ("attention IoU with the clean mask", True),
    "attention_leak": ("attention mass outside the clean mask", False),
    "assigned_correct": ("token assigned to its own mask", True),
    "recon_in": ("denoising error inside the clean mask", False),
    "recon_out": ("denoising error outside the clean masks", False),
    "identity_sim": ("identity similarity", True),
    "prompt_sim": ("prompt similarity", True),
}
BINS = np.array([0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001])


def load_measurements(uri: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    path = uri if uri.endswith(".parquet") else join(uri, "measurements", "part-0.parquet")
    if not exists(path):
        raise FileNotFoundError(f"no study measurements at {path}")
    return pq.read_table(io.BytesIO(read_bytes(path))).to_pandas()


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of the mean. Percentile method: bins hold few points (often
    2 or 3) and BCa is undefined on them; a single point is its own interval."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    ci = bootstrap((values,), np.mean, n_resamples=n, confidence_level=0.95, method="percentile",
                   rng=rng).confidence_interval
    return float(ci.low), float(ci.high)


def binned(df: pd.DataFrame, metric: str, rng: np.random.Generator) -> pd.DataFrame:
    d = df[["mask_iou", metric]].dropna().astype(float)
    d["bin"] = np.digitize(d["mask_iou"], BINS) - 1
    rows = []
    for b, group in d.groupby("bin"):
        lo, hi = bootstrap_ci(group[metric].to_numpy(), rng)
        rows.append({"iou": group["mask_iou"].mean(), "mean": group[metric].mean(), "lo": lo, "hi": hi,
                     "n": len(group)})
    return pd.DataFrame(rows).sort_values("iou", ascending=False)


def iou_at_loss(curve: pd.DataFrame, clean_mean: float, higher_better: bool, loss: float = 0.10):
    """Mask IoU where the binned mean first moves ``loss`` away from the clean mean."""
    if curve.empty or not np.isfinite(clean_mean) or clean_mean == 0:
        return None
    target = clean_mean * (1 - loss) if higher_better else clean_mean * (1 + loss)
    prev_iou, prev_val = 1.0, clean_mean
    for _, row in curve.iterrows():
        crossed = row["mean"] <= target if higher_better else row["mean"] >= target
        if crossed:
            if row["mean"] == prev_val:
                return float(row["iou"])
            frac = (target - prev_val) / (row["mean"] - prev_val)
            return float(prev_iou + frac * (row["iou"] - prev_iou))
        prev_iou, prev_val = row["iou"], row["mean"]
    return None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def metric_figure(ok: pd.DataFrame, metric: str, families: list[str], rng) -> tuple[bytes, dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, higher = METRICS[metric]
    clean = ok[ok["family"] == "clean"]
    clean_mean = float(clean[metric].astype(float).mean()) if len(clean) else float("nan")
    cols = min(4, len(families))
    rows_n = int(np.ceil(len(families) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False, sharey=True)
    thresholds = {}
    for ax, family in zip(axes.flat, families):
        data = pd.concat([clean, ok[ok["family"] == family]])
        curve = binned(data, metric, rng)
        ax.scatter(data["mask_iou"], data[metric].astype(float), s=8, alpha=0.35, color="grey")
        if not curve.empty:
            ax.plot(curve["iou"], curve["mean"], color="C0", marker="o", ms=3)
            ax.fill_between(curve["iou"], curve["lo"], curve["hi"], color="C0", alpha=0.25)
        thresholds[family] = iou_at_loss(curve, clean_mean, higher)
        if thresholds[family] is not None:
            ax.axvline(thresholds[family], color="C3", ls="--", lw=1)
        ax.set_title(family, fontsize=9)
        ax.set_xlim(1.02, min(0.0, float(data["mask_iou"].min()) - 0.02))
        ax.set_xlabel("mask IoU with clean", fontsize=8)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes[0][0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{label} vs mask quality (bands: bootstrap 95% CI of bin means; dashed: 10% loss)",
                 fontsize=9, y=1.04)
    png = _png(fig)
    plt.close(fig)
    return png, thresholds


def quality_figure(df: pd.DataFrame, families: list[str]) -> tuple[bytes, dict]:
    """The pipeline's predicted mask quality against the true mask IoU, one panel per family
    (clean masks in every panel), with the Spearman correlation: how far to trust the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    d = df[["family", "mask_iou", "predicted_quality"]].dropna()
    clean = d[d["family"] == "clean"]
    cols = min(4, max(1, len(families)))
    rows_n = int(np.ceil(max(1, len(families)) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols, 2.8 * rows_n), squeeze=False)
    spearman = {}
    for ax, family in zip(axes.flat, families):
        data = pd.concat([clean, d[d["family"] == family]])
        x, y = data["mask_iou"].astype(float), data["predicted_quality"].astype(float)
        rho = spearmanr(x, y)[0] if len(data) > 2 and x.nunique() > 1 and y.nunique() > 1 else None
        spearman[family] = None if rho is None or np.isnan(rho) else round(float(rho), 3)
        ax.scatter(x, y, s=8, alpha=0.4, color="C0")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{family} (Spearman {spearman[family]})", fontsize=9)
        ax.set_xlabel("true mask IoU", fontsize=8)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes[0][0].set_ylabel("predicted quality", fontsize=8)
    png = _png(fig)
    plt.close(fig)
    return png, spearman


def family_table(ok: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    axis_cols = [c for c in ok.columns if c.startswith("axis_")]
    keys = ["family"] + axis_cols
    agg = {"mask_iou": "mean", "cell_id": "nunique", **{m: "mean" for m in metrics}}
    table = ok.astype({m: float for m in metrics}).groupby(keys, dropna=False).agg(agg).reset_index()
    return table.rename(columns={"cell_id": "cells"})


def study_root(results_uri: str) -> str:
    """The study's output: the URI given, or for its table OUT/measurements/part-0.parquet
    that OUT (any other Parquet file: the folder holding it)."""
    if not results_uri.endswith(".parquet"):
        return results_uri
    folder = posixpath.dirname(results_uri) or "."
    return (posixpath.dirname(folder) or ".") if posixpath.basename(folder) == "measurements" else folder


def located(uri: str) -> tuple[str, str]:
    """(protocol, normalised path); a local path absolute with its symlinks resolved, so
    that a link inside the output is judged by where it points."""
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        return "file", os.path.realpath(path)
    return protocol, posixpath.normpath("/" + path)


def inside(uri: str, root: str) -> str | None:
    """The URI to read ``uri`` from when it lies inside ``root``, else None."""
    (protocol, path), (root_protocol, root_path) = located(uri), located(root)
    if protocol != root_protocol or not path.startswith(root_path.rstrip("/") + "/"):
        return None
    return path if protocol == "file" else f"{protocol}://{path.lstrip('/')}"


def grid_png(grid_uri: str, root: str) -> tuple[bytes | None, str]:
    """(the grid's pixels as a fresh PNG, "") or (None, why it is left out)."""
    from PIL import Image

    uri = inside(grid_uri, root)
    if uri is None:
        return None, "outside the study output"
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, BreakSceneError) as exc:
        return None, f"cannot be read: {exc}"
    if not data.startswith(PNG_SIGNATURE):
        return None, "not a PNG file"
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"not a readable PNG ({exc})"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), ""


def sample_grids(ok: pd.DataFrame, root: str, n_scenes: int = 2) -> tuple[list, list[dict]]:
    """Per scene: (severity label, grid PNG) for the clean cell and each family's
    severities; and the grids left out ({cell_id, scene_id, grid_uri, reason})."""
    out, skipped = [], []
    for scene_id in sorted(ok["scene_id"].unique())[:n_scenes]:
        cells = ok[(ok["scene_id"] == scene_id) & (ok["grid_uri"].fillna("") != "")].drop_duplicates("cell_id")
        images = []
        for _, row in cells.sort_values(["family", "severity"]).iterrows():
            png, reason = grid_png(row["grid_uri"], root)
            if png is None:
                skipped.append({"cell_id": row["cell_id"], "scene_id": scene_id, "grid_uri": row["grid_uri"],
                                "reason": reason})
                continue
            images.append((f"{row['family']} {row['severity']:.2f} (IoU {row['mask_iou']:.2f})", png))
        out.append((scene_id, images))
    if skipped:
        log.warning("%d sample grid(s) left out: %s", len(skipped),
                    "; ".join(f"{g['grid_uri']} ({g['reason']})" for g in skipped))
    return out, skipped


def build_report(results_uri: str, out: str | Path) -> dict:
    """The report of a study's measurements into ``out``, a local folder or any fsspec URI:
    rendered in a temporary folder, then committed whole (``report.json`` last), so a report
    stopped half-way leaves nothing, and a folder is replaced only when an earlier report of
    this project is there."""
    out = str(out)
    check_plain_prefix(out, what="output")
    # a folder holding report.json is an earlier report (replaced); anything else is the user's
    refuse_foreign(out, folder_state(out, "report.json"), "report.json")
    df = load_measurements(results_uri)
    with tempfile.TemporaryDirectory(prefix="breakscene-report-") as tmp:
        summary = render_report(df, results_uri, Path(tmp))
        publish_dir(Path(tmp), out, marker="report.json")
    return summary


def render_report(df: pd.DataFrame, results_uri: str, out_dir: Path) -> dict:
    """index.html, figures/, summary.md and report.json of ``df`` in the local ``out_dir``."""
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"].copy()
    skipped = df[df["status"] != "ok"].drop_duplicates("cell_id")
    metrics = [m for m in METRICS if m in ok and ok[m].notna().any()]
    families = sorted(f for f in ok["family"].unique() if f != "clean")
    rng = np.random.default_rng(0)
    figures, thresholds = {}, {}
    for metric in metrics:
        png, thresholds[metric] = metric_figure(ok, metric, families, rng)
        (out_dir / "figures" / f"{metric}.png").write_bytes(png)
        figures[metric] = png
    quality_spearman = None
    if "predicted_quality" in df and df["predicted_quality"].notna().any():
        png, quality_spearman = quality_figure(df, families)
        (out_dir / "figures" / "predicted_quality.png").write_bytes(png)
        figures["predicted_quality"] = png
    table = family_table(ok, metrics)
    grids, skipped_grids = sample_grids(ok, study_root(results_uri))
    threshold_rows = [{"metric": m, **{f: ("not reached" if v is None else round(v, 3)) for f, v in t.items()}}
                      for m, t in thresholds.items()]
    (out_dir / "summary.md").write_text(_markdown(df, ok, skipped, threshold_rows, table, skipped_grids))
    (out_dir / "index.html").write_text(_html(results_uri, df, ok, skipped, figures, threshold_rows, table,
                                              (grids, skipped_grids)))
    summary = {"rows": len(df), "ok_rows": len(ok), "skipped_cells": len(skipped), "metrics": metrics,
               "families": families, "iou_at_10pct_loss": thresholds,
               "predicted_quality_spearman": quality_spearman, "skipped_grids": skipped_grids}
    (out_dir / "report.json").write_text(to_json(summary, indent=2))
    return summary


def _markdown(df, ok, skipped, threshold_rows, table, skipped_grids) -> str:
    lines = ["# Noisy-mask robustness report", "",
             f"{df['cell_id'].nunique()} cells, {ok['scene_id'].nunique()} scenes, {len(ok)} concept measurements; "
             f"{len(skipped)} cells left out of the statistics.", "",
             "## Mask IoU at which each metric has lost 10%", "", pd.DataFrame(threshold_rows).to_markdown(index=False),
             "", "## Per family and axis", "", table.round(4).to_markdown(index=False), ""]
    if len(skipped):
        lines += ["## Left out", "", skipped[["cell_id", "scene_id", "family", "severity", "reason"]]
                  .to_markdown(index=False), ""]
    if skipped_grids:
        lines += ["## Sample grids left out", "", pd.DataFrame(skipped_grids).to_markdown(index=False), ""]
    return "\n".join(lines)


def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def _figures(figures: dict[str, bytes]) -> list[dict]:
    """The page's figures in order: {title, alt, src, caption}."""
    titles = {m: label for m, (label, _) in METRICS.items()}
    titles["predicted_quality"] = "predicted mask quality (the pipeline's score) vs true mask IoU"
    return [{"title": titles[metric], "alt": metric, "src": _data_uri(png), "caption": ""}
            for metric, png in figures.items()]


def _html(results_uri, df, ok, skipped, figures, threshold_rows, table, grids_and_skipped) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("robustness", "templates"), autoescape=select_autoescape(["j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    left_out = skipped[["cell_id", "scene_id", "family", "severity", "reason"]] if len(skipped) else None
    grids, skipped_grids = grids_and_skipped
    # the page is shared: cell and reason only, the paths are in report.json and summary.md
    grids_left_out = pd.DataFrame(skipped_grids)[["cell_id", "scene_id", "reason"]] if skipped_grids else None
    return env.get_template("report.html.j2").render(
        results_uri=results_uri, n_cells=df["cell_id"].nunique(), n_scenes=ok["scene_id"].nunique(),
        n_measurements=len(ok), n_skipped=len(skipped),
        # pandas escapes cell text itself
        thresholds_table=Markup(pd.DataFrame(threshold_rows).to_html(index=False)),
        figures=_figures(figures), family_table=Markup(table.round(4).to_html(index=False)),
        grids=[{"scene_id": scene_id, "images": [{"label": label, "src": _data_uri(data)} for label, data in images]}
               for scene_id, images in grids],
        skipped_table=Markup(left_out.to_html(index=False)) if left_out is not None else None,
        skipped_grids_table=Markup(grids_left_out.to_html(index=False)) if grids_left_out is not None else None)

