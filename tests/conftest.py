import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No hub access in tests, ever: an unknown id must fail fast, not wait on DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT.parent / "shared" / "examples"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Class images and fetched models go to a per-run cache, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["BREAKSCENE_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def fresh_io_settings():
    """A test that applies a job's storage settings does not leak them into the next one."""
    yield
    from breakscene.files import storage

    storage.reset_io_settings()


@pytest.fixture(scope="session")
def examples() -> Path:
    if not (EXAMPLES / "bear" / "img.jpg").is_file():
        pytest.fail(f"the shared example scenes are missing at {EXAMPLES}")
    return EXAMPLES


@pytest.fixture(scope="session")
def tiny_extractor():
    from breakscene.extraction.extractor import Extractor

    return Extractor("tiny", progress=False)


def quick_config(**overrides):
    """A few steps of everything: fast enough for unit tests on 2 CPU cores."""
    from breakscene.config import ExtractConfig

    base = dict(phase1_steps=4, phase2_steps=4, grid_seeds=1, grid_inference_steps=3,
                prior={"num_class_images": 3, "generation_steps": 2},
                diagnostic_timesteps=(200, 600))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return ExtractConfig(**base)


def write_scene(folder: Path, size=(96, 64), boxes=((10, 10, 40, 40), (50, 20, 90, 60))) -> Path:
    """A synthetic scene: coloured rectangles on grey, with exact masks."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    img = np.full((h, w, 3), 128, np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[y0:y1, x0:x1] = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][i % 4]
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(folder / f"mask{i}.png")
    Image.fromarray(img).save(folder / "img.png")
    return folder
