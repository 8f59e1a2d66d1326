"""Pipeline commands (run, submit) registered on the ``breakscene`` parser."""
from __future__ import annotations

import json


def _job_args(p) -> None:
    p.add_argument("job", help="job YAML file (see jobs/)")
    p.add_argument("--manifest", help="override the job's manifest URI")
    p.add_argument("--output", help="override the job's output URI")
    p.add_argument("--force", action="store_true", help="redo images whose outputs are complete")


def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="run a pipeline job (embedded local Ray unless --address)")
    _job_args(run)
    run.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS or embedded)")
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="submit a job to a Ray cluster through the Jobs API")
    _job_args(submit)
    submit.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")
    submit.set_defaults(func=cmd_submit)
    report = sub.add_parser("report", help="HTML / PNG / Markdown report of a robustness study")
    report.add_argument("results", help="the study's output URI (or its measurements Parquet file)")
    report.add_argument("--out", required=True, help="local folder for index.html, figures/ and summary.md")
    report.set_defaults(func=cmd_report)


def _load(args):
    from .config import load_job

    overrides = {"manifest": args.manifest, "output": args.output}
    if args.force:
        overrides["force"] = True
    return load_job(args.job, overrides)


def cmd_run(args) -> int:
    from .run import run_job

    job = _load(args)
    if job.kind == "study":
        from .study import run_study

        print(json.dumps(run_study(job, address=args.address)))
        return 0
    summary = run_job(job, address=args.address)
    print(json.dumps({k: summary[k] for k in ("run_id", "counts", "seconds", "images_per_hour", "tables")}))
    for err in summary["errors"]:
        print(f"  failed {err['image_id']}: {err['error']}")
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    job = _load(args)
    return submit(job, args.job, args.address, wait=not args.no_wait, manifest=args.manifest,
                  output=args.output, force=args.force)


def cmd_report(args) -> int:
    from breakscene.errors import BreakSceneError

    from .report import build_report

    try:
        summary = build_report(args.results, args.out)
    except FileNotFoundError as exc:
        raise BreakSceneError(str(exc)) from None
    print(json.dumps({"out": args.out, **{k: summary[k] for k in ("rows", "ok_rows", "skipped_cells", "metrics")}}))
    return 0
