"""SDXL (issue 19) through the batch products: a pipeline job with ``model.id: sdxl-tiny``
on the embedded Ray (on the S3 server on 127.0.0.1: tests/test_pipeline_groups_e2e.py, a
group and an image alone on SDXL), the robustness study on
sdxl-tiny, and a broken SDXL folder refused with one error line before any work."""
import json
import shutil

import pytest
import yaml
from safetensors.torch import load as load_safetensors

from commands.main import main
from pipeline_helpers import QUICK_EXTRACT, free_port, run_cli, tables, write_job

pytestmark = pytest.mark.e2e
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# one class image: prior preservation runs (class images from the SDXL pipeline) at its cheapest
SDXL_EXTRACT = {**QUICK_EXTRACT, "prior": {"num_class_images": 1, "generation_steps": 2}}


def _manifest(examples, prefix: str) -> str:
    """The bear photo with two of its masks, its files under ``prefix``."""
    row = {"image_uri": f"{prefix}/bear/img.jpg", "image_id": "bear",
           "mask_uris": [f"{prefix}/bear/mask{i}.png" for i in range(2)], "labels": ["bear"]}
    return json.dumps(row) + "\n"


def _check_tables(t: dict, out: str) -> None:
    assert [(r["image_id"], r["status"], r["n_concepts"]) for r in t["images"]] == [("bear", "ok", 2)]
    assert sorted((m["mask_index"], m["source"], m["selected"]) for m in t["masks"]) == [
        (0, "user", True), (1, "user", True)]
    concepts = sorted(t["concepts"], key=lambda c: c["concept_index"])
    assert [(c["token"], c["mask_index"]) for c in concepts] == [("<asset0>", 0), ("<asset1>", 1)]
    assert all(c["bundle_uri"] == f"{out}/bundles/bear" and 0 <= c["attention_iou"] <= 1 for c in concepts)


def _check_sdxl_bundle(bundle: dict, embeddings: list[bytes]) -> None:
    """bundle.json names the SDXL family; each token's file holds a row of both encoders
    (the keys diffusers' SDXL textual-inversion loaders read)."""
    assert bundle["model"]["id"] == "sdxl-tiny" and bundle["model"]["family"] == "sdxl"
    assert bundle["tokens"] == ["<asset0>", "<asset1>"] and bundle["files"]["lora"]
    assert len(embeddings) == 2
    for data in embeddings:
        rows = load_safetensors(data)
        assert set(rows) == {"clip_l", "clip_g"} and all(r.shape[0] == 1 for r in rows.values())


def test_sdxl_job_on_the_embedded_ray_writes_tables_and_bundle_and_resumes(tmp_path, examples):
    (tmp_path / "manifest.jsonl").write_text(_manifest(examples, str(examples)))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(tmp_path / "manifest.jsonl"), str(out), model={"id": "sdxl-tiny"},
                    extract=SDXL_EXTRACT)
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_tables(tables(str(out)), str(out))
    bundle_dir = out / "bundles" / "bear"
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    _check_sdxl_bundle(bundle, [(bundle_dir / f).read_bytes() for f in bundle["files"]["embeddings"]])
    assert bundle["config"]["prior"]["num_class_images"] == 1
    mtime = (bundle_dir / "bundle.json").stat().st_mtime

    again = run_cli("run", str(job))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 0, "failed": 0, "skipped": 0, "resumed": 1, "duplicate": 0}
    assert (bundle_dir / "bundle.json").stat().st_mtime == mtime
    _check_tables(tables(str(out)), str(out))  # nothing added by the rerun


@pytest.fixture
def s3_endpoint(monkeypatch):
    from pipeline_helpers import moto_server_process

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    with moto_server_process(free_port()) as endpoint:  # its own process: delta-rs reads the tables here
        yield endpoint


def _study_job(tmp_path, model: str) -> dict:
    """The smallest grid: one generated scene, its clean cell and one noisy cell."""
    return {"kind": "study", "name": "sdxl-study", "output": str(tmp_path / "study"),
            "scenes": {"generated": 1, "generated_size": 64},
            "noise": {"families": ["dilate"], "severities": [1.0], "seeds": [0]},
            "model": {"id": model},
            "extract": {"max_concepts": 3, "phase1_steps": 2, "phase2_steps": 2, "phase2_mode": "lora",
                        "prior": {"enabled": False}, "grid_seeds": 1, "grid_inference_steps": 2,
                        "diagnostic_timesteps": [500]},
            "evaluation": {"templates": 1, "seeds": 1, "steps": 2, "identity_embedder": "tiny",
                           "prompt_embedder": "tiny"},
            "resources": {"num_cpus": 2, "extract_actors": 1}}


