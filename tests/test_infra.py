"""Every manifest parses, validates against the schema of the tool that applies it (KubeRay's
CRDs, Ray's cluster launcher schema), has the fields its kind needs, and names files,
objects and images that exist. The deployment works as shipped: each RayJob's entrypoint,
expanded as KubeRay's submitter and Ray's job supervisor expand it, parses with the real
command line and runs a job file from a ConfigMap that the real job reader accepts; every
Ray pod gets the storage identity and the optional Secret; a weekly maintenance job compacts
and cleans the nightly output at hours no run holds it; docs/deployment.md names commands,
files and objects that exist."""
import copy
import fnmatch
import importlib.metadata
import importlib.resources
import json
import os
import re
import shlex
import subprocess
from subprocess import list2cmdline

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from conftest import ROOT
from commands.jobs import load_job
from commands.main import build_parser

INFRA = ROOT / "infra"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
RAY_ACCOUNT = "breakscene-ray"  # the ServiceAccount of every pod that touches the buckets
S3_SECRET = "breakscene-s3"  # the optional Secret of keys, read with envFrom
VERSION = importlib.metadata.version("breakscene")
IMAGE = f"ghcr.io/OWNER/breakscene:{VERSION}"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects_in(config_map: dict) -> list[dict]:
    """Kubernetes objects kept as text in a ConfigMap (a RayJob template), not other values."""
    found = []
    for text in config_map["data"].values():
        for inner in yaml.safe_load_all(text):
            if isinstance(inner, dict) and {"apiVersion", "kind"} <= set(inner):
                found.append(inner)
    return found


def _rayjobs():
    for path in (INFRA / "kuberay").glob("*.yaml"):
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                yield path, doc
            if doc["kind"] == "ConfigMap":
                yield from ((path, inner) for inner in _objects_in(doc) if inner["kind"] == "RayJob")


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
                yield from ((path, inner) for inner in _objects_in(doc))


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


def _namespace() -> dict:
    """kind -> name -> object, for every object of infra/kuberay (applied in one namespace),
    the RayJob templates kept in ConfigMaps included."""
    by_kind = {}
    for _, doc in _all_docs():
        name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
        by_kind.setdefault(doc["kind"], {})[name] = doc
    return by_kind


def test_standard_objects_have_their_fields_and_references_resolve():
    by_kind = _namespace()
    for kind, named in by_kind.items():
        if kind in ("RayJob", "RayCluster"):
            continue
        for doc in named.values():
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
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
                refs.add(c["image"])
                assert c["imagePullPolicy"] == "IfNotPresent", path.name
        if doc["kind"] == "CronJob":
            c = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            assert c["imagePullPolicy"] == "IfNotPresent", path.name
            if not re.fullmatch(r"registry\.k8s\.io/kubectl:v1\.\d+\.\d+", c["image"]):
                refs.add(c["image"])  # the maintenance job runs the project's image
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


# --- the deployment as shipped: values, credentials, maintenance --------------------------

