"""``breakscene report``: the robustness study's results as an HTML / PNG / Markdown report."""
from __future__ import annotations

from breakscene.files.strictjson import to_json


def add_parsers(sub) -> None:
    report = sub.add_parser("report", help="HTML / PNG / Markdown report of a robustness study")
    report.add_argument("results", help="the study's output URI (or its measurements Parquet file)")
    report.add_argument("--out", "--output", dest="out", required=True,
                        help="folder or fsspec URI (s3://...) for index.html, figures/, summary.md and report.json; "
                             "committed whole, replacing only an earlier report")
    report.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from breakscene.errors import BreakSceneError

    from robustness.report import build_report

    try:
        summary = build_report(args.results, args.out)
    except FileNotFoundError as exc:
        raise BreakSceneError(str(exc)) from None
    print(to_json({"out": args.out, **{k: summary[k] for k in ("rows", "ok_rows", "skipped_cells", "metrics")},
                      "skipped_grids": len(summary["skipped_grids"])}))
    return 0
