"""The memory prediction on Stable Diffusion XL (issue 19): a meta-device step with both
text encoders and SDXL's added conditioning, phase 2 `full` and `lora` over the UNet and
both encoders, checkpointing, bitsandbytes' 8-bit AdamW, the memory check's refusal and
"auto" checkpointing. Everything here runs on the ``meta`` device or on sdxl-tiny: no test
builds sdxl-base-random's weights."""
import math
import types

import pytest
import torch

from breakscene.config import ExtractConfig, RuntimeConfig
from breakscene.errors import BreakSceneError
from breakscene.method.phases import PhaseSetup, phase_setup
from breakscene.method.training import ADAMW_8BIT_BLOCK, ADAMW_8BIT_MIN_SIZE, make_optimizer
from breakscene.models.memory import GIB, check_fits, meta_copies, meta_models, predict_step_memory, predicted_peak
from commands.main import main
from conftest import write_scene

BASE = "sdxl-base-random"


@pytest.fixture(scope="module")
def base():
    """SDXL base's shapes on the meta device (no storage)."""
    models = meta_models(BASE)
    assert models.unet.device.type == "meta" and models.native_resolution == 1024
    return models


@pytest.fixture(scope="module")
def lora_1024(base):
    return {ckpt: predict_step_memory(base, ExtractConfig(phase2_mode="lora"), 1024, "phase2", ckpt)
            for ckpt in (False, True)}


@pytest.fixture(scope="module")
def full_1024(base):
    return {ckpt: predict_step_memory(base, ExtractConfig(phase2_mode="full"), 1024, "phase2", ckpt)
            for ckpt in (False, True)}


def parameter_count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_an_sdxl_folder_on_meta_predicts_what_the_loaded_model_predicts(tmp_path):
    """An SDXL diffusers folder is rebuilt from its configs alone (both encoders, tokenizer_2)
    and predicts what the loaded models predict; the step has SDXL's 154 ids."""
    from breakscene.models.loading import load_any
    from breakscene.models.memory import step_batch

    assert main(["export-base", "sdxl-tiny", str(tmp_path / "model")]) == 0
    meta, real = meta_models(str(tmp_path / "model")), load_any("sdxl-tiny")
    assert meta.family == "sdxl" and meta.text_encoder_2.device.type == "meta"
    assert step_batch(meta, ExtractConfig(), 64, torch.float32).input_ids.shape == (1, 154)
    cfg = ExtractConfig(phase2_mode="lora")
    for phase in ("phase1", "phase2"):
        assert predict_step_memory(meta, cfg, 64, phase, False) == predict_step_memory(real, cfg, 64, phase, False)


def test_sdxl_full_trains_the_unet_and_both_encoders(base, full_1024):
    """Gradients and fp32 AdamW moments of every UNet and encoder weight, counted by hand
    from SDXL base's published parameter counts; weights include the VAE."""
    trainable = 2_567_463_684 + 123_060_480 + 694_659_840
    assert parameter_count(base.unet, *base.text_encoders) == trainable
    plain, ckpt = full_1024[False], full_1024[True]
    assert plain.gradients == 4 * trainable and plain.optimizer == 8 * trainable
    assert plain.weights == 4 * (trainable + 83_653_863)
    assert plain.weight_casts == 2 * trainable  # autocast's bf16 copy of each trained weight
    assert plain.activations > 0 and plain.total > 50 * GIB
    assert (ckpt.gradients, ckpt.optimizer) == (plain.gradients, plain.optimizer)  # checkpointing: activations only


def test_sdxl_prediction_is_ordered(full_1024, lora_1024):
    """full > lora; checkpointing lowers the activations and nothing else."""
    for ckpt in (False, True):
        assert full_1024[ckpt].total > lora_1024[ckpt].total > 0
    for est in (full_1024, lora_1024):
        assert est[True].activations < 0.2 * est[False].activations
        assert (est[True].weights, est[True].optimizer) == (est[False].weights, est[False].optimizer)


