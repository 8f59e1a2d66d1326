import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, write_scene
from commands.main import main

FAST = ["--phase1-steps", "3", "--phase2-steps", "3", "--num-class-images", "2", "--grid-seeds", "1"]


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, examples):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["extract", "--scene", str(examples / "creature"), "--model", "tiny", "--out", str(out),
                 "--init-token", "creature", *FAST]) == 0
    return out


def test_extract_prints_summary_and_writes_bundle(cli_bundle, capsys):
    info = json.loads((cli_bundle / "bundle.json").read_text())
    assert info["config"]["phase1_steps"] == 3 and info["config"]["prior"]["num_class_images"] == 2
    assert info["concepts"][0]["init_word"] == "creature"


def test_extract_runtime_flags_reach_the_bundle(tmp_path, examples):
    out = tmp_path / "bundle"
    assert main(["extract", "--scene", str(examples / "creature"), "--model", "tiny", "--out", str(out),
                 "--gradient-checkpointing", "on", "--no-channels-last", *FAST]) == 0
    runtime = json.loads((out / "bundle.json").read_text())["runtime"]
    assert runtime["gradient_checkpointing"] == {"phase1": True, "phase2": True}
    assert runtime["channels_last"] is False and runtime["compile"] is False


def test_extract_refuses_to_overwrite_without_force(cli_bundle, capsys, examples):
    args = ["extract", "--scene", str(examples / "creature"), "--model", "tiny", "--out", str(cli_bundle), *FAST]
    assert main(args) == 2
    assert "already holds a bundle" in capsys.readouterr().err


def test_generate_from_bundle(cli_bundle, tmp_path, capsys):
    out = tmp_path / "gen.png"
    assert main(["generate", "--bundle", str(cli_bundle), "--prompt", "a photo of <asset1> at the beach",
                 "--num-images", "2", "--steps", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.height == 64 and img.width > 2 * 64
    assert main(["generate", "--bundle", str(cli_bundle), "--prompt", "a photo of <asset7>",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "<asset7>" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_generate_never_replaces_an_existing_file_unless_forced(cli_bundle, tmp_path, capsys):
    out = tmp_path / "holiday.png"
    out.write_bytes(b"the user's own photo")
    args = ["generate", "--bundle", str(cli_bundle), "--prompt", "a photo of <asset0>", "--steps", "2",
            "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and str(out) in err
    assert out.read_bytes() == b"the user's own photo"
    assert main(["generate", "--bundle", str(cli_bundle), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert Image.open(out).size == (64, 64)


def test_extract_on_a_saved_diffusers_folder(tmp_path, capsys):
    from breakscene.models.loading import load_models

    load_models("tiny").save_pretrained(tmp_path / "model")
    scene = write_scene(tmp_path / "scene")
    assert main(["extract", "--image", str(scene / "img.png"), "--mask", str(scene / "mask0.png"),
                 "--mask", str(scene / "mask1.png"), "--model", str(tmp_path / "model"),
                 "--no-prior-preservation", "--out", str(tmp_path / "b"), *FAST]) == 0
    assert "attention IoU" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["model"]["id"] == str(tmp_path / "model")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty_mask", "is empty"),
    ("unknown_model", "is not a preset"),
    ("bad_steps", "phase1_steps"),
    ("bad_config_key", "lamda_attn"),
])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, capsys, case, message):
    scene = write_scene(tmp_path / "scene")
    args = ["extract", "--scene", str(scene), "--model", "tiny", "--out", str(tmp_path / "out"), *FAST]
    if case == "missing":
        args[2] = str(tmp_path / "nowhere")
    elif case == "empty_mask":
        Image.fromarray(np.zeros((64, 96), np.uint8)).save(scene / "mask1.png")
    elif case == "unknown_model":
        args[4] = "nobody/nothing"
    elif case == "bad_steps":
        args += ["--phase1-steps", "-1"]
    elif case == "bad_config_key":
        (tmp_path / "c.yaml").write_text("lamda_attn: 0.1\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "commands.main", "extract", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--phase2-mode" in proc.stdout
