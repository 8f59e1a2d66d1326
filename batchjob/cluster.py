"""Cluster start-up and GPU sharing, one rule for every driver (the extraction run and
the robustness study): join the given address, or the cluster of ``ray job submit``
(RAY_ADDRESS), or start an embedded local one."""
from __future__ import annotations

import math
import os
import signal

from breakscene import interrupts
from breakscene.errors import BreakSceneError

from batchjob.settings import ResourcesConfig


def init_ray(resources: ResourcesConfig, address: str | None = None):
    """The ``ray`` module, initialised once per process."""
    import ray

    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: init() joins that cluster
            ray.init()
        else:
            # "local": a new embedded cluster even when another one runs on this machine.
            ray.init(address="local", num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                     include_dashboard=False)
    except SystemExit as exc:
        # ray.init's own SIGTERM handler is sys.exit(SIGTERM): a stop during start-up
        if exc.code == signal.SIGTERM:
            raise interrupts.Stopped(signal.SIGTERM) from None
        raise
    interrupts.install()  # Ctrl-C and SIGTERM end the run cleanly, over Ray's own handler
    return ray


def auto_gpus(gpus: float, res: ResourcesConfig) -> tuple[float, float]:
    """GPUs per segment and extract actor on a cluster with ``gpus`` GPUs. Unset values ask
    for a whole GPU per extract actor only when the cluster has one, and segmentation
    shares a GPU only when every actor still fits."""
    ext = res.extract_gpus if res.extract_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if res.segment_gpus is not None:
        return res.segment_gpus, ext
    spare = gpus - ext * res.extract_actors
    return (0.25 if spare >= 0.25 * res.segment_actors else 0.0), ext


# --------------------------------------------------------------------------------------
# Fit a job's resource plan to the cluster before any work starts.
#
# Ray Data starts one actor of each pool and then needs room for at least one task of the
# other stages beside them. On a cluster smaller than that the stages wait for each other
# forever (one CPU: the extract actor held the CPU the load task needed). ``fit_plan``
# checks the plan against ``ray.cluster_resources()``:
# - GPUs are memory and cannot be shared further: a plan that needs more than the cluster
#   has stops with one line naming what is missing (unless nodes join on demand);
# - CPU requests are scheduling shares: the actor pools share what is left beside the
#   largest plain task, scaled down together. Tasks Ray Data schedules itself (a streaming
#   repartition asks for a whole CPU) cannot be changed; where they leave no room, the
#   actors run without a CPU share, one per pool.
# Ray accounts fractional resources in units of 1e-4.
_UNIT = 10_000


def stage_plan(*, segment_gpus: float, extract_gpus: float, segment_actors: int, extract_actors: int,
               load_cpus: float = 0.25, segment_cpus: float = 0.5, score_cpus: float = 0.25,
               extract_cpus: float = 1.0, repartition_cpus: float = 0.0) -> dict[str, dict]:
    """The pipeline's stages: plain tasks have ``actors`` None, pools their maximum size
    (0: the stage does not run, e.g. extraction in a score-only run). ``repartition_cpus``:
    what Ray Data's own repartition tasks ask for (fixed: 1 when the plan repartitions)."""
    plan = {
        "load": {"num_cpus": load_cpus, "num_gpus": 0.0, "actors": None},
        "segment": {"num_cpus": segment_cpus, "num_gpus": segment_gpus, "actors": segment_actors},
        "score": {"num_cpus": score_cpus, "num_gpus": 0.0, "actors": None},
        "extract": {"num_cpus": extract_cpus, "num_gpus": extract_gpus, "actors": extract_actors},
    }
    if repartition_cpus:
        plan["repartition"] = {"num_cpus": repartition_cpus, "num_gpus": 0.0, "actors": None, "fixed": True}
    return plan


def minimum(plan: dict[str, dict], resource: str) -> float:
    """What the plan needs to make progress: one actor of every pool at once, plus the
    largest plain task beside them."""
    actors = sum(s[resource] for s in plan.values() if s["actors"])
    tasks = max((s[resource] for s in plan.values() if s["actors"] is None), default=0.0)
    return actors + tasks


def fit_plan(plan: dict[str, dict], cluster: dict[str, float], *,
             autoscaling: bool = False) -> tuple[dict[str, dict], list[str]]:
    """(the plan to run, notes on what was changed), or BreakSceneError naming what is
    missing. ``cluster`` is ``ray.cluster_resources()``; with ``autoscaling`` the cluster
    grows on demand, so its present size proves nothing and the plan runs as it is."""
    notes: list[str] = []
    have_gpus = float(cluster.get("GPU", 0.0))
    need_gpus = minimum(plan, "num_gpus")
    if need_gpus > have_gpus + 1e-9 and not autoscaling:
        parts = ", ".join(f"one {name} actor {s['num_gpus']:g}" for name, s in plan.items()
                          if s["actors"] and s["num_gpus"])
        raise BreakSceneError(
            f"resources: the job needs at least {need_gpus:g} GPU(s) ({parts}) but the cluster has {have_gpus:g}; "
            "lower resources.extract_gpus / resources.segment_gpus (0 runs on CPUs), or set "
            "resources.autoscaling: true if GPU nodes join on demand")
    have_cpus = float(cluster.get("CPU", 0.0))
    need_cpus = minimum(plan, "num_cpus")
    if autoscaling or need_cpus <= have_cpus + 1e-9:
        return plan, notes
    if have_cpus <= 0:
        raise BreakSceneError("resources: the cluster has no CPU; every stage needs a share of one")
    fitted = {name: dict(s) for name, s in plan.items()}
    for name, s in fitted.items():
        if s["actors"] is None and s["num_cpus"] > have_cpus:
            if s.get("fixed"):
                raise BreakSceneError(f"resources: Ray Data's {name} tasks ask for {s['num_cpus']:g} CPU(s) but the "
                                      f"cluster has {have_cpus:g}")
            s["num_cpus"] = have_cpus  # a task larger than the cluster could never start
    largest = max((s["num_cpus"] for s in fitted.values() if s["actors"] is None), default=0.0)
    pools = [s for s in fitted.values() if s["actors"]]
    room = have_cpus - largest
    pool_cpus = sum(s["num_cpus"] for s in pools)
    scale = min(1.0, room / pool_cpus) if room > 1e-9 and pool_cpus > 0 else 0.0
    for s in pools:
        if not s["num_cpus"]:
            continue
        s["num_cpus"] = _floor(s["num_cpus"] * scale)
        if s["num_cpus"] <= 0:  # no room beside the tasks: run unreserved, and only one
            s["num_cpus"], s["actors"] = 0.0, 1
    shares = ", ".join(f"{name} {s['num_cpus']:g}" for name, s in fitted.items())
    notes.append(f"the cluster has {have_cpus:g} CPU(s), the stages ask for {need_cpus:g} to run side by side: "
                 + (f"actor CPU shares scaled by {scale:.3f}" if scale else
                    "actors run without a CPU share, one per pool") + f" ({shares})")
    return fitted, notes


def _floor(value: float) -> float:
    return math.floor(value * _UNIT) / _UNIT
