"""The benchmark scripts stay runnable: tiny model, a few steps, seconds."""
import argparse

import pytest
import torch

from benchmarks.__main__ import bench_extract, bench_sam, table


def test_extract_benchmark_runs_with_baseline_and_parity():
    args = argparse.Namespace(model="tiny", steps=2, class_images=2, class_steps=1, modes=["full", "lora"],
                              no_baseline=False, grid_seeds=1, rounds=1, block=2, realistic=False)
    result = bench_extract(args)
    assert set(result["ours"]) == {"full", "lora"}
    full = result["ours"]["full"]
    assert full["grid"] > 0 and full["grid_share"] == pytest.approx(full["grid"] / full["total_s"], abs=2e-3)
    assert full["total_without_grid_s"] == pytest.approx(full["total_s"] - full["grid"], abs=2e-3)
    assert result["grid"]["images"] == 4 and result["grid"]["sequential_ddim_25_s"] > 0
    assert result["ours"]["full"]["phase1"] > 0 and result["authors"]["phase2"] > 0
    assert set(result["speedup_vs_authors"]) == {"phase1_whole_run", "phase2_whole_run", "scene_total",
                                                 "phase1_per_step", "phase2_per_step"}
    # same batch, our attention processors vs the authors' controller in every layer
    assert result["step1_loss"]["abs_diff"] < 1e-4 * abs(result["step1_loss"]["ours"])
    assert "speedup_vs_authors.phase1_per_step" in table("extract", result)
    for phase in ("phase1", "phase2"):  # bare step, the extraction's loop and the authors' loop, paired
        row = result["per_step"][phase]
        assert row["bare_ms"] > 0 and row["loop_ms"] > 0 and row["authors_ms"] > 0
        assert row["loop_overhead_ms"] == pytest.approx(row["loop_ms"] - row["bare_ms"], abs=0.02)
        assert row["speedup_vs_authors"] == pytest.approx(row["authors_ms"] / row["loop_ms"], rel=0.01)
        assert row["extract_run_ms"] > 0 and row["authors_run_ms"] > 0


def test_authors_flow_does_the_scripts_per_step_work(tiny_extractor, examples, tmp_path, monkeypatch):
    """Per step: a class image read from its file, both prompts tokenised, every layer's
    probabilities copied by the controller; its losses match ours on the same weights."""
    from benchmarks.authors_flow import AuthorsFlow, Image, generate_class_files
    from breakscene.config import ExtractConfig
    from breakscene.scenes.scene import load_scene_dir

    cfg = ExtractConfig(prior={"num_class_images": 2, "generation_steps": 1}, grid_seeds=0)
    prepared = tiny_extractor.prepare(load_scene_dir(examples / "bear"), cfg)
    files = generate_class_files(tiny_extractor, cfg, 64, tmp_path)
    assert [f.suffix for f in files] == [".jpg", ".jpg"]
    opened, tokenized = [], []
    monkeypatch.setattr(Image, "open", lambda path, open_=Image.open: opened.append(path) or open_(path))
    flow = AuthorsFlow(tiny_extractor, prepared, files, cfg)
    tokenize = flow.tokenize
    monkeypatch.setattr(flow, "tokenize", lambda text: tokenized.append(text) or tokenize(text))
    tiny_extractor.models.unet.train()
    try:
        with flow.installed():
            result = flow.run_phase("authors phase 1", 3, flow.setup("phase1"))
            assert len(flow.store.maps) == 0  # emptied after each backward, as the script does
    finally:
        tiny_extractor.reset()
        tiny_extractor.models.unet.eval()
    assert len(opened) == 3 and set(opened) <= set(files)
    assert len(tokenized) == 6 and tokenized.count(cfg.prior.class_prompt) == 3
    assert result.losses.shape == (3, 4) and torch.isfinite(result.losses).all()


def test_sam_benchmark_runs():
    result = bench_sam(argparse.Namespace(points=2, repeats=1, image_batch=2, points_per_batch=64))
    assert result["images"] == 4 and set(result["tiny-sam"]) == {"image_batch_1", "image_batch_2", "batched_speedup"}
    assert result["tiny-sam"]["image_batch_2"]["images_per_s"] > 0


