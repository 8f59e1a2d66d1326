"""Study pieces without Ray: ground truth sources, grid cells, skipped cells, report maths."""
import json

import numpy as np
import pandas as pd
import pytest

from robustness.grid import StudyConfig, axis_combos, build_cells
from robustness.groundtruth import CocoSource, SceneSources, coco_scenes, collect_scenes, load_clean
from robustness.report import bootstrap_ci, build_report, iou_at_loss
from robustness.workers import StudyWorker
from study_helpers import write_coco_fixture


def _box(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_coco_filter_as_in_the_paper(tmp_path):
    img = np.full((100, 100, 3), 128, np.uint8)
    scenes = [
        (img, [_box(100, 100, 0, 0, 50, 40), _box(100, 100, 50, 50, 100, 100)], ["dog", "cat"]),  # kept
        (img, [_box(100, 100, 0, 0, 50, 40), _box(100, 100, 0, 0, 5, 5)], ["dog", "cat"]),  # 2nd too small
        (img, [_box(100, 100, 0, 0, 50, 40), _box(100, 100, 50, 50, 100, 100)], ["dog", "person"]),
    ]
    path = write_coco_fixture(tmp_path / "coco", scenes)
    found = coco_scenes(CocoSource(annotations=str(path), images=str(tmp_path / "coco")))
    assert [s.scene_id for s in found] == ["coco-1", "coco-3"]
    assert found[0].labels == ["cat", "dog"]  # largest first
    excluded = coco_scenes(CocoSource(annotations=str(path), images=str(tmp_path / "coco"),
                                      exclude_classes=["person"]))
    assert [s.scene_id for s in excluded] == ["coco-1"]
    _, masks = load_clean(found[0])
    assert masks.shape == (2, 100, 100) and masks[0].sum() == 2500 and masks[1].sum() == 2000


def test_grid_cells_and_axes(tmp_path):
    cfg = StudyConfig(kind="study", output=str(tmp_path), scenes={"generated": 2},
                      noise={"families": ["dilate", "shift"], "severities": [0.5, 1.0], "seeds": [0, 1],
                             "segmenters": ["classical"]},
                      axes={"lambda_attn": [0.0, 0.01]})
    scenes = collect_scenes(cfg.scenes)
    cells = build_cells(cfg, scenes)
    # per scene and axis: 1 clean + 2 families x 2 severities x 2 seeds + 1 segmenter
    assert len(cells) == 2 * 2 * (1 + 8 + 1)
    assert len({c["cell_id"] for c in cells}) == len(cells)
    assert axis_combos({"b": [1, 2], "a": ["x"]}) == [{"a": "x", "b": 1}, {"a": "x", "b": 2}]
    with pytest.raises(Exception, match="lambda_attn"):
        StudyConfig(kind="study", output="o", axes={"lambda_attn": [-1.0]})
    with pytest.raises(Exception, match="unknown noise families"):
        StudyConfig(kind="study", output="o", noise={"families": ["blur"]})


def test_empty_clean_mask_and_emptied_noisy_mask_are_skipped(tmp_path, monkeypatch):
    from robustness import workers

    cfg = StudyConfig(kind="study", output=str(tmp_path), scenes={"generated": 1, "generated_size": 128},
                      model={"id": "tiny"}, extract={"phase1_steps": 1, "phase2_steps": 1, "grid_seeds": 0,
                                                     "prior": {"enabled": False}},
                      evaluation={"generation": False})
    worker = StudyWorker(cfg.model_dump(mode="json"))
    cell = next(c for c in build_cells(cfg, collect_scenes(cfg.scenes)) if c["family"] == "clean")
    monkeypatch.setattr(workers, "perturb", lambda m, *a, **k: np.zeros_like(m))
    noisy = worker.run_cell({**cell, "family": "erode", "severity": 1.0})
    assert noisy["status"] == "skipped" and "noisy mask of concept 0 is empty" in noisy["reason"]
    assert all(r["mask_iou"] == 0.0 for r in noisy["rows"])
    ok = worker.run_cell(cell)
    assert ok["status"] == "ok" and len(ok["rows"]) == 3
    assert all(r["mask_iou"] == 1.0 and r["mask_boundary_f"] == 1.0 for r in ok["rows"])
    assert {"attention_iou", "attention_leak", "recon_in", "recon_out"} <= set(ok["rows"][0])


def test_iou_at_loss_interpolates():
    curve = pd.DataFrame({"iou": [0.9, 0.7, 0.5], "mean": [0.95, 0.85, 0.6]})
    # clean 1.0, target 0.9: between (0.9, 0.95) and (0.7, 0.85): halfway -> 0.8
    assert iou_at_loss(curve, 1.0, higher_better=True) == pytest.approx(0.8)
    assert iou_at_loss(curve, 0.5, higher_better=True) is None
    up = pd.DataFrame({"iou": [0.9, 0.7], "mean": [1.05, 1.2]})
    assert iou_at_loss(up, 1.0, higher_better=False) == pytest.approx(0.9 + (0.05 / 0.15) * -0.2)


def test_bootstrap_ci_brackets_the_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 0.1, 200)
    lo, hi = bootstrap_ci(values, rng)
    assert lo < values.mean() < hi and hi - lo < 0.05


