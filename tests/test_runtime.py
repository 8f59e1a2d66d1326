"""Runtime levers of the Extractor: they change speed and memory, never what is learned."""
import types

import pytest
import torch
from conftest import quick_config

from breakscene.config import RuntimeConfig
from breakscene.extraction.extractor import Extractor
from breakscene.models.memory import predict_step_memory
from breakscene.scenes.scene import load_scene_dir


def _losses(result):
    return [result.losses[p][k]["last"] for p in ("phase1", "phase2") for k in ("diffusion", "attention", "prior")]


@pytest.fixture(scope="module")
def scene(examples):
    return load_scene_dir(examples / "bear")


def test_gradient_checkpointing_trains_the_same_weights(scene):
    cfg = quick_config(grid_seeds=0)
    plain = Extractor("tiny", progress=False, runtime=RuntimeConfig(gradient_checkpointing="off"))
    ckpt = Extractor("tiny", progress=False, runtime=RuntimeConfig(gradient_checkpointing="on"))
    a, b = plain.extract(scene, cfg), ckpt.extract(scene, cfg)
    assert b.runtime["gradient_checkpointing"] == {"phase1": True, "phase2": True}
    assert a.runtime["gradient_checkpointing"] == {"phase1": False, "phase2": False}
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    assert torch.allclose(torch.from_numpy(a.attention_maps), torch.from_numpy(b.attention_maps), atol=1e-6)
    assert not ckpt.models.unet.is_gradient_checkpointing  # off again after the scene


def test_auto_checkpointing_follows_the_memory_prediction(monkeypatch):
    """On a CUDA device "auto" turns checkpointing on exactly for the phases whose predicted
    peak exceeds the usable share of the device (device properties stubbed: no GPU here)."""
    ex = Extractor("tiny", progress=False)
    cfg = quick_config(phase2_mode="full")
    need = {p: predict_step_memory(ex.models, cfg, 64, p, checkpointing=False).total for p in ("phase1", "phase2")}
    assert need["phase1"] < need["phase2"]
    total = (need["phase1"] + need["phase2"]) / 2 / ex.runtime.memory_headroom  # between the two
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=total))
    resident = ex.resident
    resident.device = torch.device("cuda")  # only the decision reads it
    assert resident.wants_checkpointing("phase1", cfg, 64) is False
    assert resident.wants_checkpointing("phase2", cfg, 64) is True
    resident.device = torch.device("cpu")
    assert resident.wants_checkpointing("phase2", cfg, 64) is False  # the CPU has no device memory to fit


def test_channels_last_survives_training_and_reset(scene):
    ex = Extractor("tiny", progress=False)
    weight = ex.models.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    ex.extract(scene, quick_config(grid_seeds=0))
    assert ex.models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    plain = Extractor("tiny", progress=False, runtime=RuntimeConfig(channels_last=False))
    assert _losses(ex.extract(scene, quick_config(grid_seeds=0))) == pytest.approx(
        _losses(plain.extract(scene, quick_config(grid_seeds=0))), rel=1e-4)


def test_compiled_unet_matches_eager_through_lora_and_reset(scene):
    """torch.compile (the "eager" backend: dynamo's tracing and guards without code
    generation, which takes minutes on 2 cores) through LoRA injection and removal."""
    cfg = quick_config(phase2_mode="lora", grid_seeds=0, phase1_steps=2, phase2_steps=2)
    compiled = Extractor("tiny", progress=False, runtime=RuntimeConfig(compile=True, compile_backend="eager"))
    eager = Extractor("tiny", progress=False)
    assert compiled.models.unet._compiled_call_impl is not None
    first = compiled.extract(scene, cfg)
    assert _losses(first) == pytest.approx(_losses(eager.extract(scene, cfg)), rel=1e-4)
    assert _losses(compiled.extract(scene, cfg)) == pytest.approx(_losses(first), rel=1e-6)  # pristine reset
