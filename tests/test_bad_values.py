"""Bad values refused before any work (issue 17): a resolution or a training step the machine
cannot hold, YAML that expands through anchors or is too big, non-finite numbers, seeds out of
range, and damaged bundles given to `generate`. Each is one `error:` line and exit status 2,
found before any model is loaded; every JSON file the project writes is strict JSON."""
import ast
import json
import math
import pickle
import shutil
import time
from pathlib import Path

import pytest

from breakscene.errors import BreakSceneError
from conftest import ROOT, write_scene
from commands.main import main
from commands.jobs import load_job

CHEAP = ["--model", "tiny", "--phase1-steps", "1", "--phase2-steps", "1", "--no-prior-preservation",
         "--resolution", "32", "--grid-seeds", "0"]
TOO_BIG_SEED = str(2**64)


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def extract(capsys, tmp_path, *args) -> tuple[int, str]:
    """(exit status, stderr) of a cheap `breakscene extract` with ARGS last (they win)."""
    scene = write_scene(tmp_path / "scene")
    code = main(["extract", "--scene", str(scene), *CHEAP, *args, "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


def write_job(tmp_path: Path, text: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"output: {tmp_path / 'out'}\ndemo_inputs: {{generated_scenes: 1}}\n" + text)
    return job


def refused(job: Path) -> str:
    with pytest.raises(BreakSceneError) as info:
        load_job(job)
    return str(info.value)


# --- 1. resolution and memory ---------------------------------------------------

def test_a_resolution_above_the_bound_is_refused(tmp_path, capsys):
    code, err = extract(capsys, tmp_path, "--resolution", "100000")
    line = one_error(err)
    assert code == 2 and "resolution" in line and "2048" in line
    assert not (tmp_path / "out").exists()


def test_a_job_file_resolution_above_the_bound_is_refused(tmp_path):
    assert "extract.resolution" in refused(write_job(tmp_path, "extract: {resolution: 100000}\n"))


def test_a_step_the_machine_cannot_hold_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """sd21-base-random at 2048 px, 256 images a step: terabytes predicted on the meta device,
    refused without building the model's weights."""
    import breakscene.models.resident

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before its memory was checked")

    monkeypatch.setattr(breakscene.models.resident, "load_any", no_load)  # the one loader of every family
    start = time.perf_counter()
    code, err = extract(capsys, tmp_path, "--model", "sd21-base-random", "--resolution", "2048",
                        "--batch-size", "256", "--device", "cpu")
    line = one_error(err)
    assert code == 2 and "GiB" in line and "memory" in line and "--batch-size" in line
    assert time.perf_counter() - start < 60 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["preset", "folder"])
def test_the_meta_model_predicts_what_the_loaded_model_predicts(tmp_path, where):
    from breakscene.models.memory import meta_models
    from breakscene.config import ExtractConfig
    from breakscene.models.memory import predict_step_memory
    from breakscene.models.loading import load_models

    model = "tiny"
    if where == "folder":
        load_models("tiny").save_pretrained(tmp_path / "model")
        model = str(tmp_path / "model")
    meta, real = meta_models(model, None), load_models(model)
    assert meta.unet.device.type == "meta" and meta.native_resolution == real.native_resolution
    cfg = ExtractConfig(phase2_mode="lora")
    for phase in ("phase1", "phase2"):
        assert predict_step_memory(meta, cfg, 64, phase, False) == predict_step_memory(real, cfg, 64, phase, False)


def test_on_cuda_a_step_is_judged_as_the_extractor_will_run_it():
    """"auto" checkpointing turns on where a step would not fit, so CUDA refuses only what
    does not fit even checkpointed (in mixed precision); the CPU trains fp32 as configured."""
    import torch

    from breakscene.models.memory import meta_models, predicted_peak
    from breakscene.config import ExtractConfig, RuntimeConfig
    from breakscene.models.memory import predict_step_memory

    meta, cfg = meta_models("tiny"), ExtractConfig(resolution=256)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    best = predict_step_memory(meta, cfg, 256, "phase2", checkpointing=True, mixed_precision=True).total
    assert predicted_peak(meta, cfg, 256, cuda, RuntimeConfig()) == (best, "phase2")
    assert predicted_peak(meta, cfg, 256, cuda, RuntimeConfig(gradient_checkpointing="off"))[0] > best
    fp32 = predict_step_memory(meta, cfg, 256, "phase2", checkpointing=False, mixed_precision=False).total
    assert predicted_peak(meta, cfg, 256, cpu, RuntimeConfig()) == (fp32, "phase2")


def test_a_model_that_is_not_there_is_still_reported_by_the_loader(tmp_path, capsys):
    code, err = extract(capsys, tmp_path, "--model", "nobody/nothing")
    assert code == 2 and "is not a preset" in one_error(err)


# --- 2. YAML: anchors, size, depth ----------------------------------------------

def anchor_bomb(levels: int = 9) -> str:
    """Nine lists of nine, each of the previous one: 891 bytes that expand to 9**9 strings."""
    rows = ['l0: &l0 [' + ", ".join(['"lol"'] * 9) + "]"]
    rows += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "storage:\n  options:\n    s3:\n" + "".join(f"      {row}\n" for row in rows)


def test_an_anchor_bomb_in_a_job_file_is_refused_fast(tmp_path):
    job = write_job(tmp_path, anchor_bomb())
    start = time.perf_counter()
    message = refused(job)
    assert "alias" in message and str(job) in message and time.perf_counter() - start < 5


def test_run_refuses_an_anchor_bomb_before_any_side_effect(tmp_path, capsys):
    job = write_job(tmp_path, anchor_bomb())
    assert main(["run", str(job)]) == 2
    assert "alias" in one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # no lease taken, no output claimed


def test_an_anchor_bomb_in_a_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("\n".join(anchor_bomb().splitlines()[3:]).replace("      ", "") + "\n")
    code, err = extract(capsys, tmp_path, "--config", str(tmp_path / "c.yaml"))
    line = one_error(err)
    assert code == 2 and "alias" in line and "c.yaml" in line


def test_a_big_job_file_is_refused_without_parsing_it(tmp_path):
    job = write_job(tmp_path, "runtime_env:\n  env_vars:\n" + "".join(f"    K{i}: v\n" for i in range(200_000)))
    assert job.stat().st_size > 2**21
    start = time.perf_counter()
    message = refused(job)
    assert "MiB" in message and str(job) in message and time.perf_counter() - start < 5


def test_a_big_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("# padding\n" * 200_000 + "phase1_steps: 1\n")
    code, err = extract(capsys, tmp_path, "--config", str(tmp_path / "c.yaml"))
    assert code == 2 and "MiB" in one_error(err)


@pytest.mark.parametrize("text, message", [
    ("runtime_env: &r {again: *r}\n", "refers to itself"),
    ("runtime_env: {deep: " + "[" * 900 + "]" * 900 + "}\n", "nested"),
])
def test_recursive_and_deep_yaml_is_one_error(tmp_path, capsys, text, message):
    job = write_job(tmp_path, text)
    assert message in refused(job)
    assert main(["run", str(job)]) == 2 and message in one_error(capsys.readouterr().err)


# --- 3. non-finite numbers and strict JSON -------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_lambda_is_refused(tmp_path, capsys, value):
    code, err = extract(capsys, tmp_path, f"--lambda-attn={value}")
    line = one_error(err)
    assert code == 2 and "lambda_attn" in line and "finite" in line
    assert not (tmp_path / "out").exists()


def test_non_finite_values_in_a_config_file_are_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("guidance_scale: .inf\noptimizer: {betas: [0.9, .nan]}\n")
    code, err = extract(capsys, tmp_path, "--config", str(tmp_path / "c.yaml"))
    line = one_error(err)
    assert code == 2 and "guidance_scale" in line and "optimizer.betas.1" in line and "finite" in line


def test_non_finite_values_in_a_job_file_are_named(tmp_path):
    message = refused(write_job(tmp_path, "storage: {timeout_s: .inf}\nextract: {phase1_lr: .inf}\n"
                                          "resources: {num_gpus: .nan}\n"))
    for field in ("storage.timeout_s", "extract.phase1_lr", "resources.num_gpus"):
        assert field in message
    assert "finite" in message


def test_strict_json_writes_null_for_non_finite_values():
    from breakscene.files.strictjson import to_json

    text = to_json({"iou": float("nan"), "loss": [1.5, float("inf")], "t": (float("-inf"),), "n": None}, indent=1)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == \
        {"iou": None, "loss": [1.5, None], "t": [None], "n": None}
    same = {"a": [1, 2.5, "x", True], "b": {"c": None}}
    assert to_json(same, sort_keys=True) == json.dumps(same, sort_keys=True)  # ids hashed from JSON stay


def test_a_record_with_a_nan_metric_is_strict_json(tmp_path):
    from batchjob.artifacts import write_json

    write_json(str(tmp_path / "r.json"), {"concepts": [{"attention_iou": float("nan")}]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"concepts": [{"attention_iou": None}]}


def test_no_module_writes_json_but_through_the_strict_helper():
    """json.dumps / json.dump write NaN and Infinity, which are not JSON."""
    found = []
    for package in ("breakscene", "pipeline", "robustness"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "strictjson.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("dumps", "dump") \
                        and isinstance(node.value, ast.Name) and node.value.id == "json":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"use breakscene.files.strictjson.to_json: {found}"


# --- 4. seeds -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [TOO_BIG_SEED, "-1", str(2**32)])
def test_a_seed_out_of_range_is_refused(tmp_path, capsys, seed):
    code, err = extract(capsys, tmp_path, f"--seed={seed}")
    line = one_error(err)
    assert code == 2 and "seed" in line and not (tmp_path / "out").exists()


def test_job_file_seeds_out_of_range_are_named(tmp_path):
    message = refused(write_job(tmp_path, f"extract: {{seed: {TOO_BIG_SEED}, diagnostic_seed: -1}}\n"))
    assert "extract.seed" in message and "extract.diagnostic_seed" in message


# --- 5. damaged bundles ---------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A `full` and a `lora` bundle from `breakscene extract`, made once; tests damage copies."""
    root = tmp_path_factory.mktemp("bundles")
    scene = write_scene(root / "scene")
    for mode in ("full", "lora"):
        assert main(["extract", "--scene", str(scene), *CHEAP, "--phase2-mode", mode, "--out", str(root / mode)]) == 0
    return root


def copy_of(bundles: Path, tmp_path: Path, mode: str = "full") -> Path:
    return Path(shutil.copytree(bundles / mode, tmp_path / "bundle"))


def generate(capsys, bundle: Path, tmp_path: Path, *args) -> tuple[int, str]:
    code = main(["generate", "--bundle", str(bundle), "--prompt", "a photo of <asset0>", "--steps", "1",
                 *args, "--out", str(tmp_path / "gen.png")])
    return code, capsys.readouterr().err


def edit_manifest(bundle: Path, change) -> None:
    info = json.loads((bundle / "bundle.json").read_text())
    change(info)
    (bundle / "bundle.json").write_text(json.dumps(info))


class Touch:
    """A pickle that, once unpickled, creates a file: proof that nothing unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"<asset0>": Touch(marker), "weight": [1.0]}))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_guidance_scale_is_refused(bundles, tmp_path, capsys, value):
    code, err = generate(capsys, bundles / "full", tmp_path, "--guidance-scale", value)
    line = one_error(err)
    assert code == 2 and "--guidance-scale" in line and "finite" in line and not (tmp_path / "gen.png").exists()


def test_a_non_finite_lora_scale_is_refused(bundles, tmp_path, capsys):
    code, err = generate(capsys, bundles / "lora", tmp_path, "--lora-scale", "inf")
    assert code == 2 and "--lora-scale" in one_error(err)


@pytest.mark.parametrize("args, flag", [
    (["--seed", TOO_BIG_SEED], "--seed"),
    (["--seed", str(2**32 - 1), "--num-images", "2"], "--seed"),
    (["--height", "100000"], "--height"),
    (["--width", "4096"], "--width"),
])
def test_generate_values_out_of_range_are_refused(bundles, tmp_path, capsys, args, flag):
    code, err = generate(capsys, bundles / "full", tmp_path, *args)
    assert code == 2 and flag in one_error(err) and not (tmp_path / "gen.png").exists()


def test_a_bundle_without_tokens(bundles, tmp_path, capsys):
    bundle = copy_of(bundles, tmp_path)
    edit_manifest(bundle, lambda info: info.pop("tokens"))
    code, err = generate(capsys, bundle, tmp_path)
    line = one_error(err)
    assert code == 2 and "bundle.json" in line and "tokens" in line


def test_a_bundle_with_fewer_tokens_than_embedding_files(bundles, tmp_path, capsys):
    bundle = copy_of(bundles, tmp_path)
    edit_manifest(bundle, lambda info: info.update(tokens=info["tokens"][:1]))
    code, err = generate(capsys, bundle, tmp_path)
    line = one_error(err)
    assert code == 2 and "tokens" in line and "files.embeddings" in line


@pytest.mark.parametrize("damage", ["not_json", "no_model_id"])
def test_a_bundle_manifest_that_cannot_be_used(bundles, tmp_path, capsys, damage):
    bundle = copy_of(bundles, tmp_path)
    if damage == "not_json":
        (bundle / "bundle.json").write_text((bundle / "bundle.json").read_text()[:100])
    else:
        edit_manifest(bundle, lambda info: info["model"].pop("id"))
    code, err = generate(capsys, bundle, tmp_path)
    line = one_error(err)
    assert code == 2 and "bundle.json" in line and (damage == "not_json" or "model.id" in line)


@pytest.mark.parametrize("mode, rel", [
    ("full", "embeddings/asset0.safetensors"),
    ("full", "unet/diffusion_pytorch_model.safetensors"),
    ("full", "text_encoder/model.safetensors"),
    ("lora", "pytorch_lora_weights.safetensors"),
])
@pytest.mark.parametrize("damage", ["truncated", "missing", "pickle"])
def test_a_damaged_weights_file_is_named(bundles, tmp_path, capsys, mode, rel, damage):
    bundle = copy_of(bundles, tmp_path, mode)
    path, marker = bundle / rel, tmp_path / "unpickled"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-16])
    elif damage == "missing":
        path.unlink()
    else:
        write_pickle(path, marker)
    code, err = generate(capsys, bundle, tmp_path)
    line = one_error(err)
    assert code == 2 and rel in line and "hub" not in line.lower()
    assert not marker.exists() and not (tmp_path / "gen.png").exists()


def test_a_pickle_beside_a_missing_safetensors_file_is_never_loaded(bundles, tmp_path, capsys):
    bundle = copy_of(bundles, tmp_path)
    marker = tmp_path / "unpickled"
    (bundle / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_pickle(bundle / "unet" / "diffusion_pytorch_model.bin", marker)
    code, err = generate(capsys, bundle, tmp_path)
    assert code == 2 and "unet" in one_error(err) and not marker.exists()


@pytest.mark.parametrize("mode, field, where", [
    ("full", "embeddings", "absolute"),
    ("full", "embeddings", "parent"),
    ("full", "unet", "parent"),
    ("lora", "lora", "absolute"),
])
def test_bundle_paths_outside_the_bundle_are_refused(bundles, tmp_path, capsys, mode, field, where):
    """files.* point at a real file of another bundle: never read."""
    bundle = copy_of(bundles, tmp_path, mode)
    other = {"embeddings": bundles / "full" / "embeddings" / "asset0.safetensors", "unet": bundles / "full" / "unet",
             "lora": bundles / "lora" / "pytorch_lora_weights.safetensors"}[field]
    assert other.exists()
    target = str(other) if where == "absolute" else "../" * (len(bundle.parts)) + str(other).lstrip("/")

    def point(info):
        info["files"][field] = [target, *info["files"][field][1:]] if field == "embeddings" else target

    edit_manifest(bundle, point)
    code, err = generate(capsys, bundle, tmp_path)
    line = one_error(err)
    assert code == 2 and f"files.{field}" in line and "outside" in line


def test_an_undamaged_copy_still_generates(bundles, tmp_path, capsys):
    """The checks refuse only damage: a plain copy of each bundle generates."""
    for mode in ("full", "lora"):
        bundle = copy_of(bundles, tmp_path / mode, mode)
        code = main(["generate", "--bundle", str(bundle), "--prompt", "a photo of <asset0>", "--steps", "1",
                     "--out", str(tmp_path / f"{mode}.png")])
        assert code == 0 and (tmp_path / f"{mode}.png").is_file(), capsys.readouterr().err
        assert math.isfinite(json.loads(capsys.readouterr().out)["guidance_scale"])
