"""One storage configuration for every reader and writer, and nothing written outside the
output (issue 17): S3 set up the standard way (the AWS environment, a profile) reaches
s3fs, delta-rs and the lease alike; the pre-flight proves the table writer works before
any work; output URIs with '..', '.' or '//' segments are refused; only this project's
own layout claims a folder; what is committed keeps the process's normal file mode.
An S3 server (moto) runs on 127.0.0.1 in its own process."""
import json
import os
import stat
from pathlib import Path

import fsspec
import pytest
import yaml

from breakscene.files import storage
from conftest import write_scene
from pipeline.records import read_table, write_tables
from pipeline.tables import delta_options
from commands.main import main
from pipeline.config import JobConfig
from batchjob.lease import Lease, read_lease
from batchjob.preflight import OUTPUT_MARKER, output_state
from pipeline.tables import check_job, table_store_error

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _forget_s3_clients() -> None:
    import s3fs

    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_server():
    from pipeline_helpers import free_port, moto_server_process

    with moto_server_process(free_port()) as endpoint:  # its own process: delta-rs holds the GIL
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No AWS setting from the machine: each test sets its own, as a user would."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _forget_s3_clients()
    yield monkeypatch
    _forget_s3_clients()


def _bucket(endpoint: str, name: str) -> str:
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def _objects(endpoint: str, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                           skip_instance_cache=True)
    return sorted(fs.find(prefix))


def _record(image_id: str, run_id: str) -> dict:
    return {"image": {"image_id": image_id, "image_uri": f"{image_id}.png", "manifest_row": 0, "width": 64,
                      "height": 64, "status": "ok", "error": None, "warnings": [], "mask_source": "user",
                      "n_masks": 1, "n_concepts": 0, "bundle_uri": "", "run_id": run_id},
            "masks": [{"image_id": image_id, "mask_index": 0, "source": "user",
                       "rle": {"size": [64, 64], "counts": "x"}, "quality": 0.5, "selected": True,
                       "run_id": run_id}],
            "concepts": []}


def _job(tmp_path: Path, output: str, **fields) -> Path:
    scene = write_scene(tmp_path / "scene")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_uri": str(scene / "img.png")}) + "\n")
    job = {"manifest": str(manifest), "output": output, "model": {"id": "tiny"}, **fields}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp_path / "job.yaml"


# --- 1. the same settings, from the same places, for every client ------------------------

def _profile(tmp_path: Path, endpoint: str) -> None:
    """A named profile holding the endpoint, the region and the keys (AWS CLI files)."""
    (tmp_path / "config").write_text(f"[profile lab]\nregion = eu-west-3\nendpoint_url = {endpoint}\n")
    (tmp_path / "credentials").write_text("[lab]\naws_access_key_id = testing\naws_secret_access_key = testing\n")