def test_report_from_hand_made_measurements(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, (family, sev, iou) in enumerate([("clean", 0, 1.0), ("dilate", 0.5, 0.8), ("dilate", 1.0, 0.5),
                                            ("shift", 1.0, 0.3)]):
        for k in range(2):
            rows.append({"cell_id": f"c{i}", "scene_id": "s", "concept_index": k, "family": family,
                         "severity": sev, "seed": 0, "status": "ok", "reason": "", "mask_iou": iou,
                         "attention_iou": iou * 0.5, "recon_in": 1 / iou, "grid_uri": "", "axis_lambda_attn": "0.01"})
    rows.append({"cell_id": "c9", "scene_id": "s", "concept_index": 0, "family": "erode", "severity": 1.0,
                 "seed": 0, "status": "skipped", "reason": "the noisy mask of concept 0 is empty"})
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), path)
    summary = build_report(str(path), tmp_path / "report")
    assert summary["metrics"] == ["attention_iou", "recon_in"] and summary["skipped_cells"] == 1
    assert (tmp_path / "report" / "figures" / "attention_iou.png").stat().st_size > 1000
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("<img") == 2 and "noisy mask of concept 0 is empty" in html
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| dilate" in md and "axis_lambda_attn" in md
    # attention IoU, clean 0.5, target 0.45. dilate: first bin (IoU 0.8, 0.4), halfway -> 0.9;
    # shift: (IoU 0.3, 0.15), 0.05 / 0.35 = 1/7 of the way from IoU 1 to 0.3 -> 0.9
    t = json.loads((tmp_path / "report" / "report.json").read_text())["iou_at_10pct_loss"]["attention_iou"]
    assert t["dilate"] == pytest.approx(0.9) and t["shift"] == pytest.approx(0.9)
    # recon_in rises (lower is better): clean 1.0, target 1.1; dilate (0.8, 1.25): 0.1/0.25 of 0.2 -> 0.92
    assert json.loads((tmp_path / "report" / "report.json").read_text())["iou_at_10pct_loss"]["recon_in"][
        "dilate"] == pytest.approx(0.92)


def test_real_segmenter_noise_cell(tmp_path):
    cfg = StudyConfig(kind="study", output=str(tmp_path), scenes={"generated": 1, "generated_size": 128},
                      noise={"families": [], "segmenters": ["classical"]}, model={"id": "tiny"},
                      extract={"phase1_steps": 1, "phase2_steps": 1, "grid_seeds": 0, "prior": {"enabled": False}},
                      evaluation={"generation": False})
    worker = StudyWorker(cfg.model_dump(mode="json"))
    cell = next(c for c in build_cells(cfg, collect_scenes(cfg.scenes)) if c["family"] == "segmenter:classical")
    result = worker.run_cell(cell)
    assert result["status"] in ("ok", "skipped")
    ious = [r["mask_iou"] for r in result["rows"]]
    # flat-coloured objects on noise: the classical segmenter finds them well, not perfectly
    assert all(0.0 <= v <= 1.0 for v in ious) and max(ious) > 0.5


def test_manifest_scene_source(tmp_path, examples):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_uri": str(examples / "bear" / "img.jpg"), "image_id": "bear",
                                    "mask_uris": [str(examples / "bear" / f"mask{i}.png") for i in range(3)],
                                    "labels": ["bear"]}) + "\n"
                        + json.dumps({"image_uri": str(examples / "toys" / "img.jpg"), "image_id": "nomasks"}))
    scenes = collect_scenes(SceneSources(manifest=str(manifest)))
    assert [s.scene_id for s in scenes] == ["bear", "nomasks"]
    _, masks = load_clean(scenes[0])
    assert masks.shape == (3, 512, 512)
    from breakscene.errors import SceneError

    with pytest.raises(SceneError, match="no clean masks"):
        load_clean(scenes[1])


