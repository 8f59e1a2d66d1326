"""Shared builders for the pipeline's end-to-end tests."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from conftest import ROOT

VENV_BIN = str(Path(sys.executable).parent)

QUICK_EXTRACT = {"max_concepts": 4, "phase1_steps": 2, "phase2_steps": 2, "phase2_mode": "lora",
                 "prior": {"num_class_images": 2, "generation_steps": 2}, "grid_seeds": 1,
                 "grid_inference_steps": 2, "diagnostic_timesteps": [500]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")
    e["RAY_USAGE_STATS_ENABLED"] = "0"
    e.update(extra)
    return e


def write_job(path: Path, manifest: str, output: str, **overrides) -> Path:
    job = {"name": "test", "manifest": manifest, "output": output, "model": {"id": "tiny"},
           "segmenter": {"kind": "classical"}, "extract": QUICK_EXTRACT, "resources": {"num_cpus": 2}}
    job.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(*args, timeout=600, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(VENV_BIN, "breakscene"), *args], cwd=ROOT, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def mixed_manifest(folder: Path, examples: Path) -> tuple[Path, dict]:
    """Real photos with masks, a sample photo to segment, and one of each bad input."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("bear", "chicken", "creature", "toys"):
        scene = examples / name
        rows.append({"image_uri": str(scene / "img.jpg"), "image_id": name,
                     "mask_uris": [str(scene / f"mask{i}.png") for i in range(3)], "labels": [name]})
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    rows.append({"image_uri": str(folder / "coffee.png"), "image_id": "coffee"})
    small = folder / "bear_mask_small.png"
    Image.open(examples / "bear" / "mask2.png").resize((128, 128), Image.NEAREST).save(small)
    rows.append({"image_uri": str(examples / "bear" / "img.jpg"), "image_id": "bear-small-mask",
                 "mask_uris": [str(small)]})
    rows.append({"image_uri": str(folder / "missing.jpg"), "image_id": "missing"})
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append({"image_uri": str(folder / "corrupt.jpg"), "image_id": "corrupt"})
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "anim.gif")
    rows.append({"image_uri": str(folder / "anim.gif"), "image_id": "gif"})
    rows.append({"image_uri": str(examples / "chicken" / "img.jpg"), "image_id": "toys"})  # duplicate id
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = {"bear": "ok", "chicken": "ok", "creature": "ok", "toys": "ok", "bear-small-mask": "ok",
                "missing": "failed", "corrupt": "failed", "gif": "failed"}
    return manifest, expected


@contextlib.contextmanager
def moto_server_process(port: int):
    """An S3 server on 127.0.0.1 in its own process: delta-rs holds the GIL in some
    calls, so a server thread inside the test's process could not answer them."""
    proc = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def tables(out: str, fs=None) -> dict:
    from pipeline.records import read_table

    return {name: read_table(out, name).to_pylist() for name in ("images", "masks", "concepts")}


def no_partial_output(out: Path) -> bool:
    bundles = out / "bundles"
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    incomplete = [p for p in bundles.iterdir() if not (p / "bundle.json").is_file()] if bundles.exists() else []
    return not leftovers and not incomplete


def stop_ray_cluster(temp_dir: str, gcs_port: int) -> int:
    """Stop only the cluster a test started (``ray stop`` would stop every Ray on the
    machine): its daemons carry its --temp-dir or GCS port on their command lines, and
    workers, agents and job drivers are their descendants. Returns how many were stopped."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(temp_dir in arg or arg.endswith(f":{gcs_port}") for arg in (p.info["cmdline"] or []))]
    procs = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update({c.pid: c for c in root.children(recursive=True)})
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=15)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(procs)


__all__ = ["free_port", "moto_server_process", "env", "write_job", "run_cli", "mixed_manifest", "tables", "no_partial_output",
           "stop_ray_cluster", "shutil", "pq"]
