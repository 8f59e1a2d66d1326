"""Reduce a KubeRay CRD file to the OpenAPI schema of its v1 version, as JSON.

    python infra/schemas/strip_crd.py ray.io_rayjobs.yaml > infra/schemas/kuberay/rayjob.v1.json

Only ``description`` texts are dropped (they are most of the 1 MB files); every type,
property, enum, default, pattern and ``x-kubernetes-*`` marker is kept as published.
"""
from __future__ import annotations

import json
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def v1_schema(crd: dict) -> dict:
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": "v1",
            "openAPIV3Schema": strip(version["schema"]["openAPIV3Schema"])}


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        crd = yaml.safe_load(fh)
    json.dump(v1_schema(crd), sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