def test_embedders_load_from_saved_folders(tmp_path):
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from robustness.embedders import build_embedder, tiny_clip

    model, tok = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    img = [Image.new("RGB", (40, 40), (200, 30, 30))]
    tiny, loaded = build_embedder("tiny"), build_embedder(str(tmp_path / "clip"))
    assert torch.allclose(tiny.image(img), loaded.image(img), atol=1e-5)
    assert torch.allclose(tiny.text(["a photo of a bear"]), loaded.text(["a photo of a bear"]), atol=1e-5)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16)).save_pretrained(tmp_path / "tiny-dino")
    emb = build_embedder(str(tmp_path / "tiny-dino")).image(img)
    assert emb.shape == (1, 32) and abs(float(emb.norm()) - 1) < 1e-5


def test_bootstrap_ci_is_scipys_percentile_interval_of_the_mean():
    values = np.random.default_rng(1).normal(1.0, 0.1, 400)
    se = values.std(ddof=1) / np.sqrt(len(values))
    lo, hi = bootstrap_ci(values, np.random.default_rng(0), n=4000)
    # close to the normal-theory interval mean +- 1.96 se (0.0098 wide each side)
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.0015)
    assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.0015)
    assert bootstrap_ci(values, np.random.default_rng(0), n=4000) == (lo, hi)  # seeded: reproducible
    assert bootstrap_ci(np.array([0.7]), np.random.default_rng(0)) == (0.7, 0.7)
    assert bootstrap_ci(np.array([0.2, 0.2, 0.2]), np.random.default_rng(0)) == pytest.approx((0.2, 0.2))


