"""Safety net for the issue-13 refactor of breakscene/extraction/extractor.py: the `tiny` model's loss
curves for a fixed seed stay the numbers recorded before it, and a few settings keep their
effect. Public names only (Extractor.extract, ExtractionResult, the bundle manifest).

The golden numbers were recorded on 2026-11-26, before the issue-13 refactor, on CPU fp32
with torch.set_num_threads(2), and checked identical over two runs in one process. They
legitimately change only when what is learned changes: the order or kind of the random
draws per step (subset, flip, latent sample, noise, timestep, class image), the loss
definitions or weights, the optimiser, the LoRA initialisation, the `tiny` preset, the
scene preparation (crop, resize, mask downsampling), or the torch / diffusers / peft
versions' CPU kernels. A pure move of code must leave them identical.
"""
import numpy as np
import pytest
import torch
from conftest import quick_config
from PIL import Image
from safetensors import safe_open

from breakscene.files import bundle as bundle_io
from breakscene.extraction.extractor import Extractor
from breakscene.scenes.scene import load_scene_dir

THREADS = 2
TERMS = ("total", "diffusion", "attention", "prior")

# Phase 1 learns only the token rows, so it is the same for both phase-2 modes.
PHASE1 = {
    "total": {"first": 2.231811285018921, "last": 2.3032643795013428, "mean": 2.263435125350952,
              "min": 2.231811285018921, "curve": [2.231811, 2.25523, 2.303264]},
    "diffusion": {"first": 1.1156539916992188, "last": 1.1613101959228516, "mean": 1.1507952213287354,
                  "min": 1.1156539916992188, "curve": [1.115654, 1.175421, 1.16131]},
    "attention": {"first": 0.8474440574645996, "last": 1.2000234127044678, "mean": 0.9195427894592285,
                  "min": 0.7111610174179077, "curve": [0.847444, 0.711161, 1.200023]},
    "prior": {"first": 1.1076829433441162, "last": 1.1299538612365723, "mean": 1.1034444570541382,
              "min": 1.0726966857910156, "curve": [1.107683, 1.072697, 1.129954]},
}
PHASE2 = {
    "lora": {
        "total": {"first": 2.1626040935516357, "last": 2.284043312072754, "mean": 2.2141101360321045,
                  "min": 2.1626040935516357, "curve": [2.162604, 2.195683, 2.284043]},
        "diffusion": {"first": 1.0697941780090332, "last": 1.1635503768920898, "mean": 1.1085468530654907,
                      "min": 1.0697941780090332, "curve": [1.069794, 1.092296, 1.16355]},
        "attention": {"first": 1.3970129489898682, "last": 0.9450373649597168, "mean": 1.412584662437439,
                      "min": 0.9450373649597168, "curve": [1.397013, 1.895703, 0.945037]},
        "prior": {"first": 1.078839659690857, "last": 1.1110426187515259, "mean": 1.0914373397827148,
                  "min": 1.078839659690857, "curve": [1.07884, 1.08443, 1.111043]},
    },
    "full": {
        "total": {"first": 2.1626040935516357, "last": 2.2814714908599854, "mean": 2.2128047943115234,
                  "min": 2.1626040935516357, "curve": [2.162604, 2.194339, 2.281471]},
        "diffusion": {"first": 1.0697941780090332, "last": 1.1621060371398926, "mean": 1.1078184843063354,
                      "min": 1.0697941780090332, "curve": [1.069794, 1.091555, 1.162106]},
        "attention": {"first": 1.3970129489898682, "last": 0.9455555081367493, "mean": 1.4128828048706055,
                      "min": 0.9455555081367493, "curve": [1.397013, 1.89608, 0.945556]},
        "prior": {"first": 1.078839659690857, "last": 1.1099098920822144, "mean": 1.0908575057983398,
                  "min": 1.078839659690857, "curve": [1.07884, 1.083823, 1.10991]},
    },
}