@pytest.mark.parametrize("where", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"])
def test_s3_from_the_aws_environment_reaches_every_writer(tmp_path, s3_server, aws_env, where):
    bucket = _bucket(s3_server, f"env-{where.lower().replace('_', '-')}")
    if where == "AWS_PROFILE":
        _profile(tmp_path, s3_server)
        aws_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
        aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        aws_env.setenv("AWS_PROFILE", "lab")
    else:
        aws_env.setenv(where, s3_server)
        for key, value in {**KEYS, "AWS_REGION": "eu-west-3"}.items():
            aws_env.setenv(key, value)
    out = f"s3://{bucket}/run"
    check_job(JobConfig(manifest={"uri": str(tmp_path)}, output=out))  # the table writer is probed too
    with Lease(out, "r1"):  # the lease's conditional put (s3fs)
        assert read_lease(out)["holder"] == "r1"
        storage.write_bytes(f"{out}/summary.json", b"{}")  # fsspec / s3fs
        write_tables(out, [_record("a", "r1")], run_id="r1")  # delta-rs
    assert [r["image_id"] for r in read_table(out, "images").to_pylist()] == ["a"]
    listed = _objects(s3_server, f"{bucket}/run")
    assert f"{bucket}/run/summary.json" in listed and any("/run/images/_delta_log/" in p for p in listed)
    assert not any(".breakscene-probe" in p for p in listed)  # the probes removed themselves
    settings = storage.s3_settings()  # what both clients were given
    assert (settings["endpoint_url"], settings["region"]) == (s3_server, "eu-west-3")


def test_job_file_options_win_over_the_environment_for_every_client(tmp_path, s3_server, aws_env):
    """The job names the server; the environment names another (unreachable) one."""
    bucket = _bucket(s3_server, "job-wins")
    aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for key, value in KEYS.items():
        aws_env.setenv(key, value)
    storage.configure({"s3": {"client_kwargs": {"endpoint_url": s3_server, "region_name": "us-west-2"}}})
    opts = delta_options(f"s3://{bucket}/run")
    assert opts["AWS_ENDPOINT_URL"] == s3_server and opts["AWS_REGION"] == "us-west-2"
    assert opts["AWS_ALLOW_HTTP"] == "true" and opts["AWS_ACCESS_KEY_ID"] == "testing"
    write_tables(f"s3://{bucket}/run", [_record("a", "r1")], run_id="r1")
    assert read_table(f"s3://{bucket}/run", "images").num_rows == 1


def test_the_table_writer_follows_the_jobs_timeout_and_retries(aws_env):
    storage.configure({"s3": {"client_kwargs": {"endpoint_url": "https://s3.example"}}}, timeout_s=4, retries=1)
    opts = delta_options("s3://bucket/run")
    assert (opts["timeout"], opts["connect_timeout"], opts["max_retries"]) == ("4000ms", "4000ms", "1")
    assert "AWS_ALLOW_HTTP" not in opts  # https: nothing to allow


def test_a_table_writer_misconfiguration_is_one_error_before_any_work(tmp_path, capsys, s3_server, aws_env):
    """delta-rs alone reads AWS_VIRTUAL_HOSTED_STYLE_REQUEST (s3fs works): the run stops at
    its pre-flight with one line naming the table writer, and writes nothing."""
    bucket = _bucket(s3_server, "misconfigured")
    aws_env.setenv("AWS_ENDPOINT_URL", s3_server)
    aws_env.setenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")
    aws_env.setenv("BREAKSCENE_IO_RETRIES", "0")
    for key, value in KEYS.items():
        aws_env.setenv(key, value)
    out = f"s3://{bucket}/run"
    assert main(["run", str(_job(tmp_path, out)), "--stop-after", "score"]) == 2
    err = one_error(capsys.readouterr().err)
    assert f"output {out} cannot be written by the Delta table writer (delta-rs)" in err
    assert s3_server in err  # the endpoint delta-rs really used
    assert _objects(s3_server, bucket) == []


def test_the_table_writers_error_chain_is_one_line():
    """The issue's message, as delta-rs prints it (coloured, one cause per line)."""
    chain = ("Generic S3 error\n  \x1b[31m↳\x1b[0m Error performing list request\n"
             "   \x1b[31m↳\x1b[0m Error performing GET http://127.0.0.1:9000/b?list-type=2&prefix=run%2F in 18µs"
             " - HTTP error\n    \x1b[31m↳\x1b[0m builder error\n     \x1b[31m↳\x1b[0m URL scheme is not allowed\n")
    assert table_store_error(OSError(chain)) == (
        "Generic S3 error: GET http://127.0.0.1:9000/b?list-type=2&prefix=run%2F: URL scheme is not allowed")


def test_a_missing_aws_profile_is_one_error(tmp_path, capsys, aws_env):
    aws_env.setenv("AWS_PROFILE", "typo")
    assert main(["run", str(_job(tmp_path, "s3://bucket/run"))]) == 2
    assert "The config profile (typo) could not be found" in one_error(capsys.readouterr().err)


# --- 2. output URIs that different clients would read differently ------------------------

BAD_PREFIXES = ["s3://bucket/a/../run", "s3://bucket/./run", "s3://bucket//run", "s3://bucket/run/..",
                "gs://bucket/a/./b"]


@pytest.mark.parametrize("uri", BAD_PREFIXES)
def test_run_gc_and_compact_refuse_dot_segments_and_empty_segments(tmp_path, capsys, uri):
    assert main(["run", str(_job(tmp_path, uri))]) == 2
    err = one_error(capsys.readouterr().err)
    assert f"output {uri}" in err and "'.', '..' or empty" in err
    for command in ("gc", "compact"):
        assert main([command, uri]) == 2
        assert uri in one_error(capsys.readouterr().err)


@pytest.mark.parametrize("uri", BAD_PREFIXES[:3])
def test_extract_refuses_dot_segments_in_out(tmp_path, capsys, uri):
    scene = write_scene(tmp_path / "scene")
    code = main(["extract", "--scene", str(scene), "--out", uri, "--model", "tiny"])
    assert code == 2 and f"--out {uri}" in one_error(capsys.readouterr().err)


def test_local_paths_with_dot_segments_stay_allowed(tmp_path):
    from breakscene.files.output_checks import check_output_dir

    (tmp_path / "a").mkdir()
    check_output_dir(str(tmp_path / "a" / ".." / "bundle"), marker="bundle.json")  # the OS resolves it once


# --- 3. only this project's own layout claims a folder -----------------------------------

def _tensorboard(out: Path) -> None:
    (out / "runs" / "Jan01_12-00-00_host").mkdir(parents=True)
    (out / "runs" / "Jan01_12-00-00_host" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"\x00tb")


def _mlflow(out: Path) -> None:
    (out / "mlruns" / "0").mkdir(parents=True)
    (out / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    (out / "runs").mkdir()
    (out / "runs" / "20240101T000000Z-abcdef.json").write_text("{}")  # looks like ours, alone is not enough


def _hydra(out: Path) -> None:
    (out / "outputs" / "2024-01-01" / "12-00-00" / ".hydra").mkdir(parents=True)
    (out / "outputs" / "2024-01-01" / "12-00-00" / ".hydra" / "config.yaml").write_text("lr: 1\n")
    (out / "runs").mkdir()
    (out / "summary.json").write_text('{"loss": 0.1}')


def _foreign_cells(out: Path) -> None:
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "a.json").write_text('{"cell": "mine"}')
    (out / "cells" / "notes.txt").write_text("keep me")


FOREIGN = {"tensorboard": _tensorboard, "mlflow": _mlflow, "hydra": _hydra, "cells": _foreign_cells}


@pytest.mark.parametrize("tool", sorted(FOREIGN))
def test_run_gc_and_compact_refuse_other_tools_folders_and_delete_nothing(tmp_path, capsys, tool):
    out = tmp_path / "logs"
    FOREIGN[tool](out)
    before = tree(out)
    assert main(["run", str(_job(tmp_path, str(out)))]) == 2
    assert "holds files that this project did not write" in one_error(capsys.readouterr().err)
    for command in ("gc", "compact"):
        assert main([command, str(out)]) == 2
        assert f"{out} is not a breakscene output" in one_error(capsys.readouterr().err)
    assert tree(out) == before
    assert output_state(str(out), "study") == "foreign"


def test_an_output_written_before_the_marker_is_still_ours(tmp_path):
    out = tmp_path / "out"
    run_id = "20240101T000000Z-abc123"
    write_tables(str(out), [_record("a", run_id)], run_id=run_id)
    summary = {"run_id": run_id, "job": "nightly", "manifest": "m.jsonl", "output": str(out), "counts": {"ok": 1},
               "tables": {"images": 1, "masks": 1}}
    storage.write_bytes(str(out / "runs" / f"{run_id}.json"), json.dumps(summary).encode())
    storage.write_bytes(str(out / "summary.json"), json.dumps(summary).encode())
    assert output_state(str(out), "pipeline") == "ours"
    assert main(["gc", str(out)]) == 0
    (out / "runs" / "notes.txt").write_text("a user's file among the runs")
    assert output_state(str(out), "pipeline") == "foreign"
    (out / "runs" / "notes.txt").unlink()
    (out / "summary.json").write_text('{"loss": 0.1}')
    assert output_state(str(out), "pipeline") == "foreign"
    assert not (out / OUTPUT_MARKER).exists()


def test_a_study_written_before_the_marker_is_still_ours(tmp_path):
    out = tmp_path / "study"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "0123456789abcdef.json").write_text(json.dumps({"cell_id": "0123456789abcdef", "rows": []}))
    (out / "study.json").write_text(json.dumps({"study": "s", "cells": 1, "measurement_rows": 0}))
    assert output_state(str(out), "study") == "ours"
    assert output_state(str(out), "pipeline") == "foreign"