@pytest.mark.e2e
def test_pipeline_benchmark_reports_busy_fraction():
    from benchmarks.__main__ import bench_pipeline

    import ray

    result = bench_pipeline(argparse.Namespace(images=2, steps=1, actors=1, cpus=2))
    assert result["counts"]["ok"] == 2 and 0 < result["extract_busy_fraction"] <= 1
    assert not ray.is_initialized()


def test_levers_benchmark_flips_each_lever_alone():
    from benchmarks.__main__ import bench_levers

    result = bench_levers(argparse.Namespace(model="tiny", steps=1, rounds=1, compile=False))
    assert set(result["levers"]) == {"cached_latents", "loss_layers_only", "frozen_weights_phase1",
                                     "multi_tensor_optimizer", "flat_optimizer", "no_host_sync", "channels_last",
                                     "gradient_checkpointing"}
    assert "CUDA only" in result["bf16_autocast"] and "CUDA only" in result["cuda_graphs"]
    assert set(result["levers"]["frozen_weights_phase1"]) == {"what", "phase1_ms_with", "phase1_ms_without",
                                                              "phase1_gain"}
    # phase 1 trains one tensor: flat groups are a phase-2 lever
    assert set(result["levers"]["flat_optimizer"]) == {"what", "phase2_ms_with", "phase2_ms_without", "phase2_gain"}
    for row in result["levers"].values():
        phase = "phase2" if "phase2_gain" in row and "phase1_gain" not in row else "phase1"
        assert row[f"{phase}_ms_with"] > 0 and row[f"{phase}_gain"] > 0


def test_memory_benchmark_predicts_every_phase_and_mode():
    from benchmarks.__main__ import bench_memory

    result = bench_memory(argparse.Namespace(model=["tiny", "sdxl-tiny"], resolution=None))
    for model in ("tiny", "sdxl-tiny"):
        rows = result[model]["predicted_gib"]
        assert len(rows) == 8  # full / lora x checkpointing x AdamW / 8-bit AdamW
        full = rows["full.checkpointing_off.adamw"]
        assert full["optimizer"] == pytest.approx(2 * full["gradients"], abs=2e-3)  # two fp32 moments
        assert rows["full.checkpointing_off.adamw-8bit"]["optimizer"] < full["optimizer"]
        assert rows["full.checkpointing_on.adamw"]["peak"] <= full["peak"]
        assert result[model]["fits_with"]["24gb"] == list(rows)  # a tiny model fits every card
    assert "needs a GPU" in result["measured"]


@pytest.mark.e2e
def test_scale_benchmark_runs_tiny_on_disk_and_on_an_s3_server():
    """History sizes, store kinds and row counts are flags: here tiny."""
    from benchmarks.scale import bench_scale

    import ray

    args = argparse.Namespace(histories=[20, 60], new=2, throughput_images=3, overhead_rows=None,
                              stores=["local", "s3"], size=64, s3_records=20, cpus=2, bookkeeping_reps=2)
    result = bench_scale(args)
    for store in ("local", "s3"):
        for h in ("20", "60"):
            row = result[store][h]
            assert row["bookkeeping_s"] > 0 and row["increment_driver_s"]["commit"] > 0
            assert row["increment_counts"]["resumed"] == int(h)  # the history, left out before any work
            assert row["increment_counts"]["scored"] + row["increment_counts"]["failed"] == 2
        assert result[store]["bookkeeping_ratio"] > 0
    assert result["score_only_throughput"]["images"] == 3 and result["score_only_throughput"]["images_per_s"] > 0
    assert len(result["local"]["20"]["bookkeeping_runs_s"]) == 2
    # the driver's own work on the stream is measured, and bounds any stage's wait on it
    tp = result["score_only_throughput"]
    assert 0 <= tp["driver_busy_s"] < tp["stream_s"] and isinstance(tp["stages_waited_on_driver"], bool)
    assert tp["stage_ms_per_image"]["score"] > 0
    assert not ray.is_initialized()
