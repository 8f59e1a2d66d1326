"""Concept groups as users run them (issue 20): `breakscene run` of a manifest with a
``group`` column on the embedded Ray, a later night that grows a group, and the same
manifest on the S3 test server (on SDXL there, issue 19)."""
import json

import duckdb
import pytest
from safetensors.torch import load as load_safetensors
from conftest import write_scene

from pipeline.tables import open_table
from pipeline_helpers import QUICK_EXTRACT, run_cli, tables, write_job
from test_pipeline_cluster import CREDS, s3_endpoint  # noqa: F401 - the S3 server fixture

pytestmark = pytest.mark.e2e
BOXES = {"a": ((4, 4, 40, 40), (50, 20, 90, 60)), "b": ((50, 4, 90, 40), (6, 24, 44, 60)),
         "c": ((20, 10, 56, 46), (60, 14, 92, 50))}


def _manifest(folder, examples, prefix, names="ab", missing=True):
    """A group "shapes" of generated scenes showing the same red and green box, one row of
    it naming a picture that does not exist, and a real photo extracted alone."""
    rows = []
    for name in names:
        write_scene(folder / name, boxes=BOXES[name])
        rows.append({"image_uri": f"{prefix}/{name}/img.png", "image_id": name, "group": "shapes",
                     "mask_uris": [f"{prefix}/{name}/mask{i}.png" for i in range(2)], "labels": ["red", "green"]})
    if missing:
        rows.append({"image_uri": f"{prefix}/gone/img.png", "image_id": "gone", "group": "shapes",
                     "mask_uris": [f"{prefix}/a/mask0.png"], "labels": ["red"]})
    rows.append({"image_uri": str(examples / "bear" / "img.jpg"), "image_id": "bear",
                 "mask_uris": [str(examples / "bear" / f"mask{i}.png") for i in range(3)]})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_a_group_manifest_runs_resumes_and_grows(tmp_path, examples):
    folder, out = tmp_path / "in", tmp_path / "out"
    manifest = folder / "manifest.jsonl"
    folder.mkdir()
    manifest.write_text(_manifest(folder, examples, str(folder)))
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out), max_failed_fraction=0.5)
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 3 and summary["counts"]["failed"] == 1  # the missing picture fails alone
    t = tables(str(out))
    images = {r["image_id"]: r for r in t["images"]}
    bundle = str(out / "bundles" / "group.shapes")
    assert {i: (r["status"], r["group"], r["bundle_uri"]) for i, r in images.items() if i != "gone"} == {
        "a": ("ok", "shapes", bundle), "b": ("ok", "shapes", bundle),
        "bear": ("ok", None, str(out / "bundles" / "bear"))}
    assert images["gone"]["status"] == "failed" and "does not exist" in images["gone"]["error"]
    # the tables carry the group and the label of every concept: one token per label
    concepts = open_table(str(out), "concepts").to_pyarrow_dataset()  # noqa: F841 - read by DuckDB below
    found = duckdb.sql('select image_id, token, label, "group" from concepts order by image_id, token').fetchall()
    assert found == [("a", "<asset0>", "red", "shapes"), ("a", "<asset1>", "green", "shapes"),
                     ("b", "<asset0>", "red", "shapes"), ("b", "<asset1>", "green", "shapes"),
                     ("bear", "<asset0>", None, None), ("bear", "<asset1>", None, None),
                     ("bear", "<asset2>", None, None)]
    info = json.loads((out / "bundles" / "group.shapes" / "bundle.json").read_text())
    assert info["group"]["labels"] == ["red", "green"]
    assert [image["labels"] for image in info["group"]["images"]] == [["red", "green"], ["red", "green"]]

    # a later night brings image c: the group is learned again (a rerun of a committed group
    # resumes from its records: tests/test_pipeline_groups.py)
    manifest.write_text(_manifest(folder, examples, str(folder), names="abc", missing=False))
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = json.loads((out / "summary.json").read_text())
    # a and b are learned again with c (not resumed); bear is done
    assert grown["counts"]["ok"] == 3 and grown["counts"]["resumed"] == 1 and grown["relearned"] == 2
    t = tables(str(out))
    current = {r["image_id"]: r for r in t["images"]}
    assert {i for i, r in current.items() if r["run_id"] == grown["run_id"]} == {"a", "b", "c"}
    assert sum(c["image_id"] in "abc" for c in t["concepts"]) == 6 and len(t["concepts"]) == 9
    assert len(json.loads((out / "bundles" / "group.shapes" / "bundle.json").read_text())["group"]["images"]) == 3


def test_a_group_manifest_on_the_s3_server(tmp_path, examples, s3_endpoint):  # noqa: F811
    import s3fs

    from breakscene.files.storage import configure

    storage = {"s3": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}}
    fs = s3fs.S3FileSystem(**storage["s3"])
    fs.mkdir("data")
    local = tmp_path / "in"
    text = _manifest(local, examples, "s3://data/in", missing=False)
    for name in "ab":
        for f in ("img.png", "mask0.png", "mask1.png"):
            fs.put_file(str(local / name / f), f"data/in/{name}/{f}")
    fs.pipe("data/in/manifest.jsonl", text.encode())
    # on SDXL (issue 19's pipeline job on S3, with a group); a cap of one image: b is skipped
    # before its picture is fetched, a is learned alone
    job = write_job(tmp_path / "s3.yaml", "s3://data/in/manifest.jsonl", "s3://data/out", storage={"options": storage},
                    groups={"max_images": 1}, model={"id": "sdxl-tiny"},
                    extract={**QUICK_EXTRACT, "prior": {"num_class_images": 1, "generation_steps": 2}})
    proc = run_cli("run", str(job), **CREDS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configure(storage)
    t = tables("s3://data/out")
    assert sorted((r["image_id"], r["status"], r["group"]) for r in t["images"]) == [
        ("a", "ok", "shapes"), ("b", "skipped", "shapes"), ("bear", "ok", None)]
    (b,) = [r for r in t["images"] if r["image_id"] == "b"]
    assert "more than groups.max_images=1" in b["error"] and b["seconds_load"] is None
    assert {c["bundle_uri"] for c in t["concepts"] if c["group"]} == {"s3://data/out/bundles/group.shapes"}
    assert fs.exists("data/out/bundles/group.shapes/bundle.json") and fs.exists("data/out/records/group.shapes.json")
    assert not fs.exists("data/out/bundles/group.shapes/.breakscene-partial")
    for bundle in ("group.shapes", "bear"):  # SDXL bundles: each token a row of both encoders
        info = json.loads(fs.cat(f"data/out/bundles/{bundle}/bundle.json"))
        assert info["model"]["family"] == "sdxl" and info["files"]["lora"]
        for name in info["files"]["embeddings"]:
            assert set(load_safetensors(fs.cat(f"data/out/bundles/{bundle}/{name}"))) == {"clip_l", "clip_g"}
