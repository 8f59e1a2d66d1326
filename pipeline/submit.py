"""``breakscene submit``: send a job to a Ray cluster through the Jobs API, stream its log,
and exit with its outcome. The entrypoint is ``breakscene run`` on the same job file."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from breakscene.errors import BreakSceneError

from .config import JobConfig

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(job_file: str, manifest: str | None, output: str | None, force: bool) -> str:
    parts = ["breakscene", "run", job_file]
    if manifest:
        parts += ["--manifest", manifest]
    if output:
        parts += ["--output", output]
    if force:
        parts.append("--force")
    return shlex.join(parts)


def runtime_env(job: JobConfig, job_file: str) -> dict:
    env = dict(job.runtime_env)
    env.setdefault("working_dir", str(Path(job_file).resolve().parent.parent
                                      if Path(job_file).parent.name == "jobs" else Path.cwd()))
    return env


def submit(job: JobConfig, job_file: str, address: str, wait: bool, manifest: str | None = None,
           output: str | None = None, force: bool = False, poll_seconds: float = 1.0) -> int:
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection problems of every kind
        raise BreakSceneError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None
    rel = str(Path(job_file).resolve().relative_to(Path(runtime_env(job, job_file)["working_dir"]).resolve()))
    job_id = client.submit_job(entrypoint=entrypoint(rel, manifest, output, force),
                               runtime_env=runtime_env(job, job_file), metadata={"job": job.name})
    print(f"submitted {job_id} to {address}", flush=True)
    if not wait:
        return 0
    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}", flush=True)
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_seconds)
