"""The pipeline against real parts: an S3-compatible server on 127.0.0.1 (moto), and a
real `ray start --head` cluster with a logical GPU receiving the job via the Jobs API."""
import json
import os
import secrets
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT
from pipeline_helpers import VENV_BIN, env, free_port, run_cli, stop_ray_cluster, tables, write_job

pytestmark = pytest.mark.e2e
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint(monkeypatch):
    from pipeline_helpers import moto_server_process

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    with moto_server_process(free_port()) as endpoint:  # its own process: delta-rs reads the tables here
        yield endpoint


def _rows(examples, prefix):
    rows = [{"image_uri": f"{prefix}/{n}/img.jpg", "image_id": n,
             "mask_uris": [f"{prefix}/{n}/mask{i}.png" for i in range(3)]} for n in ("bear", "chicken")]
    rows.append({"image_uri": f"{prefix}/nowhere/img.jpg", "image_id": "missing"})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def _shape(t):
    """What must match between stores: ids, statuses, masks (RLE), concept wiring."""
    return {
        "images": sorted((r["image_id"], r["status"], r["width"], r["height"], r["n_concepts"]) for r in t["images"]),
        "masks": sorted((r["image_id"], r["mask_index"], r["rle"]["counts"], r["selected"]) for r in t["masks"]),
        "concepts": sorted((r["image_id"], r["concept_index"], r["token"], r["mask_index"]) for r in t["concepts"]),
    }


def test_same_job_on_s3_writes_the_same_tables(tmp_path, examples, s3_endpoint):
    import s3fs

    from breakscene.files.storage import configure

    storage = {"s3": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}}
    fs = s3fs.S3FileSystem(**storage["s3"])
    fs.mkdir("data")
    for n in ("bear", "chicken"):
        for f in ["img.jpg"] + [f"mask{i}.png" for i in range(3)]:
            fs.put_file(str(examples / n / f), f"data/in/{n}/{f}")
    fs.pipe("data/in/manifest.jsonl", _rows(examples, "s3://data/in").encode())
    (tmp_path / "manifest.jsonl").write_text(_rows(examples, str(examples)).replace(
        f"{examples}/nowhere", str(tmp_path / "nowhere")))

    s3_job = write_job(tmp_path / "s3.yaml", "s3://data/in/manifest.jsonl", "s3://data/out", max_failed_fraction=0.5,
                       storage={"options": storage})
    local_job = write_job(tmp_path / "local.yaml", str(tmp_path / "manifest.jsonl"), str(tmp_path / "out"),
                          max_failed_fraction=0.5)  # the missing image fails on purpose
    for job in (s3_job, local_job):
        proc = run_cli("run", str(job), **CREDS)
        assert proc.returncode == 0, proc.stderr[-3000:]

    configure(storage)
    remote, local = tables("s3://data/out"), tables(str(tmp_path / "out"))
    assert _shape(remote) == _shape(local)
    assert len(remote["concepts"]) == 6
    assert all(c["bundle_uri"].startswith("s3://data/out/bundles/") for c in remote["concepts"])
    assert fs.exists("data/out/bundles/bear/bundle.json") and fs.exists("data/out/bundles/bear/grid.png")
    assert fs.exists("data/out/summary.json") and fs.exists("data/out/records/missing.json")
    assert json.loads(fs.cat("data/out/summary.json"))["counts"] == {"ok": 2, "failed": 1, "skipped": 0,
                                                                    "resumed": 0, "duplicate": 0}


def test_submit_to_a_real_ray_cluster_through_the_jobs_api(tmp_path, examples):
    project = tmp_path / "project"
    rows = [{"image_uri": str(examples / n / "img.jpg"), "image_id": n,
             "mask_uris": [str(examples / n / f"mask{i}.png") for i in range(3)]} for n in ("creature", "toys")]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    # `working_dir: .` is the job file's project (pyproject.toml above it), not the folder
    # `breakscene submit` runs in (the repository root: there jobs/job.yaml does not exist)
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'user-project'\n")
    job = write_job(project / "jobs" / "job.yaml", str(tmp_path / "manifest.jsonl"), str(out),
                    runtime_env={"working_dir": "."}, resources={})
    # the client finds the token as Ray's CLI does: here only in $HOME/.ray/auth_token
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    gcs, dashboard = free_port(), free_port()
    # Ray >= 2.59 authenticates local clusters; cluster and client share one token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    (home / ".ray" / "auth_token").write_text(auth["RAY_AUTH_TOKEN"] + "\n")
    client = {"HOME": str(home)}  # neither RAY_AUTH_TOKEN nor RAY_AUTH_MODE
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    start = subprocess.run(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=1",
         f"--ray-client-server-port={free_port()}", "--include-dashboard=true", "--disable-usage-stats",
         # the job agent's HTTP port defaults to 52365: another Ray on the machine would leave
         # this cluster without a job agent ("No available agent to submit job")
         f"--dashboard-agent-listen-port={free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env(**auth), capture_output=True, text=True, timeout=300)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 240
        while True:  # the dashboard's job endpoint and its job agent come up a while after `ray start` returns
            proc = run_cli("submit", str(job), "--address", address, "--submission-id", "nightly-test-1", **client)
            starting = "cannot reach" in proc.stderr or "No available agent" in proc.stderr
            if proc.returncode == 0 or time.time() > deadline or not starting:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "SUCCEEDED" in proc.stdout and "submitted nightly-test-1" in proc.stdout
        assert "2 to process" in proc.stdout  # the driver's log, followed through tail_job_logs
        t = tables(str(out))
        assert sorted(r["image_id"] for r in t["images"]) == ["creature", "toys"]
        assert all(r["status"] == "ok" for r in t["images"]) and len(t["concepts"]) == 6
        # the extraction actors asked for the cluster's (logical) GPU
        summary = json.loads((out / "summary.json").read_text())
        assert summary["counts"]["ok"] == 2
        # docs/pipeline.md's plain `ray job submit` form, as written there, from the project's folder
        form = subprocess.run(
            [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": [".venv/", "out/", ".git/"]}), "--",
             "breakscene", "--version"], cwd=ROOT, env=env(**auth), capture_output=True, text=True, timeout=300)
        assert form.returncode == 0 and "succeeded" in form.stdout.lower(), form.stdout[-3000:] + form.stderr[-3000:]
        assert "breakscene" in form.stdout
    finally:
        assert stop_ray_cluster(temp_dir, gcs) > 0
