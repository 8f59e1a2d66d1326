"""The job files a production user copies keep the cost advice: `lora` unless asked, the
bundle size of each mode stated beside the setting."""
import re

import pytest

from conftest import ROOT
from commands.jobs import load_job


@pytest.mark.parametrize("name", ["extract.yaml", "nightly.yaml"])
def test_production_jobs_default_to_lora_and_state_the_bundle_sizes(name):
    job = load_job(str(ROOT / "jobs" / name), {"manifest": "s3://b/m.csv"})
    assert job.extract.phase2_mode == "lora"
    text = (ROOT / "jobs" / name).read_text()
    assert re.search(r"~25 MB per bundle", text) and re.search(r"~4\.8 GB per bundle", text)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_file_validates(path):
    job = load_job(str(path), {"manifest": "s3://b/m.csv"} if "robustness" not in path.name else {})
    assert job.name
