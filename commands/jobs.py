"""Pipeline commands (run, submit) registered on the ``breakscene`` parser."""
from __future__ import annotations

import sys

from breakscene.files.strictjson import to_json

# Exit codes a scheduler (RayJob, CronJob, CI) can act on; shown in `run --help`, docs/bad-input.md.
EXIT_TOO_MANY_FAILED = 3
RUN_EXIT_CODES = ("exit status: 0 the run finished and its failed rows, if any, are within max_failed_fraction; "
                  "1 an unexpected error (a traceback); 2 bad input or configuration, one 'error:' line naming it, "
                  "found before any image is processed; 3 the run finished and wrote its tables and summary, but "
                  "more than the job's max_failed_fraction (default 0) of its manifest rows failed; 4 the output "
                  "stopped taking writes mid-run (full disk, read-only): nothing of the run was committed, a rerun "
                  "resumes; 130 / 143 stopped by Ctrl-C / SIGTERM, the lease released.")
SUBMIT_EXIT_CODES = ("exit status: 0 submitted (--no-wait) or the job succeeded; 2 bad input (job file, runtime "
                     "env, address, token, an upload over the size limit) or the job's own exit status 2; 3 the "
                     "job's `breakscene run` exited 3 (too many failed rows); 4 the job's `breakscene run` exited 4 "
                     "(the output stopped taking writes); 1 the job failed or was stopped otherwise.")


def failed_share_message(counts: dict, max_failed_fraction: float) -> str | None:
    """Why a finished run exits 3, or None: the share of manifest rows that failed is
    above the job's limit."""
    total = sum(counts.values())
    failed = counts.get("failed", 0)
    if not total or failed / total <= max_failed_fraction:
        return None
    return (f"{failed} of {total} manifest rows failed ({failed / total:.3g} > max_failed_fraction "
            f"{max_failed_fraction:g})")


def _job_args(p) -> None:
    p.add_argument("job", help="job YAML file (see jobs/)")
    p.add_argument("--manifest", help="override the job's manifest URI")
    p.add_argument("--output", "--out", dest="output", help="override the job's output URI")
    p.add_argument("--force", action="store_true", help="redo images whose outputs are complete")


def add_parsers(sub) -> None:
    from batchjob.submit import DEFAULT_MAX_UPLOAD_MIB

    run = sub.add_parser("run", help="run a pipeline job (embedded local Ray unless --address)",
                         epilog=RUN_EXIT_CODES)
    _job_args(run)
    run.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS or embedded)")
    run.add_argument("--stop-after", choices=("score", "extract"),
                     help="'score': load, segment, score and select only, writing the images and masks tables "
                          "(no diffusion model); default: the job's stop_after (extract)")
    run.set_defaults(func=cmd_run)
    compact = sub.add_parser("compact", help="compact a pipeline output's Delta tables (small files into larger "
                                             "ones) and delete files Delta marked removed before the retention")
    compact.add_argument("output", help="the pipeline's output URI")
    compact.add_argument("--retention-hours", type=int, default=168,
                         help="keep removed files (time travel) this long")
    compact.set_defaults(func=cmd_compact)
    gc = sub.add_parser("gc", help="remove half-written bundles and uncommitted staging left by killed runs "
                                   "(checks every bundle: runs themselves clear only the images they process)")
    gc.add_argument("output", help="the pipeline's output URI")
    gc.set_defaults(func=cmd_gc)
    submit = sub.add_parser("submit", help="submit a job to a Ray cluster through the Jobs API",
                            epilog=SUBMIT_EXIT_CODES)
    _job_args(submit)
    submit.add_argument("--address", help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, "
                                          "else http://127.0.0.1:8265); the token is found as Ray's CLI finds it: "
                                          "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted")
    submit.add_argument("--submission-id", help="the job's id on the cluster (default: one Ray generates)")
    submit.add_argument("--runtime-env", metavar="FILE",
                        help="runtime_env YAML replacing the job file's (a relative working_dir is resolved "
                             "against the project that FILE belongs to)")
    submit.add_argument("--max-upload-mib", type=float, default=DEFAULT_MAX_UPLOAD_MIB,
                        help="refuse a working_dir upload larger than this")
    submit.set_defaults(func=cmd_submit)



def load_job(path, overrides: dict | None = None):
    """A job file's validated config: an extraction ``JobConfig``, or for ``kind: study``
    the robustness study's ``StudyConfig``."""
    from batchjob.jobfile import read_job

    return read_job(path, overrides, {"extract": extract_config, "study": study_config})


def extract_config() -> type:
    from pipeline.config import JobConfig

    return JobConfig


def study_config() -> type:
    from robustness.grid import StudyConfig  # the study's package, only for study files

    return StudyConfig


def _load(args):
    overrides = {"manifest": args.manifest, "output": args.output, "stop_after": getattr(args, "stop_after", None)}
    if args.force:
        overrides["force"] = True
    return load_job(args.job, overrides)


def cmd_run(args) -> int:
    from pipeline.run import run_job

    job = _load(args)
    if job.kind == "study":
        from robustness.driver import run_study

        print(to_json(run_study(job, address=args.address)))
        return 0
    summary = run_job(job, address=args.address)
    print(to_json({k: summary[k] for k in ("run_id", "counts", "seconds", "images_per_hour", "tables")}))
    for err in summary["errors"]:
        print(f"  failed {err['image_id']}: {err['error']}")
    too_many = failed_share_message(summary["counts"], job.max_failed_fraction)
    if too_many:  # the summary and tables are written; the scheduler must still see a failure
        print(f"breakscene run: {too_many}: exit status {EXIT_TOO_MANY_FAILED}", file=sys.stderr, flush=True)
        return EXIT_TOO_MANY_FAILED
    return 0


def cmd_submit(args) -> int:
    from batchjob.submit import submit

    job = _load(args)
    return submit(job, args.job, args.address, wait=not args.no_wait, manifest=args.manifest,
                  output=args.output, force=args.force, submission_id=args.submission_id,
                  runtime_env_file=args.runtime_env, max_upload_mib=args.max_upload_mib)


def _holding(output: str, what: str):
    """Hold the output's lease (no run may commit meanwhile); only on an output of ours,
    and only once the table writer is known to reach it (one error, not a delta-rs trace)."""
    from batchjob.lease import Lease
    from batchjob.preflight import check_existing_output
    from pipeline.tables import check_table_writer

    check_existing_output(output)
    check_table_writer(output)
    return Lease(output, f"breakscene {what}")


def cmd_compact(args) -> int:
    from pipeline.records import TABLES
    from pipeline.tables import compact
    from pipeline.intent import roll_forward

    with _holding(args.output, "compact"):
        roll_forward(args.output)  # a run killed during its commits: finished before compaction
        result = compact(args.output, TABLES, retention_hours=args.retention_hours)
    print(to_json({"output": args.output, "tables": result}))
    return 0


def cmd_gc(args) -> int:
    from pipeline.intent import roll_forward
    from pipeline.run import cleanup_partial

    with _holding(args.output, "gc"):
        roll_forward(args.output)  # its staged rows are still needed: committed, not deleted
        removed = cleanup_partial(args.output)
    print(to_json({"output": args.output, "removed": removed}))
    return 0
