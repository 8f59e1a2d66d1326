"""Issue 17, secrets: what a shared report reads and what ``breakscene submit`` uploads.

- ``breakscene report`` embeds a sample grid only when it is a PNG inside the study's
  output (the path with its symlinks resolved); every other grid_uri (a credentials file,
  ``../``, a non-PNG, a symlink out) is left out and listed, never read into the page.
- ``breakscene submit`` leaves well-known secret files out of the working_dir upload, says
  so in one stderr line, and sends one only when the job names it (``!NAME`` in
  runtime_env.excludes). What Ray would upload is checked with Ray's own packaging.
"""
import base64
import io
import json
import logging
import re
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, PngImagePlugin

from commands.jobs import load_job
from batchjob.submit import SECRET_EXCLUDES, check_upload, job_runtime_env, upload_files, withheld_secrets
from robustness.report import build_report

SECRET = "AKIAIOSFODNN7EXAMPLE-wJalrXUtnFEMI-K7MDENG"


# 1. the report reads only PNGs inside the study's output

def _grid_png(examples, path, text: str | None = None):
    """A real photo as the grid PNG; ``text`` goes into a tEXt chunk (a PNG can carry anything)."""
    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(examples / "toys" / "img.jpg").resize((96, 96)).save(path, pnginfo=info)
    return path