def test_report_page_is_the_packaged_template_with_text_escaped(tmp_path):
    import importlib.resources

    import pyarrow as pa
    import pyarrow.parquet as pq

    assert (importlib.resources.files("robustness") / "templates" / "report.html.j2").is_file()
    rows = [{"cell_id": f"c{i}", "scene_id": "<b>scene</b>", "concept_index": 0, "family": family, "severity": sev,
             "seed": 0, "status": "ok", "reason": "", "mask_iou": iou, "attention_iou": iou / 2, "grid_uri": ""}
            for i, (family, sev, iou) in enumerate([("clean", 0.0, 1.0), ("dilate", 1.0, 0.6)])]
    rows.append({"cell_id": "c9", "scene_id": "s", "concept_index": 0, "family": "erode", "severity": 1.0,
                 "seed": 0, "status": "skipped", "reason": "mask <i>empty</i> & gone"})
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), tmp_path / "m.parquet")
    build_report(str(tmp_path / "m.parquet"), tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<title>Robustness report</title>" in page and page.count("<img") == 1
    assert 'alt="attention_iou" src="data:image/png;base64,' in page
    assert "<b>scene</b>" not in page and "mask &lt;i&gt;empty&lt;/i&gt; &amp; gone" in page
    assert "3 cells, 1 scenes, 2" in page  # the counts reach the page


def test_a_manifest_scene_source_takes_the_extraction_jobs_spec(tmp_path, examples):
    manifest = tmp_path / "m.csv"  # a dataset's own column names, mapped as in extraction jobs
    manifest.write_text("url,key,masks\n" + f"{examples / 'bear' / 'img.jpg'},bear,"
                        + '"' + json.dumps([str(examples / "bear" / "mask0.png")]).replace('"', '""') + '"\n')
    spec = {"uri": str(manifest), "columns": {"image_uri": "url", "image_id": "key", "mask_uris": "masks"}}
    scenes = collect_scenes(SceneSources(manifest=spec))
    assert [(s.scene_id, len(s.mask_uris)) for s in scenes] == [("bear", 1)]


def test_a_study_without_scenes_is_one_error_before_any_work(tmp_path, capsys):
    from commands.main import main

    job = tmp_path / "study.yaml"
    job.write_text(f"kind: study\nname: s\noutput: {tmp_path / 'out'}\nmodel: {{id: tiny}}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "the study has no scenes: set scenes.generated" in err[0]
    assert not (tmp_path / "out").exists()


def _measurements(tmp_path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"cell_id": f"c{i}", "scene_id": "s", "concept_index": 0, "family": family, "severity": sev, "seed": 0,
             "status": "ok", "reason": "", "mask_iou": iou, "attention_iou": iou * 0.5, "grid_uri": ""}
            for i, (family, sev, iou) in enumerate([("clean", 0, 1.0), ("dilate", 0.5, 0.8), ("dilate", 1.0, 0.5)])]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), path)
    return str(path)


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API (moto) on 127.0.0.1 with a bucket, and fsspec pointed at it."""
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer
    from pipeline_helpers import free_port

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="reports")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}})
    yield fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    server.stop()


def test_report_to_an_s3_uri_lands_whole_and_replaces_only_its_own(tmp_path, s3_bucket):
    from commands.main import main

    assert main(["report", _measurements(tmp_path), "--out", "s3://reports/study/r1"]) == 0
    files = sorted(p.split("reports/study/r1/")[1] for p in s3_bucket.find("reports/study/r1"))
    assert files == ["figures/attention_iou.png", "index.html", "report.json", "summary.md"]
    assert json.loads(s3_bucket.cat_file("reports/study/r1/report.json"))["ok_rows"] == 3
    assert main(["report", _measurements(tmp_path), "--out", "s3://reports/study/r1"]) == 0  # its own: replaced
    s3_bucket.pipe_file("reports/theirs/index.html", b"someone's page")
    assert main(["report", _measurements(tmp_path), "--out", "s3://reports/theirs"]) == 2
    assert s3_bucket.cat_file("reports/theirs/index.html") == b"someone's page"


def test_a_report_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    from robustness import report

    def broken(*args, **kwargs):
        raise RuntimeError("a figure could not be drawn")

    monkeypatch.setattr(report, "quality_figure", broken)
    measurements = pd.read_parquet(_measurements(tmp_path)).assign(predicted_quality=0.5)
    measurements.to_parquet(tmp_path / "q.parquet")
    with pytest.raises(RuntimeError, match="could not be drawn"):
        build_report(str(tmp_path / "q.parquet"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # before: index-less figures/ in a folder no later report could replace


def test_cell_ids_of_finished_studies_survive_new_settings():
    """A cell's id is its done-marker's name: a setting added to the configs later (at its
    default) must not rename every finished cell, or an upgraded rerun would redo the study."""
    from robustness.grid import StudyConfig, cell_id

    cfg = StudyConfig(kind="study", output="o", scenes={"generated": 2})
    # computed by the code of 2026-11-29 (before the settings added since)
    assert cell_id(cfg, "scene-a", "dilate", 0.5, 0, {}) == "e75be582d7f31379"
    assert cell_id(cfg, "scene-a", "clean", 0.0, 0, {"lambda_attn": 0.02}) == "1a095db547075fc9"
    changed = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"lambda_attn": 0.02})})
    assert cell_id(changed, "scene-a", "dilate", 0.5, 0, {}) != "e75be582d7f31379"  # a real change still counts
    fused = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "runtime": cfg.model.runtime.model_copy(update={"optimizer": "adamw-fused"})})})
    assert cell_id(fused, "scene-a", "dilate", 0.5, 0, {}) != "e75be582d7f31379"  # a later setting, changed


def test_a_code_error_in_a_cell_is_not_reported_as_a_skipped_cell(tmp_path, monkeypatch):
    """Only bad input (the project's own errors, an invalid cell setting) skips a cell: a
    ValueError from the code (the SDXL study bug read as "skipped" cells) stops the study."""
    cfg = StudyConfig(kind="study", output=str(tmp_path), scenes={"generated": 1, "generated_size": 128},
                      model={"id": "tiny"}, extract={"phase1_steps": 1, "phase2_steps": 1, "grid_seeds": 0,
                                                     "prior": {"enabled": False}},
                      evaluation={"generation": False})
    worker = StudyWorker(cfg.model_dump(mode="json"))
    cell = next(c for c in build_cells(cfg, collect_scenes(cfg.scenes)) if c["family"] == "clean")
    invalid = worker.run_cell({**cell, "axis": json.dumps({"phase1_steps": -1})})
    assert invalid["status"] == "skipped" and "phase1_steps" in invalid["reason"]

    def broken(*args, **kwargs):
        raise ValueError("captured 154 queries, expected 8x8")

    monkeypatch.setattr(worker, "extract", broken)
    with pytest.raises(ValueError, match="captured 154 queries"):
        worker.run_cell(cell)
