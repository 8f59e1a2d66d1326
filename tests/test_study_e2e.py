"""jobs/robustness-smoke.yaml end to end on a local Ray, its rerun, and its report in a
real headless Chromium."""
import json
import os
import shutil

import pytest

from conftest import ROOT
from pipeline_helpers import run_cli

pytestmark = pytest.mark.e2e


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def test_smoke_study_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    proc = run_cli("run", str(ROOT / "jobs" / "robustness-smoke.yaml"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "20 cells, 0 done, 20 to run; estimated" in proc.stdout and "GPU-hours" in proc.stdout
    summary = json.loads((out / "study.json").read_text())
    assert summary["cells"] == 20 and summary["ran"] == 20
    import pyarrow.parquet as pq

    m = pq.read_table(out / "measurements" / "part-0.parquet").to_pandas()
    ok = m[m["status"] == "ok"]
    # 2 scenes x (1 clean + 3 families x 3 severities) cells x 3 concepts, less any skipped cell's concepts
    assert m["cell_id"].nunique() == 20
    assert len(ok) == 3 * ok["cell_id"].nunique()
    assert set(m["family"]) == {"clean", "dilate", "shift", "coarse"}
    assert (ok[ok["family"] == "clean"]["mask_iou"] == 1.0).all()
    # dilate and shift move every mask; coarse leaves the generated rectangles as they are
    assert (ok[ok["family"].isin(["dilate", "shift"])]["mask_iou"] < 1.0).all()
    assert ok[ok["family"] == "coarse"]["mask_iou"].min() < 1.0
    for col in ("attention_iou", "attention_leak", "recon_in", "recon_out", "identity_sim", "prompt_sim"):
        assert ok[col].notna().all(), col
    cell_mtimes = {p.name: p.stat().st_mtime for p in (out / "cells").glob("*.json")}

    again = run_cli("run", str(ROOT / "jobs" / "robustness-smoke.yaml"), "--output", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "20 cells, 20 done, 0 to run" in again.stdout
    assert {p.name: p.stat().st_mtime for p in (out / "cells").glob("*.json")} == cell_mtimes

    report = tmp_path / "report"
    proc = run_cli("report", str(out), "--out", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert "attention_iou.png" in pngs and "identity_sim.png" in pngs
    assert "Mask IoU at which each metric has lost 10%" in (report / "summary.md").read_text()

    driver = _browser(tmp_path)
    try:
        driver.get((report / "index.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        title = driver.title
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert title == "Robustness report"
    figures = [i for i in images if i[0] in [p[:-4] for p in pngs]]
    assert len(figures) == len(pngs)
    grids = [i for i in images if "(IoU" in i[0]]
    assert len(grids) >= 10  # two scenes' sample grids across severities
    broken = [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not broken, broken