def test_the_study_runs_on_sdxl(tmp_path):
    import pandas as pd

    job = tmp_path / "study.yaml"
    job.write_text(yaml.safe_dump(_study_job(tmp_path, "sdxl-tiny")))
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cells, 0 done, 2 to run" in proc.stdout
    out = tmp_path / "study"
    assert json.loads((out / "study.json").read_text())["ran"] == 2
    m = pd.read_parquet(out / "measurements" / "part-0.parquet")
    assert m["cell_id"].nunique() == 2 and set(m["family"]) == {"clean", "dilate"}
    assert (m["status"] == "ok").all(), m[["status", "reason"]]
    for col in ("attention_iou", "recon_in", "recon_out", "identity_sim", "prompt_sim"):
        assert m[col].notna().all(), col
    bundle = json.loads(next((out / "bundles").glob("*/bundle.json")).read_text())
    assert bundle["model"]["family"] == "sdxl"


def _broken_sdxl(tmp_path):
    folder = tmp_path / "sdxl-broken"
    assert main(["export-base", "sdxl-tiny", str(folder)]) == 0
    shutil.rmtree(folder / "text_encoder_2")
    return folder


@pytest.mark.parametrize("kind", [
    "pipeline",
    "study"])
def test_an_sdxl_folder_without_text_encoder_2_is_one_error_before_any_work(tmp_path, examples, capsys, monkeypatch,
                                                                            kind):
    import pipeline.run
    import robustness.driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the model folder was checked")

    for driver in (pipeline.run, robustness.driver):
        monkeypatch.setattr(driver, "init_ray", no_ray)
    folder = _broken_sdxl(tmp_path)
    if kind == "pipeline":
        (tmp_path / "manifest.jsonl").write_text(_manifest(examples, str(examples)))
        job = write_job(tmp_path / "job.yaml", str(tmp_path / "manifest.jsonl"), str(tmp_path / "out"),
                        model={"id": str(folder)}, extract=SDXL_EXTRACT)
    else:
        job = tmp_path / "study.yaml"
        job.write_text(yaml.safe_dump({**_study_job(tmp_path, str(folder)), "output": str(tmp_path / "out")}))
    capsys.readouterr()
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"error: model folder {str(folder)!r} is not a diffusers Stable Diffusion "
                                        "XL folder: missing text_encoder_2"), err
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_the_sdxl_loader_names_a_missing_part(tmp_path, examples, capsys):
    """``breakscene extract`` and every actor load through it: one error, not diffusers' own."""
    from breakscene.errors import ModelLoadError
    from breakscene.models.loading import load_any

    folder = _broken_sdxl(tmp_path)
    message = f"model folder {str(folder)!r} is not a diffusers Stable Diffusion XL folder: missing text_encoder_2"
    with pytest.raises(ModelLoadError) as err:
        load_any(str(folder))
    assert str(err.value) == message
    capsys.readouterr()
    scene = examples / "bear"
    assert main(["extract", "--image", str(scene / "img.jpg"), "--mask", str(scene / "mask0.png"),
                 "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_a_model_uri_is_checked_by_listing_it(tmp_path, s3_endpoint):
    """A model on S3: its parts are listed and its index read, not the weights fetched."""
    import s3fs

    from breakscene.errors import ModelLoadError
    from breakscene.files.storage import configure
    from breakscene.models.folders import check_model

    storage = {"s3": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}}
    fs = s3fs.S3FileSystem(**storage["s3"], skip_instance_cache=True)
    fs.mkdir("models")
    folder = _broken_sdxl(tmp_path)
    fs.put(str(folder) + "/", "models/broken/", recursive=True)
    fs.put(str(folder) + "/", "models/whole/", recursive=True)
    fs.put(str(folder / "text_encoder") + "/", "models/whole/text_encoder_2/", recursive=True)  # a part, by name
    configure(storage)
    assert check_model("s3://models/whole") == "sdxl"
    with pytest.raises(ModelLoadError, match="'s3://models/broken' is not a diffusers Stable Diffusion XL folder: "
                                             "missing text_encoder_2$"):
        check_model("s3://models/broken")
    with pytest.raises(ModelLoadError, match="'s3://models/nowhere' is not a folder that can be read"):
        check_model("s3://models/nowhere")
    # presets and hub ids are the load's to resolve (a hub id would be fetched)
    assert check_model("sdxl-tiny") is None and check_model("someone/a-hub-model") is None


def test_the_study_calibrates_an_sdxl_model_at_fewer_concepts_than_its_probe_scene(tmp_path):
    """The GPU-hour estimate's calibration scene has three shapes; a study of one- or
    two-concept scenes (max_concepts 2) is calibrated on the first two, not refused."""
    from robustness.driver import calibrate
    from robustness.grid import StudyConfig

    cfg = StudyConfig.model_validate({**_study_job(tmp_path, "sdxl-tiny"),
                                      "extract": {"max_concepts": 2, "prior": {"enabled": False}}})
    assert calibrate(cfg) > 0