def test_sdxl_lora_adapters_sit_on_the_unet_and_both_encoders(base, lora_1024):
    """The adapters the prediction adds are those phases.py adds on the UNet and both text
    encoders, and both embedding matrices train beside them."""
    unet, encoders, _ = meta_copies(base)
    setup = phase_setup("phase2", ExtractConfig(phase2_mode="lora"), unet, encoders)
    owners = {name.split(".")[0] for m, prefix in ((unet, "unet"), (encoders[0], "te1"), (encoders[1], "te2"))
              for name, p in m.named_parameters(prefix=prefix) if "lora_" in name}
    assert owners == {"unet", "te1", "te2"}
    adapters = sum(p.numel() for p in setup.adapters)
    rows = sum(e.get_input_embeddings().weight.numel() for e in encoders)
    assert lora_1024[False].gradients == 4 * (adapters + rows)
    assert lora_1024[False].weights == 4 * (parameter_count(base.unet, *base.text_encoders, base.vae) + adapters)


def eight_bit_bytes(params) -> int:
    """bitsandbytes' AdamW8bit state, by hand: a byte per moment per value and an fp32
    scale per 256-value block of each moment; tensors under 4096 values keep fp32 moments."""
    return sum(8 * p.numel() if p.numel() < 4096 else 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256)
               for p in params)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_8bit_adamw_lowers_only_the_optimizer_part_by_its_bytes(base, mode):
    assert (ADAMW_8BIT_MIN_SIZE, ADAMW_8BIT_BLOCK) == (4096, 256)
    cfg = ExtractConfig(phase2_mode=mode)
    plain = predict_step_memory(base, cfg, 512, "phase2", checkpointing=True)
    small = predict_step_memory(base, cfg, 512, "phase2", checkpointing=True, optimizer="adamw-8bit")
    unet, encoders, _ = meta_copies(base)
    params = phase_setup("phase2", cfg, unet, encoders).trainable
    assert plain.optimizer == 8 * sum(p.numel() for p in params)
    assert small.optimizer == eight_bit_bytes(params)
    assert plain.total - small.total == plain.optimizer - small.optimizer > 0
    if mode == "full":  # ~2 bytes a parameter instead of 8: about a quarter
        assert 0.25 < small.optimizer / plain.optimizer < 0.26


def test_8bit_prediction_equals_a_real_bitsandbytes_step():
    """Where bitsandbytes is installed (the adamw-8bit extra), its real state on sdxl-tiny
    equals the prediction."""
    bnb = pytest.importorskip("bitsandbytes")
    from breakscene.models.loading import load_any

    cfg = ExtractConfig(phase2_mode="lora")
    predicted = predict_step_memory(load_any("sdxl-tiny"), cfg, 64, "phase2", False, optimizer="adamw-8bit")
    models = load_any("sdxl-tiny")
    setup = phase_setup("phase2", cfg, models.unet, models.text_encoders)
    opt = bnb.optim.AdamW8bit([dict(g) for g in setup.groups], min_8bit_size=ADAMW_8BIT_MIN_SIZE)
    for p in setup.trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                if k in ("state1", "state2", "absmax1", "absmax2"))
    assert state == predicted.optimizer


