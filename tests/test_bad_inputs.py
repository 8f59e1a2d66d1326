"""Bad input as a user gives it (issue 9): one `error:` line, exit status 2, found before
any model is loaded, and nothing the user owns is ever deleted. Servers (a silent HTTP
server, an S3 server) are started here on 127.0.0.1."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, write_scene
from commands.main import main
from net_helpers import refused_url, silent_server, status_server

CHEAP = ["--model", "tiny", "--phase1-steps", "1", "--phase2-steps", "1", "--no-prior-preservation",
         "--resolution", "32", "--grid-seeds", "0"]


def extract(capsys, *args):
    """(exit status, stderr) of `breakscene extract ARGS`, in this process."""
    code = main(["extract", *args, *CHEAP])
    return code, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody may write: chmod for a normal user; a read-only system folder for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        Path(tempfile.mkdtemp(dir=folder)).rmdir()  # root ignores permissions
    except OSError:
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            Path(tempfile.mkdtemp(dir=candidate)).rmdir()
        except OSError:
            return candidate
    pytest.skip("no read-only folder on this machine")


# --- nothing a user owns is deleted ---------------------------------------

def test_extract_never_deletes_a_users_files(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    keep = tmp_path / "d" / "keep"
    keep.mkdir(parents=True)
    (keep / "notes.txt").write_text("my notes")
    code, err = extract(capsys, "--scene", str(scene), "--out", str(keep))
    assert code == 2
    assert str(keep) in one_error(err) and "did not write" in err
    assert (keep / "notes.txt").read_text() == "my notes" and sorted(os.listdir(keep)) == ["notes.txt"]
    assert sorted(os.listdir(keep.parent)) == ["keep"]  # no temporary folder left either


@pytest.mark.parametrize("where", ["scene", "inside_scene", "image", "mask", "class_data"])
def test_extract_refuses_an_output_that_is_an_input(tmp_path, capsys, where):
    scene = write_scene(tmp_path / "scene")
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (32, 32)).save(classes / "0000.png")
    before = tree(tmp_path)
    out = {"scene": scene, "inside_scene": scene / "out", "image": scene / "img.png",
           "mask": scene / "mask1.png", "class_data": classes}[where]
    if where in ("scene", "inside_scene"):
        args = ["--scene", str(scene)]
    else:
        args = ["--image", str(scene / "img.png"), "--mask", str(scene / "mask0.png"),
                "--mask", str(scene / "mask1.png")]
    if where == "class_data":
        args += ["--class-data-dir", str(classes), "--prior-preservation"]
    code, err = extract(capsys, *args, "--out", str(out))
    assert code == 2 and str(out) in one_error(err)
    assert tree(tmp_path) == before


def test_extract_refuses_a_file_as_output(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    (tmp_path / "report.pdf").write_bytes(b"%PDF mine")
    code, err = extract(capsys, "--scene", str(scene), "--out", str(tmp_path / "report.pdf"))
    assert code == 2 and "report.pdf is a file" in one_error(err)
    code, err = extract(capsys, "--scene", str(scene), "--out", str(tmp_path / "report.pdf" / "bundle"))
    assert code == 2 and "report.pdf is a file" in one_error(err)
    assert (tmp_path / "report.pdf").read_bytes() == b"%PDF mine"


def test_extract_refuses_an_unwritable_output_before_any_work(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    ro = read_only_dir(tmp_path)
    start = time.perf_counter()
    code, err = extract(capsys, "--scene", str(scene), "--out", str(ro / "new" / "bundle"))
    assert code == 2 and "cannot be written" in one_error(err) and str(ro) in err
    assert time.perf_counter() - start < 30  # no model was loaded, nothing trained


def test_replacing_a_bundle_stays_allowed(tmp_path):
    from breakscene.errors import OutputError
    from breakscene.files.output_checks import check_output_dir

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds a bundle; pass --force"):
        check_output_dir(str(bundle), marker="bundle.json")
    check_output_dir(str(bundle), marker="bundle.json", replace=True)
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), marker="bundle.json")


# --- clear errors instead of tracebacks ----------------------------------------

@pytest.mark.parametrize("text, message", [
    ("phase1_steps: [1\n", "is not valid YAML (line 2"),
    ("- phase1_steps: 1\n", "must be a mapping"),
    ("prior: true\n", "prior: Input should be a valid dictionary"),
    ("lambda_attn: much\n", "lambda_attn: Input should be a valid number"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    scene = write_scene(tmp_path / "scene")
    (tmp_path / "c.yaml").write_text(text)
    code, err = extract(capsys, "--scene", str(scene), "--config", str(tmp_path / "c.yaml"),
                        "--out", str(tmp_path / "out"))
    assert code == 2 and message in one_error(err) and str(tmp_path / "c.yaml") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, message", [
    ("banana", "device 'banana' is not a device"),
    ("cuda", "CUDA is not available on this machine"),
    ("cuda:99", "CUDA"),
])
def test_bad_devices(tmp_path, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    scene = write_scene(tmp_path / "scene")
    code, err = extract(capsys, "--scene", str(scene), "--device", device, "--out", str(tmp_path / "out"))
    assert code == 2 and message in one_error(err)
    assert not (tmp_path / "out").exists()


def test_a_file_as_scene_is_not_a_folder(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene")
    code, err = extract(capsys, "--scene", str(scene / "img.png"), "--out", str(tmp_path / "out"))
    assert code == 2 and "img.png is not a folder" in one_error(err)


# --- remote inputs and outputs ---------------------------------------------

def test_extract_from_a_silent_server_ends_with_an_error_line(tmp_path):
    """In a child process: before the fix it hung forever."""
    with silent_server() as url:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "commands.main", "extract", "--image", f"{url}/img.png", "--mask",
             f"{url}/mask0.png", "--out", str(tmp_path / "out"), *CHEAP], cwd=ROOT, capture_output=True,
            text=True, timeout=240,
            env={**os.environ, "BREAKSCENE_IO_TIMEOUT_S": "1", "BREAKSCENE_IO_RETRIES": "1"})
        seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    line = one_error(proc.stderr)
    assert f"{url}/img.png" in line and "timed out: no answer within 1 s" in line
    assert seconds < 200 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["500", "refused"])
def test_extract_says_what_happened_to_a_remote_image(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setenv("BREAKSCENE_IO_RETRIES", "0")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(status_server(500))[0] if kind == "500" else refused_url()
        code, err = extract(capsys, "--image", f"{url}/img.png", "--mask", f"{url}/m.png",
                            "--out", str(tmp_path / "out"))
    line = one_error(err)
    assert code == 2 and "does not exist" not in line
    assert ("HTTP 500" if kind == "500" else "cannot connect") in line


def test_load_images_fails_only_the_rows_that_time_out(tmp_path):
    from pipeline.row import new_row, to_batch
    from pipeline.stages import load_images

    write_scene(tmp_path / "s")
    with silent_server() as silent, status_server(500) as (broken, _):
        uris = [f"{silent}/a.png", str(tmp_path / "s" / "img.png"), f"{broken}/b.png", f"{refused_url()}/c.png"]
        rows = [new_row(**{"image_uri": u, "image_id": f"id{i}", "mask_uris": [], "labels": [],
                             "gt_mask_uris": [], "manifest_row": i}) for i, u in enumerate(uris)]
        start = time.perf_counter()
        out = load_images(to_batch(rows), {"timeout_s": 0.5, "retries": 1}).to_pylist()
        seconds = time.perf_counter() - start
    assert [r["status"] for r in out] == ["failed", "ok", "failed", "failed"]
    assert f"{silent}/a.png" in out[0]["error"] and "timed out: no answer within 0.5 s" in out[0]["error"]
    assert "HTTP 500" in out[2]["error"] and "cannot connect" in out[3]["error"]
    assert out[1]["width"] == 96 and seconds < 20


@pytest.fixture
def s3_without_credentials(monkeypatch, tmp_path):
    """An S3 server on 127.0.0.1 and a client with no credentials anywhere."""
    import fsspec
    from moto.server import ThreadedMotoServer

    from pipeline_helpers import free_port

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("BREAKSCENE_IO_RETRIES", "0")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    yield {"s3": options}
    server.stop()


def test_s3_without_credentials_is_named_before_any_work(tmp_path, capsys, s3_without_credentials):
    scene = write_scene(tmp_path / "scene")
    code, err = extract(capsys, "--scene", str(scene), "--out", "s3://bucket/bundle")
    assert code == 2 and "s3://bucket/bundle" in one_error(err) and "no credentials" in err
    code, err = extract(capsys, "--image", "s3://bucket/img.png", "--mask", str(scene / "mask0.png"),
                        "--out", str(tmp_path / "out"))
    assert code == 2 and "image s3://bucket/img.png cannot be read: no credentials" in one_error(err)


# --- the pipeline's pre-flight checks (no Ray needed: they come first) --------

def _job(tmp_path, **fields) -> Path:
    scene = write_scene(tmp_path / "scene")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_uri": str(scene / "img.png")}) + "\n")
    job = {"manifest": str(manifest), "output": str(tmp_path / "out"), "model": {"id": "tiny"}, **fields}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp_path / "job.yaml"


@pytest.mark.parametrize("case, message", [
    ("output_file", "output {tmp}/taken is a file"),
    ("output_read_only", "output {ro}/out cannot be written"),
    ("manifest_missing", "manifest {tmp}/nowhere.jsonl does not exist"),
])
def test_run_checks_output_and_manifest_first(tmp_path, capsys, case, message):
    fields = {}
    ro = None
    if case == "output_file":
        (tmp_path / "taken").write_text("mine")
        fields["output"] = str(tmp_path / "taken")
    elif case == "output_read_only":
        ro = read_only_dir(tmp_path)
        fields["output"] = str(ro / "out")
    else:
        fields["manifest"] = str(tmp_path / "nowhere.jsonl")
    assert main(["run", str(_job(tmp_path, **fields))]) == 2
    assert message.format(tmp=tmp_path, ro=ro) in one_error(capsys.readouterr().err)
    if case == "output_file":
        assert (tmp_path / "taken").read_text() == "mine"


def test_run_without_s3_credentials_stops_first(tmp_path, capsys, s3_without_credentials):
    storage = {"options": s3_without_credentials, "retries": 0}
    assert main(["run", str(_job(tmp_path, output="s3://bucket/out", storage=storage))]) == 2
    assert "output s3://bucket/out cannot be written: no credentials" in one_error(capsys.readouterr().err)
    assert main(["run", str(_job(tmp_path, manifest="s3://bucket/m.jsonl", storage=storage))]) == 2
    assert "manifest s3://bucket/m.jsonl cannot be checked: no credentials" in one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_job_storage_timeouts_are_validated(tmp_path, capsys):
    assert main(["run", str(_job(tmp_path, storage={"timeout_s": -1}))]) == 2
    assert "storage.timeout_s" in one_error(capsys.readouterr().err)


def test_masks_of_the_pipeline_follow_the_same_rule(tmp_path):
    """A 0/1 mask given in a manifest is read as by extract (not 'empty')."""
    from breakscene.scenes.scene import load_mask_image, mask_from_image

    m = np.zeros((64, 96), np.uint8)
    m[20:40, 30:50] = 1
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = mask_from_image(load_mask_image(str(tmp_path / "m.png")), "m.png", (96, 64), [])
    assert mask.sum() == 400


# --- a pipeline or study output folder that holds someone else's files -----------------

def test_run_refuses_an_output_folder_holding_a_users_files(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "images" / "mydata.csv").write_text("a,b\n")
    before = tree(out)
    assert main(["run", str(_job(tmp_path))]) == 2
    err = one_error(capsys.readouterr().err)
    assert f"output {out} holds files that this project did not write" in err
    assert tree(out) == before and sorted(os.listdir(out)) == ["images", "summary.json"]


def test_gc_and_compact_refuse_a_folder_that_is_not_an_output(tmp_path, capsys):
    for command in ("gc", "compact"):
        assert main([command, str(tmp_path / "typo")]) == 2
        assert f"{tmp_path / 'typo'} is not a breakscene output" in one_error(capsys.readouterr().err)
        assert not (tmp_path / "typo").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["gc", str(tmp_path / "mine")]) == 2
    assert "is not a breakscene output" in one_error(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]


def test_study_refuses_an_output_folder_holding_a_users_files(tmp_path, capsys):
    out = tmp_path / "study"
    (out / "measurements").mkdir(parents=True)
    (out / "study.json").write_text('{"mine": true}')
    (out / "measurements" / "part-0.parquet").write_text("mine")
    before = tree(out)
    job = {"kind": "study", "name": "probe", "output": str(out), "model": {"id": "tiny"},
           "scenes": {"generated": 1}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "study.yaml")]) == 2
    assert f"output {out} holds files that this project did not write" in one_error(capsys.readouterr().err)
    assert tree(out) == before


@pytest.mark.parametrize("case", ["file", "users_folder", "no_measurements"])
def test_report_refuses_to_replace_what_it_did_not_write(tmp_path, capsys, case):
    out = tmp_path / "report"
    results = tmp_path / "nowhere"
    if case == "file":
        out.write_text("mine")
        message = f"{out} is a file"
    elif case == "users_folder":
        out.mkdir()
        (out / "index.html").write_text("my page")
        message = f"{out} holds files that this project did not write"
    else:
        message = "no study measurements"
    if case != "no_measurements":
        results.mkdir()  # found or not, the output is checked first
    before = tree(tmp_path)
    assert main(["report", str(results), "--out", str(out)]) == 2
    assert message in one_error(capsys.readouterr().err)
    assert tree(tmp_path) == before and (case != "no_measurements" or not out.exists())


def test_a_second_study_on_the_same_output_is_refused(tmp_path, capsys):
    from batchjob.lease import Lease
    from batchjob.preflight import claim_output_folder

    out = tmp_path / "study"
    job = {"kind": "study", "name": "probe", "output": str(out), "model": {"id": "tiny"},
           "scenes": {"generated": 1}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(job))
    claim_output_folder(str(out), "study")  # what the first study did before taking the lease
    with Lease(str(out), "the first study"):
        assert main(["run", str(tmp_path / "study.yaml")]) == 2
    assert "is in use by run the first study" in one_error(capsys.readouterr().err)
    assert sorted(os.listdir(out)) == [".breakscene-output"]  # no cell, no table


@pytest.mark.parametrize("args, message", [
    (["--stop-after", "score"], "--stop-after: not an option of a study job"),
    (["--manifest", "m.jsonl"], "--manifest: not an option of a study job"),
])
def test_a_command_line_flag_a_study_lacks_is_named_as_a_flag(tmp_path, capsys, args, message):
    job = {"kind": "study", "name": "probe", "output": str(tmp_path / "out"), "scenes": {"generated": 1}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "study.yaml"), *args]) == 2
    assert message in one_error(capsys.readouterr().err)


def test_an_unknown_job_kind_names_the_kinds(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"kind": "studdy", "output": str(tmp_path / "out")}))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    assert "kind 'studdy' is not a job kind: use extract (the default) or study" in one_error(capsys.readouterr().err)
