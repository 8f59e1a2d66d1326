"""`breakscene run` at the edges a scheduler sees (issue 9): a one-CPU cluster must finish
(it deadlocked: the extract actor held the CPU the load task needed), and a run whose
rows failed must exit non-zero (3) with its summary written."""
import json
import os
import signal
import subprocess

import pytest

from conftest import ROOT
from pipeline_helpers import QUICK_EXTRACT, VENV_BIN, env, tables, write_job

pytestmark = pytest.mark.e2e
# a tiny scene on one CPU takes one to two minutes; a deadlock never ends
BOUND_S = int(os.environ.get("LIMITS_BOUND_S", 300))


def test_one_cpu_cluster_finishes_and_failed_rows_exit_3(tmp_path, examples):
    rows = [{"image_uri": str(examples / "bear" / "img.jpg"), "image_id": "bear",
             "mask_uris": [str(examples / "bear" / "mask0.png")]},
            {"image_uri": str(tmp_path / "gone1.jpg"), "image_id": "gone1"},
            {"image_uri": str(tmp_path / "gone2.jpg"), "image_id": "gone2"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out), resources={"num_cpus": 1},
                    extract={**QUICK_EXTRACT, "phase1_steps": 1, "phase2_steps": 1, "grid_seeds": 0})
    proc = subprocess.Popen([os.path.join(VENV_BIN, "breakscene"), "run", str(job)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # let the driver shut its embedded Ray down
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"a one-CPU run did not finish within {BOUND_S} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 3, stdout[-3000:] + stderr[-3000:]
    assert "resources: the cluster has 1 CPU(s)" in stdout  # the plan was fitted, and said so
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 1 and summary["counts"]["failed"] == 2
    assert "2 of 3 manifest rows failed (0.667 > max_failed_fraction 0)" in stderr
    images = {r["image_id"]: r["status"] for r in tables(str(out))["images"]}
    assert images == {"bear": "ok", "gone1": "failed", "gone2": "failed"}
    assert (out / "bundles" / "bear" / "bundle.json").is_file()