@pytest.fixture(scope="module")
def fixed_threads():
    """CPU fp32 reductions are deterministic only for a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def extractor(fixed_threads):
    # its own instance: nothing another test did to the shared one can reach the curves
    return Extractor("tiny", progress=False)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    """Fixed class images (the prior's sampler is not what these tests pin), made here."""
    folder = tmp_path_factory.mktemp("class")
    rs = np.random.RandomState(7)
    for i in range(3):
        Image.fromarray(rs.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def bear(examples):
    return load_scene_dir(examples / "bear")


def golden_config(class_dir, **overrides):
    return quick_config(**{"phase1_steps": 3, "phase2_steps": 3, "batch_size": 2, "grid_seeds": 0, "seed": 3,
                           "prior": {"class_data_dir": class_dir, "num_class_images": 3}, **overrides})


def assert_phase(got: dict, want: dict, steps: int = 3):
    assert got["steps"] == steps
    for term in TERMS:
        for key in ("first", "last", "mean", "min"):
            assert got[term][key] == pytest.approx(want[term][key], rel=1e-5), (term, key)
        assert got[term]["curve"] == pytest.approx(want[term]["curve"], rel=1e-5, abs=2e-6), term


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_golden_loss_curves(extractor, bear, class_dir, mode):
    result = extractor.extract(bear, golden_config(class_dir, phase2_mode=mode))
    assert_phase(result.losses["phase1"], PHASE1)
    assert_phase(result.losses["phase2"], PHASE2[mode])
    assert result.final_loss == pytest.approx(PHASE2[mode]["total"]["last"], rel=1e-5)


def test_zero_step_phase1(extractor, bear, class_dir, tmp_path):
    """No phase 1: phase 2 draws the same first batch on the base model (LoRA B starts at
    zero), so its first loss is phase 1's golden first loss."""
    out = str(tmp_path / "bundle")
    result = extractor.extract(bear, golden_config(class_dir, phase1_steps=0, phase2_steps=2, phase2_mode="lora"),
                               out=out)
    assert result.losses["phase1"]["steps"] == 0 and "total" not in result.losses["phase1"]
    assert result.losses["phase2"]["steps"] == 2
    for term in TERMS:
        assert result.losses["phase2"][term]["first"] == pytest.approx(PHASE1[term]["first"], rel=1e-5), term
    assert bundle_io.read_manifest(out)["losses"]["phase1"]["steps"] == 0
    # lora.text_encoder defaults to true: the bundle holds both models' adapters
    with safe_open(f"{out}/pytorch_lora_weights.safetensors", "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder"}  # noqa: SIM118 (not a dict)


def test_zero_step_phase2_writes_a_bundle(extractor, bear, class_dir, tmp_path):
    out = str(tmp_path / "bundle")
    result = extractor.extract(bear, golden_config(class_dir, phase2_steps=0, phase2_mode="lora"), out=out)
    assert_phase(result.losses["phase1"], PHASE1)  # phase 1 is unaffected by what follows
    assert "total" not in result.losses["phase2"]
    assert result.final_loss == pytest.approx(PHASE1["total"]["last"], rel=1e-5)  # falls back to phase 1
    info = bundle_io.read_manifest(out)
    assert info["losses"]["phase2"]["steps"] == 0 and info["config"]["phase2_steps"] == 0
    assert info["losses"]["phase1"]["total"]["curve"] == result.losses["phase1"]["total"]["curve"]
    assert set(bundle_io.load_embeddings(out)) == {"<asset0>", "<asset1>", "<asset2>"}


def test_non_native_resolution(extractor, bear, class_dir, tmp_path):
    assert extractor.models.native_resolution == 64
    out = str(tmp_path / "bundle")
    result = extractor.extract(bear, golden_config(class_dir, resolution=48, phase2_mode="lora",
                                                   phase1_steps=2, phase2_steps=1), out=out)
    # 48 px -> 24 latent pixels (VAE factor 2) -> 6x6 attention maps (attn_downsample 4); native gives 8x8
    assert result.attention_maps.shape == (3, 6, 6)
    info = bundle_io.read_manifest(out)
    assert info["resolution"] == 48 and info["config"]["resolution"] == 48
    masks = sorted((tmp_path / "bundle" / "masks").glob("mask*.png"))
    assert len(masks) == 3
    # other pixels, other losses: the first step's loss is not the native one's
    assert result.losses["phase1"]["total"]["first"] != pytest.approx(PHASE1["total"]["first"], rel=1e-3)
    assert np.isfinite(result.final_loss)


def test_lora_without_text_encoder(extractor, bear, class_dir, tmp_path):
    out = str(tmp_path / "bundle")
    cfg = golden_config(class_dir, phase2_mode="lora", lora={"text_encoder": False})
    result = extractor.extract(bear, cfg, out=out)
    assert_phase(result.losses["phase1"], PHASE1)
    # adapters start at zero, so step 1 matches; after it the text encoder's adapters are missing
    p2 = result.losses["phase2"]["total"]
    assert p2["first"] == pytest.approx(PHASE2["lora"]["total"]["first"], rel=1e-5)
    assert p2["last"] != pytest.approx(PHASE2["lora"]["total"]["last"], rel=1e-6)
    info = bundle_io.read_manifest(out)
    assert info["config"]["lora"]["text_encoder"] is False
    with safe_open(f"{out}/pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys), keys[:5]


def test_masked_loss_normalization_all(extractor, bear, class_dir):
    result = extractor.extract(bear, golden_config(class_dir, phase2_mode="lora",
                                                   masked_loss_normalization="all", phase2_steps=1))
    p1 = result.losses["phase1"]
    # same first draws: the attention and prior terms match; the masked term is divided by
    # every latent pixel instead of the mask's area, so it is strictly smaller
    assert p1["attention"]["first"] == pytest.approx(PHASE1["attention"]["first"], rel=1e-5)
    assert p1["prior"]["first"] == pytest.approx(PHASE1["prior"]["first"], rel=1e-5)
    assert 0 < p1["diffusion"]["first"] < 0.9 * PHASE1["diffusion"]["first"]
    assert p1["total"]["first"] < PHASE1["total"]["first"]
