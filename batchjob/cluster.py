"""Cluster start-up and GPU sharing, one rule for every driver (the extraction run and
the robustness study): join the given address, or the cluster of ``ray job submit``
(RAY_ADDRESS), or start an embedded local one."""
from __future__ import annotations

import os
import signal

from breakscene import interrupts

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