def test_sdxl_at_1024_fits_24_gb_only_with_lora_checkpointing_and_8bit_adamw(base, lora_1024, full_1024):
    """What the benchmark table says: on a 24 GiB card (0.9 usable) SDXL base trains only with
    LoRA, checkpointing and 8-bit AdamW; full fine-tuning needs more than 24 GiB in every case."""
    usable = RuntimeConfig().memory_headroom * 24 * GIB
    cfg = ExtractConfig(phase2_mode="lora")
    with_8bit = predicted_peak(base, cfg, 1024, torch.device("cuda"), RuntimeConfig(optimizer="adamw-8bit"))
    assert with_8bit[0] <= usable < lora_1024[True].total
    full_8bit = predict_step_memory(base, ExtractConfig(), 1024, "phase2", True, optimizer="adamw-8bit")
    assert full_8bit.total > 24 * GIB


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of ``gpu(gib)`` memory, as far as the memory check and "auto" read it."""
    def make(gib: float):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
            total_memory=int(gib * GIB)))
        return torch.device("cuda")
    return make


def test_check_fits_refuses_sdxl_on_a_16_gb_card_naming_the_levers(gpu):
    with pytest.raises(BreakSceneError) as info:
        check_fits(BASE, None, ExtractConfig(phase2_mode="full"), gpu(16), RuntimeConfig())
    message = str(info.value)
    assert "\n" not in message and "GiB" in message and "1024 px" in message
    assert "--phase2-mode lora" in message and "adamw-8bit" in message and "--resolution" in message
    # "auto" checkpointing is already counted on CUDA: not offered again
    assert "--gradient-checkpointing on" not in message


def test_extract_refuses_sdxl_base_on_a_small_machine_with_one_error_line(tmp_path, capsys, monkeypatch):
    """`breakscene extract --model sdxl-base-random` in a container limited to 8 GiB: one
    `error:` line, exit 2, the levers named, before any weight is built."""
    import breakscene.models.memory
    import breakscene.models.resident

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before its memory was checked")

    monkeypatch.setattr(breakscene.models.resident, "load_any", no_load)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(str(8 * GIB))
    (cgroup / "memory.current").write_text("0")
    monkeypatch.setattr(breakscene.models.memory, "CGROUP", cgroup)
    scene = write_scene(tmp_path / "scene")
    code = main(["extract", "--scene", str(scene), "--model", BASE, "--device", "cpu", "--phase1-steps", "1",
                 "--phase2-steps", "1", "--no-prior-preservation", "--grid-seeds", "0", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "GiB" in lines[0] and "--phase2-mode lora" in lines[0] and "--gradient-checkpointing on" in lines[0]
    assert not (tmp_path / "out").exists()


def test_adamw_8bit_needs_cuda_one_error_before_any_work():
    with pytest.raises(BreakSceneError, match="adamw-8bit needs a CUDA device"):
        check_fits("sdxl-tiny", None, ExtractConfig(), torch.device("cpu"), RuntimeConfig(optimizer="adamw-8bit"))
    weights = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(BreakSceneError, match="adamw-8bit needs a CUDA device"):
        make_optimizer(PhaseSetup([{"params": weights, "lr": 0.1}], weights), ExtractConfig(),
                       torch.device("cpu"), "8bit")


def test_adamw_8bit_without_bitsandbytes_names_the_extra(monkeypatch, gpu):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(BreakSceneError, match=r"breakscene\[adamw-8bit\]"):
        check_fits("sdxl-tiny", None, ExtractConfig(), gpu(80), RuntimeConfig(optimizer="adamw-8bit"))


def test_auto_checkpointing_decides_from_the_prediction_on_sdxl(gpu):
    """On SDXL, as on SD 2.x, "auto" turns checkpointing on exactly for the phases whose
    predicted peak exceeds the usable share of the device (device properties stubbed)."""
    from breakscene.models.resident import ResidentModels

    resident = ResidentModels("sdxl-tiny", device="cpu")
    assert resident.models.family == "sdxl"
    cfg = ExtractConfig(phase2_mode="full")
    need = {p: predict_step_memory(resident.models, cfg, 64, p, checkpointing=False).total
            for p in ("phase1", "phase2")}
    assert need["phase1"] < need["phase2"]
    gpu((need["phase1"] + need["phase2"]) / 2 / resident.runtime.memory_headroom / GIB)
    resident.device = torch.device("cuda")  # only the decision reads it
    assert resident.wants_checkpointing("phase1", cfg, 64) is False
    assert resident.wants_checkpointing("phase2", cfg, 64) is True
    # 8-bit AdamW lowers the prediction the decision reads
    small = predict_step_memory(resident.models, cfg, 64, "phase2", checkpointing=False, optimizer="adamw-8bit")
    assert small.total < need["phase2"]
