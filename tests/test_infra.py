"""Every manifest parses, has the fields its kind needs, and names files that exist."""
import re

import yaml

from conftest import ROOT
from pipeline.config import load_job

INFRA = ROOT / "infra"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayjobs():
    for path in (INFRA / "kuberay").glob("*.yaml"):
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                yield path, doc
            if doc["kind"] == "ConfigMap":
                for text in doc["data"].values():
                    for inner in yaml.safe_load_all(text):
                        if inner and inner.get("kind") == "RayJob":
                            yield path, inner


def test_kuberay_manifests_parse_with_required_fields():
    kinds = {doc["kind"] for path in (INFRA / "kuberay").glob("*.yaml") for doc in _docs(path)}
    assert {"RayCluster", "RayJob", "CronJob", "ConfigMap"} <= kinds
    jobs = list(_rayjobs())
    assert len(jobs) == 2
    for path, job in jobs:
        spec = job["spec"]
        assert job["apiVersion"] == "ray.io/v1"
        assert {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                "activeDeadlineSeconds", "submissionMode"} <= set(spec), path
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers
                   for c in w["template"]["spec"]["containers"]), "a GPU worker group"
        # the job file the entrypoint runs exists in the image (/app is the project root)
        job_file = re.search(r"/app/(jobs/\S+\.yaml)", spec["entrypoint"]).group(1)
        assert (ROOT / job_file).is_file() and load_job(ROOT / job_file)
    cron = next(d for d in _docs(INFRA / "kuberay" / "nightly-cronjob.yaml") if d["kind"] == "CronJob")
    assert cron["spec"]["schedule"] == "0 2 * * *"


def test_containerfile_copies_files_that_exist():
    for line in (INFRA / "Containerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_cluster_launcher_config():
    cfg = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for local in cfg["file_mounts"].values():
        assert (ROOT / local).exists(), local
