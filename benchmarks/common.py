"""What every benchmark shares: the machine it ran on, and the scene it measures."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "examples"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}  # other work on the machine skews timings
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def example_scene():
    """(scene, its name): the shared example ``bear`` where present, else a generated one."""
    from breakscene.scenes.scene import load_scene_dir
    from breakscene.scenes.synthetic import generated_extract_scene

    if (EXAMPLES / "bear" / "img.jpg").is_file():
        return load_scene_dir(EXAMPLES / "bear"), "shared/examples/bear"
    return generated_extract_scene(0, 512), "generated"