def _study(tmp_path, examples):
    """A study output with hand-made measurements: one honest grid and four that are not."""
    study, outside = tmp_path / "study", tmp_path / "home"
    (outside / ".aws").mkdir(parents=True)
    (outside / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    _grid_png(examples, outside / "grid.png", text=SECRET)  # a PNG, but outside the output
    real = _grid_png(examples, study / "bundles" / "c0" / "grid.png")
    (study / "bundles" / "c2").mkdir(parents=True)
    (study / "bundles" / "c2" / "grid.png").write_text(f"token={SECRET}\n")  # named .png, not a PNG
    (study / "bundles" / "c4").mkdir(parents=True)
    (study / "bundles" / "c4" / "grid.png").symlink_to(outside / "grid.png")
    grids = {"c0": str(real), "c1": str(outside / ".aws" / "credentials"),
             "c2": str(study / "bundles" / "c2" / "grid.png"),
             "c3": str(study / "bundles" / "c0" / ".." / ".." / ".." / "home" / "grid.png"),
             "c4": str(study / "bundles" / "c4" / "grid.png")}
    rows = []
    for i, (family, sev, iou) in enumerate([("clean", 0.0, 1.0), ("dilate", 0.5, 0.8), ("dilate", 1.0, 0.5),
                                            ("erode", 0.5, 0.7), ("erode", 1.0, 0.4)]):
        rows.append({"cell_id": f"c{i}", "scene_id": "s", "concept_index": 0, "family": family, "severity": sev,
                     "seed": 0, "status": "ok", "reason": "", "mask_iou": iou, "attention_iou": iou / 2,
                     "grid_uri": grids[f"c{i}"]})
    (study / "measurements").mkdir()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), study / "measurements" / "part-0.parquet")
    return study, real


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.parametrize("results", ["folder", "parquet"])
def test_report_embeds_only_pngs_inside_the_study_output(tmp_path, examples, caplog, results):
    study, real = _study(tmp_path, examples)
    uri = str(study) if results == "folder" else str(study / "measurements" / "part-0.parquet")
    with caplog.at_level(logging.WARNING):
        summary = build_report(uri, tmp_path / "report")
    skipped = {g["cell_id"]: g["reason"] for g in summary["skipped_grids"]}
    assert sorted(skipped) == ["c1", "c2", "c3", "c4"]
    assert "outside the study output" in skipped["c1"] and "outside the study output" in skipped["c3"]
    assert "outside the study output" in skipped["c4"]  # a symlink is judged by where it points
    assert "not a PNG" in skipped["c2"]
    # said where the user looks: report.json, summary.md, one log line
    assert json.loads((tmp_path / "report" / "report.json").read_text())["skipped_grids"] == summary["skipped_grids"]
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "Sample grids left out" in md and "credentials" in md
    lines = [r.getMessage() for r in caplog.records if "sample grid" in r.getMessage()]
    assert len(lines) == 1 and "4 sample grid(s) left out" in lines[0]

    page = (tmp_path / "report" / "index.html").read_text()
    images = _embedded(page)
    # one metric figure and the one honest grid, whose pixels are the file's
    assert len(images) == 2
    grid = np.asarray(Image.open(io.BytesIO(images[1])))
    assert np.array_equal(grid, np.asarray(Image.open(real).convert("RGB")))
    # the secret is nowhere: not in the page, not inside an embedded PNG, not in any output file
    assert SECRET not in page and not any(SECRET.encode() in png for png in images)
    for path in (tmp_path / "report").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_report_strips_what_an_honest_png_carries_besides_pixels(tmp_path, examples):
    """A PNG inside the output is decoded and encoded again: only its pixels reach the page."""
    study, real = _study(tmp_path, examples)
    _grid_png(examples, real, text=SECRET)
    summary = build_report(str(study), tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert len(_embedded(page)) == 2 and "c0" not in {g["cell_id"] for g in summary["skipped_grids"]}
    assert not any(SECRET.encode() in png for png in _embedded(page))


# 2. submit leaves secret files out of the upload

SECRETS = [".env", ".env.production", ".aws/credentials", ".ssh/id_ed25519", "id_rsa", "keys/id_ecdsa",
           "deploy/server.pem", "deploy/tls.key", ".npmrc", ".pypirc", ".netrc", ".git-credentials",
           ".docker/config.json", "conf/credentials.json", "certs/client.p12", ".kube/config",
           "sub/.ray/auth_token", ".huggingface/token", ".config/gcloud/application_default_credentials.json",
           "kaggle.json", ".pgpass", ".vault-token"]
CODE = [".gitignore", "jobs/job.yaml", "pkg/code.py", "pkg/keys.py", "pyproject.toml", "docs/environment.md"]


def _project(root, excludes=None):
    for rel in CODE + SECRETS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"secret {SECRET}\n" if rel in SECRETS else "x = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    runtime_env = {"working_dir": "."} if excludes is None else {"working_dir": ".", "excludes": excludes}
    (root / "jobs" / "job.yaml").write_text(yaml.safe_dump({"output": "out/x", "manifest": "m.jsonl",
                                                             "runtime_env": runtime_env}))
    return root / "jobs" / "job.yaml"


def _ray_package(tmp_path, env) -> list[str]:
    """The files in the zip Ray itself builds from this runtime_env (what submit_job uploads)."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
    with zipfile.ZipFile(target) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/"))


def test_secret_files_stay_out_of_the_package_ray_builds(tmp_path):
    job_file = _project(tmp_path / "project")
    env = job_runtime_env(load_job(job_file), str(job_file))
    packaged = _ray_package(tmp_path, env)
    assert packaged == sorted(CODE)
    # the size check walks exactly what Ray packages
    assert sorted(rel for rel, _ in upload_files(env["working_dir"], env["excludes"])) == packaged
    assert check_upload(env, 1024 * 1024)[0] == len(CODE)
    assert sorted(withheld_secrets(env)) == sorted(SECRETS)


def test_a_job_can_send_a_secret_file_by_naming_it(tmp_path):
    """``!NAME`` in runtime_env.excludes (gitignore's negation, read by Ray as by us) sends it."""
    job_file = _project(tmp_path / "project", excludes=["!.npmrc", "!.aws/credentials", "docs/"])
    env = job_runtime_env(load_job(job_file), str(job_file))
    packaged = _ray_package(tmp_path, env)
    expected = sorted([*CODE, ".npmrc", ".aws/credentials"])
    expected.remove("docs/environment.md")
    assert packaged == expected
    assert sorted(rel for rel, _ in upload_files(env["working_dir"], env["excludes"])) == packaged
    assert sorted(withheld_secrets(env)) == sorted(set(SECRETS) - {".npmrc", ".aws/credentials"})


def test_secret_patterns_are_the_documented_list():
    assert ".env" in SECRET_EXCLUDES and ".ssh/" in SECRET_EXCLUDES and "*.pem" in SECRET_EXCLUDES
    assert not any(p.startswith("!") for p in SECRET_EXCLUDES)  # a negation is the user's, never ours


def test_submit_names_the_files_it_left_out_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the command line, up to the cluster (nothing listens on 127.0.0.1:9): one
    stderr line names every withheld file before the connection is tried."""
    from commands.main import main

    job_file = _project(tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    code = main(["submit", str(job_file), "--address", "http://127.0.0.1:9", "--no-wait"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "left out of the upload" in line]
    assert len(lines) == 1 and "!NAME" in lines[0]
    assert all(rel in lines[0] for rel in SECRETS) and SECRET not in err
    assert code != 0 and "error:" in err  # and then the unreachable cluster, as before


def test_inside_the_output_is_decided_on_normalised_paths():
    from robustness.report import inside, study_root

    assert study_root("s3://b/study") == "s3://b/study"
    assert study_root("s3://b/study/measurements/part-0.parquet") == "s3://b/study"
    assert study_root("/data/m.parquet") == "/data" and study_root("m.parquet") == "."
    assert inside("s3://b/study/bundles/c/grid.png", "s3://b/study/") == "s3://b/study/bundles/c/grid.png"
    for uri in ("s3://b/study/../other/grid.png", "s3://b/study-2/grid.png", "gs://b/study/grid.png",
                "https://b/study/grid.png", "/b/study/grid.png", "s3://b/study"):
        assert inside(uri, "s3://b/study") is None, uri