# --- 4. what is committed keeps the process's normal file mode ---------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> set:
    return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


def test_a_folder_committed_by_rename_has_the_normal_mode(tmp_path, umask_022):
    import tempfile

    src = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as every temporary folder
    (src / "sub").mkdir()
    (src / "sub" / "w.bin").write_bytes(b"x")
    (src / "bundle.json").write_text("{}")
    storage.publish_dir(src, str(tmp_path / "bundle"), "bundle.json")
    assert _modes(tmp_path / "bundle") == {(True, 0o755), (False, 0o644)}
    with storage.atomic_local_dir(tmp_path / "other") as tmp:
        os.chmod(tmp, 0o700)
        (tmp / "x").write_text("x")
    assert _modes(tmp_path / "other") == {(True, 0o755), (False, 0o644)}


def test_a_bundle_is_readable_by_the_others_of_a_shared_output(tmp_path, umask_022, tiny_extractor):
    from breakscene.scenes.scene import load_scene_dir
    from conftest import quick_config

    scene = load_scene_dir(write_scene(tmp_path / "scene"))
    config = quick_config(phase1_steps=1, phase2_steps=1, phase2_mode="lora", grid_seeds=0, resolution=32,
                          prior={"enabled": False})
    tiny_extractor.extract(scene, config, out=str(tmp_path / "out" / "bundle"))
    assert _modes(tmp_path / "out" / "bundle") == {(True, 0o755), (False, 0o644)}