def _calls(script: str, program: str, env: dict, shell: str = "bash") -> list[list[str]]:
    """The argument lists ``script`` calls ``program`` with when ``shell -c`` runs it with
    ``env``: ``program`` is a shell function that prints its arguments; ``set -u`` makes an
    unset variable an error, not an empty argument."""
    capture = f'{program}() {{ for a in "$@"; do printf "%s\\037" "$a"; done; printf "\\036"; }}; set -u; '
    done = subprocess.run([shell, "-c", capture + script], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (script, done.stderr)
    return [record.split("\x1f")[:-1] for record in done.stdout.split("\x1e")[:-1]]


def _env(container: dict, config_maps: dict) -> dict:
    """The container's env as the kubelet sets it: values, and configMapKeyRef looked up
    in the ConfigMaps applied with it (a missing map or key fails, as the pod would)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["configMapKeyRef"]
        env[var["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
    return env


def _entrypoint_argv(rayjob: dict, config_maps: dict) -> list[str]:
    """The arguments ``breakscene`` gets on the head (the entrypoint calls nothing else): KubeRay's K8sJobMode submitter runs
    ``ray job submit ... -- ENTRYPOINT`` in bash with the submitter container's env; Ray's
    CLI joins the words after ``--`` (``list2cmdline``); the job supervisor runs that line
    with ``/bin/sh`` on the head."""
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert "command" not in submitter, "KubeRay writes the submit command only into a container without one"
    [submit] = _calls(f"ray job submit --address http://head:8265 --no-wait -- {rayjob['spec']['entrypoint']} ;",
                      "ray", _env(submitter, config_maps))
    words = submit[submit.index("--") + 1:]
    [argv] = _calls(list2cmdline(words), "breakscene", {}, shell="sh")
    return argv


def _mounted(pod: dict, container: dict, path: str) -> tuple[str, str]:
    """(ConfigMap, key) of the file at ``path`` in ``container``."""
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(root):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
            name = path[len(root):]
            return volume["configMap"]["name"], items.get(name, name) if items else name
    raise AssertionError(f"{path} is not mounted in {container['name']}")


def test_rayjob_entrypoints_run_the_job_file_and_uris_of_their_configmap(tmp_path):
    by_kind = _namespace()
    rayjobs = [(p.name, d) for p, d in _all_docs() if d["kind"] == "RayJob"]
    assert len(rayjobs) == 2
    for name, rayjob in rayjobs:
        argv = _entrypoint_argv(rayjob, by_kind["ConfigMap"])
        args = build_parser().parse_args(argv)  # the real command line: a bad flag exits 2
        assert args.command == "run", (name, argv)
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        config_map, key = _mounted(head, head["containers"][0], args.job)  # Ray runs the entrypoint on the head
        values = by_kind["ConfigMap"][config_map]["data"]
        assert (args.manifest, args.output) == (values["MANIFEST_URI"], values["OUTPUT_URI"]), name
        # the mounted job file, read as `breakscene run` reads it, with the flags' overrides
        job_file = tmp_path / name / key
        job_file.parent.mkdir()
        job_file.write_text(values[key])
        job = load_job(job_file, {"manifest": args.manifest, "output": args.output})
        assert (job.manifest.uri, job.output) == (values["MANIFEST_URI"], values["OUTPUT_URI"])
        assert job.kind == "extract" and job.extract.phase2_mode == "lora", name
        gpus = sum(g["replicas"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert job.resources.extract_actors == gpus, f"{name}: one extract actor per GPU worker"


def _pods() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod that reads or writes the buckets: the Ray head and
    worker groups of every RayCluster and RayJob, and the maintenance job."""
    pods = []
    for path, doc in _all_docs():
        if doc["kind"] in ("RayCluster", "RayJob"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                pods.append((f"{path.name} {group.get('groupName', 'head')}", group["template"]["spec"]))
    maintenance = _namespace()["CronJob"]["breakscene-maintenance"]
    pods.append(("maintenance", maintenance["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return pods


def test_every_ray_pod_runs_as_the_storage_account_with_the_optional_secret():
    account = _namespace()["ServiceAccount"][RAY_ACCOUNT]
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(account["metadata"]["annotations"])
    pods = _pods()
    assert len(pods) == 7  # raycluster, rayjob, nightly: head + gpu each; maintenance
    for where, pod in pods:
        assert pod["serviceAccountName"] == RAY_ACCOUNT, where
        for container in pod["containers"]:
            # optional: a pod starts without the Secret (IRSA, workload identity)
            assert {"secretRef": {"name": S3_SECRET, "optional": True}} in container.get("envFrom", []), where
    # the Secret holds keys; one shipped with placeholders would shadow the role
    assert "Secret" not in _namespace()


def _cron_time(schedule: str) -> tuple[int, int, str]:
    minute, hour, _, _, weekday = schedule.split()
    return int(hour), int(minute), weekday


def test_maintenance_compacts_then_cleans_the_nightly_output():
    by_kind = _namespace()
    nightly, maintenance = by_kind["CronJob"]["breakscene-nightly"], by_kind["CronJob"]["breakscene-maintenance"]
    container = maintenance["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["/bin/bash", "-c"]
    calls = _calls(container["args"][0], "breakscene", _env(container, by_kind["ConfigMap"]))
    template = by_kind["RayJob"]["breakscene-nightly-"]
    nightly_output = build_parser().parse_args(_entrypoint_argv(template, by_kind["ConfigMap"])).output
    parsed = [build_parser().parse_args(argv) for argv in calls]
    assert [a.command for a in parsed] == ["compact", "gc"]
    assert {a.output for a in parsed} == {nightly_output}
    assert maintenance["spec"]["concurrencyPolicy"] == "Forbid"
    assert _cron_time(maintenance["spec"]["schedule"])[2] != "*", "weekly"
    assert _cron_time(maintenance["spec"]["schedule"])[0] != _cron_time(nightly["spec"]["schedule"])[0]


def test_maintenance_runs_when_no_nightly_run_can_hold_the_output():
    """Both take the lease, so they cannot write at once; the hours keep them from meeting:
    the nightly run's latest end (deadline, cluster deleted, a lease left behind expired)
    is before maintenance starts, and maintenance's deadline before the next run."""
    from batchjob.lease import DEFAULT_TTL_S

    by_kind = _namespace()
    nightly, maintenance = by_kind["CronJob"]["breakscene-nightly"], by_kind["CronJob"]["breakscene-maintenance"]
    assert nightly["spec"]["timeZone"] == maintenance["spec"]["timeZone"]
    run = by_kind["RayJob"]["breakscene-nightly-"]["spec"]
    hour, minute, _ = _cron_time(nightly["spec"]["schedule"])
    run_start = hour * 3600 + minute * 60
    run_gone = run_start + run["activeDeadlineSeconds"] + run["ttlSecondsAfterFinished"] + DEFAULT_TTL_S
    hour, minute, _ = _cron_time(maintenance["spec"]["schedule"])
    start = hour * 3600 + minute * 60
    job = maintenance["spec"]["jobTemplate"]["spec"]
    assert run_gone < start, "maintenance starts before a nightly run is surely over"
    assert start + job["activeDeadlineSeconds"] + DEFAULT_TTL_S <= run_start + 86400, "it runs into the next night"


# --- docs/deployment.md --------------------------------------------------------------------

def _doc_code_lines() -> list[str]:
    text = DEPLOYMENT_DOC.read_text()
    blocks = re.findall(r"^ *```\n(.*?)^ *```", text, re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _doc_breakscene_commands() -> list[list[str]]:
    found = []
    for line in _doc_code_lines():
        line = re.sub(r"^(?:[\d*,/-]+\s+){5}", "", line)  # a crontab line's schedule
        for part in re.findall(r"(?:^|&&|;)\s*(breakscene\s[^;&|#>]*)", line):
            found.append(shlex.split(part))
    return found


def test_deployment_doc_breakscene_commands_parse():
    commands = _doc_breakscene_commands()
    assert {argv[1] for argv in commands} >= {"run", "submit", "compact", "gc"}
    for argv in commands:
        build_parser().parse_args(argv[1:])  # SystemExit(2) on a flag or command that does not exist


def test_deployment_doc_names_files_and_objects_that_exist():
    lines = _doc_code_lines()
    by_kind = _namespace()
    files = [f for line in lines if line.startswith("kubectl") for f in re.findall(r"-f (infra/\S+)", line)]
    assert {"infra/kuberay/nightly-values.yaml", "infra/kuberay/maintenance-cronjob.yaml"} <= set(files)
    for path in files:
        assert (ROOT / path).is_file(), path
    crons = {c for line in lines for c in re.findall(r"--from=cronjob/(\S+)", line)}
    assert crons == {"breakscene-nightly", "breakscene-maintenance"} and crons <= set(by_kind["CronJob"])
    helm = next(line for line in lines if line.startswith("helm install"))
    assert re.search(r"--version (\S+)", helm).group(1) == "1.7.0"  # the CRDs the manifests are validated against
    assert any(line.startswith("docker build -f infra/Containerfile") for line in lines)


def test_secret_in_the_doc_holds_what_the_s3_clients_read(monkeypatch, tmp_path):
    """The keys the doc puts in the Secret reach every pod's environment (envFrom); they are
    the names the project's S3 settings are read from."""
    from breakscene.files.storage import s3_settings

    line = next(line for line in _doc_code_lines() if "create secret generic" in line)
    words = shlex.split(line)
    assert words[words.index("generic") + 1] == S3_SECRET
    literals = dict(w.split("=", 1)[1].split("=", 1) for w in words if w.startswith("--from-literal="))
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name, value in literals.items():
        monkeypatch.setenv(name, value)
    found = s3_settings(credentials=True)
    assert (found["key"], found["secret"]) == (literals["AWS_ACCESS_KEY_ID"], literals["AWS_SECRET_ACCESS_KEY"])
    assert found["endpoint_url"] == literals["AWS_ENDPOINT_URL"]
    assert found["region"] == literals["AWS_REGION"]
