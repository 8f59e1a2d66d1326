"""Every manifest parses, validates against the schema of the tool that applies it (KubeRay's
CRDs, Ray's cluster launcher schema), has the fields its kind needs, and names files,
objects and images that exist."""
import copy
import fnmatch
import importlib.metadata
import importlib.resources
import json
import re

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from conftest import ROOT
from pipeline.jobfile import load_job

INFRA = ROOT / "infra"
VERSION = importlib.metadata.version("breakscene")
IMAGE = f"ghcr.io/OWNER/breakscene:{VERSION}"


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
    copied = set()
    for line in (INFRA / "Containerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                copied.add(src)
    # every package the project installs is in the image
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert {p.strip(' "*') for p in include.split(",")} <= copied


def test_cluster_launcher_config():
    cfg = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for local in cfg["file_mounts"].values():
        assert (ROOT / local).exists(), local


# --- schemas -------------------------------------------------------------------------------

def _strict(node):
    """``kubectl apply`` validates fields strictly: an object schema that lists its
    properties (and does not keep unknown fields) accepts no others."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


def _crd_validators() -> dict:
    out = {}
    for path in (INFRA / "schemas" / "kuberay").glob("*.v1.json"):
        crd = json.loads(path.read_text())
        out[crd["kind"]] = jsonschema.Draft202012Validator(_strict(crd["openAPIV3Schema"]))
    return out


CRDS = _crd_validators()


def _all_docs():
    """(file, document) for every manifest, RayJobs kept inside ConfigMaps included."""
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in _docs(path):
            yield path, doc
            if doc["kind"] == "ConfigMap":
                for text in doc["data"].values():
                    for inner in yaml.safe_load_all(text):
                        if inner and "kind" in inner:
                            yield path, inner


def _errors(doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in CRDS[doc["kind"]].iter_errors(doc)]


def test_vendored_crds_are_kuberay_v1():
    assert set(CRDS) == {"RayCluster", "RayJob"}
    notes = (INFRA / "schemas" / "README.md").read_text()
    assert "v1.7.0" in notes and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in notes


def test_every_kuberay_manifest_validates_against_its_crd():
    checked = [(path.name, doc["kind"]) for path, doc in _all_docs() if doc.get("apiVersion") == "ray.io/v1"]
    assert sorted(checked) == [("nightly-cronjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster"),
                               ("rayjob.yaml", "RayJob")]
    for path, doc in _all_docs():
        if doc.get("apiVersion") == "ray.io/v1":
            assert not _errors(doc), (path.name, _errors(doc))


def _mutations():
    """Edits a KubeRay apply would reject; each must fail schema validation."""
    def misspelt(d):
        d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 8

    def wrong_type(d):
        d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"

    def no_group_name(d):
        del d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]

    def unnamed_container(d):
        del d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]

    def numeric_start_param(d):  # rayStartParams are strings: num-cpus: 0 must be quoted
        d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    def bad_quantity(d):
        d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "memory"] = "16 gigabytes"

    return [misspelt, wrong_type, no_group_name, unnamed_container, numeric_start_param, bad_quantity]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_crd_validation_rejects_a_broken_rayjob(mutate):
    doc = next(d for p, d in _all_docs() if p.name == "rayjob.yaml" and d["kind"] == "RayJob")
    broken = copy.deepcopy(doc)
    mutate(broken)
    assert _errors(broken)


# --- standard Kubernetes objects ------------------------------------------------------------

K8S_REQUIRED = {  # (apiVersion, kind) -> fields each document needs
    ("v1", "ServiceAccount"): ["metadata.name"],
    ("v1", "ConfigMap"): ["metadata.name", "data"],
    ("rbac.authorization.k8s.io/v1", "Role"): ["metadata.name", "rules"],
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ["metadata.name", "subjects", "roleRef"],
    ("batch/v1", "CronJob"): ["metadata.name", "spec.schedule", "spec.jobTemplate.spec.template.spec.containers"],
}


def _get(doc, dotted):
    for key in dotted.split("."):
        doc = doc[key]
    return doc


def test_standard_objects_have_their_fields_and_references_resolve():
    docs = [d for p, d in _all_docs() if p.name == "nightly-cronjob.yaml"]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"].get("name")] = doc
        if doc["kind"] in ("RayJob", "RayCluster"):
            continue
        for field in K8S_REQUIRED[(doc["apiVersion"], doc["kind"])]:
            assert _get(doc, field), (doc["kind"], field)
    cron = by_kind["CronJob"]["breakscene-nightly"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in by_kind["ServiceAccount"]
    binding = next(b for b in by_kind["RoleBinding"].values()
                   if {"kind": "ServiceAccount", "name": account} in b["subjects"])
    ref = binding["roleRef"]
    assert ref["apiGroup"] == "rbac.authorization.k8s.io" and ref["kind"] == "Role"
    role = by_kind["Role"][ref["name"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"]), "the submitter may create RayJobs"
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"]), "least privilege"
    # the file kubectl creates is the ConfigMap key mounted where the args say
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    config_map = by_kind["ConfigMap"][volume["configMap"]["name"]]
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    created = container["args"][container["args"].index("-f") + 1]
    assert created.startswith(mount["mountPath"] + "/")
    rayjob = yaml.safe_load(config_map["data"][created[len(mount["mountPath"]) + 1:]])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"].endswith("-")
    assert container["args"][0] == "create", "generateName needs create, not apply"


def _containers(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(g.get("groupName", "head"), c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_images_are_one_pushed_reference_pulled_if_not_present():
    refs = set()
    for path, doc in _all_docs():
        if doc["kind"] in ("RayCluster", "RayJob"):
            for _, c in _containers(doc):
                refs.add(c["image"])
                assert c["imagePullPolicy"] == "IfNotPresent", path.name
        if doc["kind"] == "CronJob":
            c = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            assert re.fullmatch(r"registry\.k8s\.io/kubectl:v1\.\d+\.\d+", c["image"]) and c["imagePullPolicy"]
    launcher = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    refs.add(launcher["docker"]["image"])
    # one reference everywhere, tagged with the package version, so one substitution sets it
    assert refs == {IMAGE}
    for path in [*(INFRA / "kuberay").glob("*.yaml"), INFRA / "cluster-launcher" / "aws.yaml", INFRA / "Containerfile"]:
        text = path.read_text()
        assert ":latest" not in text and "breakscene:latest" not in text, path.name


def test_every_ray_container_has_cpu_and_memory_requests_and_limits():
    for path, doc in _all_docs():
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        for group, c in _containers(doc):
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and res["requests"][key] == res["limits"][key], (path.name, group, key)
            if group == "gpu":
                assert res["limits"]["nvidia.com/gpu"] == 1


def test_ray_version_is_one_pin_that_the_project_allows():
    pins = {d["spec"].get("rayClusterSpec", d["spec"])["rayVersion"] for _, d in _all_docs()
            if d["kind"] in ("RayCluster", "RayJob")}
    pins.add(re.search(r"rayproject/ray:([\d.]+)-", (INFRA / "Containerfile").read_text()).group(1))
    launcher = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    pins |= set(re.findall(r"ray\[[\w,]+\]==([\d.]+)", " ".join(launcher["setup_commands"])))
    assert len(pins) == 1, pins
    requirement = next(Requirement(r) for r in importlib.metadata.requires("breakscene") if r.startswith("ray"))
    assert requirement.specifier.contains(pins.pop())


# --- cluster launcher -------------------------------------------------------------------------

def _ray_schema() -> dict:
    # the schema that `ray up` itself validates against, from the installed wheel
    return json.loads((importlib.resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())


def test_cluster_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    jsonschema.validate(cfg, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs: defaults merged, then checked
    broken = copy.deepcopy(cfg)
    broken["docker"]["imag"] = IMAGE
    with pytest.raises(jsonschema.ValidationError, match="imag"):
        jsonschema.validate(broken, _ray_schema())
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


def test_cluster_launcher_runs_the_project_image_on_a_current_ami_with_s3_access():
    cfg = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    assert cfg["docker"]["image"] == IMAGE
    for name, node in cfg["available_node_types"].items():
        conf = node["node_config"]
        # not Ray's `latest_dlami` (Ubuntu 18.04, CUDA 11.2): the current DLAMI, resolved by EC2
        assert re.fullmatch(r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id", conf["ImageId"]), name
        assert "instance-profile/" in conf["IamInstanceProfile"]["Arn"], name


# --- build context --------------------------------------------------------------------------

def test_dockerignore_keeps_local_state_out_and_copied_sources_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(pre, pat.rstrip("/").removeprefix("**/")) or
                   fnmatch.fnmatch(part, pat.rstrip("/").removeprefix("**/"))
                   for pat in patterns for pre in prefixes for part in [pre.split("/")[-1]])

    for path in (".venv/bin/python", "out/demo/summary.json", ".git/HEAD", "breakscene/__pycache__/x.pyc",
                 ".pytest_cache/v", "breakscene.egg-info/PKG-INFO"):
        assert ignored(path), path
    for line in (INFRA / "Containerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert not ignored(src), src
