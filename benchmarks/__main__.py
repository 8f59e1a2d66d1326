"""python -m benchmarks {extract,levers,memory,sam,pipeline,quality,scale,all} [options]

Prints one JSON object and a table. Every speed-up is a ratio against a baseline measured
in the same run on the same machine. GPU-only rows say so when no GPU is present.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import EXAMPLES, example_scene, machine


def bench_extract(args) -> dict:
    from breakscene.config import ExtractConfig
    from breakscene.extraction.extractor import Extractor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scene, scene_name = example_scene()
    prior = {"num_class_images": args.class_images, "generation_steps": args.class_steps}
    cfg = ExtractConfig(phase1_steps=args.steps, phase2_steps=args.steps, prior=prior,
                        grid_seeds=getattr(args, "grid_seeds", 2), resolution=getattr(args, "resolution", None))
    ex = Extractor(args.model, device=str(device), progress=False)  # "models already loaded"
    rows = {"machine": machine(), "model": args.model, "family": ex.models.family, "scene": scene_name,
            "steps": [args.steps, args.steps], "prior": prior,
            "resolution": cfg.resolution or ex.models.native_resolution}
    if ex.models.family != "sd":  # the authors' script and its flow are Stable Diffusion 1.x/2.x only
        args.no_baseline = True
        rows["authors"] = "the authors' flow runs Stable Diffusion 1.x/2.x only: no baseline"
    if not getattr(args, "per_step_only", False):
        rows.update(scene_costs(ex, scene, cfg, args, device))
    if getattr(args, "per_step", True):
        rows["per_step"] = step_costs(ex, scene, cfg, args, rows)
    for phase in ("phase1", "phase2"):  # the paired per-step ratio beside the whole runs' one
        ratio = rows.get("per_step", {}).get(phase, {}).get("speedup_vs_authors")
        if ratio is not None:
            rows.setdefault("speedup_vs_authors", {})[f"{phase}_per_step"] = ratio
    if getattr(args, "realistic", False):
        rows["realistic"] = realistic_costs(args, scene, device)
    rows["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # a busy machine skews whole runs
    return rows


def scene_costs(ex, scene, cfg, args, device) -> dict:
    """Whole scenes: ours per mode, the sample grid two ways, the step-1 parity, the authors' flow."""
    from benchmarks.authors_flow import run_authors_flow, step1_parity

    skipped = {mode: too_big(ex, cfg.model_copy(update={"phase2_mode": mode}), device) for mode in args.modes}
    rows: dict = {"ours": {mode: {"skipped": why} for mode, why in skipped.items() if why}}
    modes = [mode for mode, why in skipped.items() if not why]
    if modes:  # warm-up + class cache, in a mode that fits
        ex.extract(scene, cfg.model_copy(update={"phase1_steps": 2, "phase2_steps": 2, "phase2_mode": modes[0]}))
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = ex.extract(scene, cfg.model_copy(update={"phase2_mode": mode}), out=f"{tmp}/bundle")
            total = time.perf_counter() - start
        row = {"total_s": round(total, 3), **{k: result.timings.get(k) for k in (
            "prepare", "class_images", "phase1", "phase2", "diagnostic", "grid", "bundle_write")}}
        # the authors' flow writes no sample grid: the speed-up compares the rest
        row["total_without_grid_s"] = round(total - (row["grid"] or 0.0), 3)
        row["grid_share"] = round((row["grid"] or 0.0) / total, 3)
        if device.type == "cuda":
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows["ours"][mode] = row
    if cfg.grid_seeds and modes:
        rows["grid"] = grid_costs(ex, scene.num_concepts, cfg.grid_seeds, cfg)
    if ex.models.family == "sd":  # the authors' processors are SD's
        rows["step1_loss"] = step1_parity(ex, scene, cfg)
    if not args.no_baseline:
        with tempfile.TemporaryDirectory() as tmp:
            from breakscene.models.loading import load_models

            load_models(args.model).save_pretrained(tmp)  # the script reads weights from disk per scene
            authors = run_authors_flow(tmp, scene, cfg.model_copy(update={"phase2_mode": "full"}), device)
        rows["authors"] = {k: round(v, 3) for k, v in authors.items()}
        ours = rows["ours"].get("full") or next(iter(rows["ours"].values()))
        # whole runs, minutes apart: on a shared machine the per-step rows are the fairer ratio
        rows["speedup_vs_authors"] = {
            "phase1_whole_run": round(authors["phase1"] / ours["phase1"], 2),
            "phase2_whole_run": round(authors["phase2"] / ours["phase2"], 2),
            "scene_total": round(authors["total"] / ours["total_without_grid_s"], 2),
        }
    return rows


def too_big(ex, cfg, device) -> str | None:
    """Why a scene of ``cfg`` is not run here (its predicted peak exceeds the GPU's usable
    memory, or on the CPU most of the free memory beside the loaded weights), or None."""
    from breakscene.models.memory import GIB, predicted_peak

    need, phase = predicted_peak(ex.models, cfg, cfg.resolution or ex.models.native_resolution, device, ex.runtime)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory * ex.runtime.memory_headroom
    else:
        import psutil

        modules = (ex.models.unet, ex.models.vae, *ex.models.text_encoders)
        # the weights are loaded already; a fifth of the free memory stays for other work
        have = 0.8 * psutil.virtual_memory().available + sum(p.numel() * p.element_size() for m in modules
                                                             for p in m.parameters())
    if need < have:
        return None
    return f"not run: {phase} is predicted to need {need / GIB:.1f} GiB, {have / GIB:.1f} GiB here"


def step_costs(ex, scene, cfg, args, rows: dict) -> dict:
    """Per-step rows (benchmarks/steps.py); beside them, each whole run's seconds per step."""
    from benchmarks.steps import per_step_costs

    out = per_step_costs(ex, scene, cfg, rounds=args.rounds, block=args.block, authors=not args.no_baseline)
    for phase in ("phase1", "phase2"):
        if "loop_ms" not in out[phase]:
            continue
        if "full" in rows.get("ours", {}) and args.steps:  # the whole 400-step runs, for reference
            out[phase]["extract_run_ms"] = round(1000 * rows["ours"]["full"][phase] / args.steps, 2)
        if "authors" in rows and args.steps:
            out[phase]["authors_run_ms"] = round(1000 * rows["authors"][phase] / args.steps, 2)
    return out


def realistic_costs(args, scene, device) -> dict:
    """The per-step rows at Stable Diffusion 2.1's shapes (random weights) and a realistic resolution."""
    from benchmarks.steps import per_step_costs
    from breakscene.config import ExtractConfig
    from breakscene.extraction.extractor import Extractor

    cfg = ExtractConfig(resolution=args.realistic_resolution, grid_seeds=0,
                        prior={"num_class_images": 2, "generation_steps": 2})
    ex = Extractor("sd21-base-random", device=str(device), progress=False)
    try:
        out = per_step_costs(ex, scene, cfg, rounds=args.realistic_rounds, block=args.realistic_block,
                             authors=not args.no_baseline)
    finally:
        del ex
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": "sd21-base-random", "resolution": args.realistic_resolution, **out}


def grid_costs(ex, n_concepts: int, grid_seeds: int, cfg) -> dict:
    """The bundle's sample grid two ways on the resident models: one image per pipeline call
    with 25 DDIM steps (before) and one batched call with the configured sampler (now)."""
    from breakscene.extraction.generate import fused_attention, generate_images, grid_prompts, sample_grid

    tokens, seeds = ex.tokens[:n_concepts], list(range(grid_seeds))
    res = cfg.resolution or ex.models.native_resolution
    with fused_attention(ex.models.unet):
        start = time.perf_counter()
        pipe = ex.pipeline("ddim")
        for prompt in grid_prompts(tokens):
            for seed in seeds:
                generate_images(pipe, prompt, [seed], 25, cfg.guidance_scale, res)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        sample_grid(ex.pipeline(cfg.grid_scheduler), tokens, seeds, cfg.grid_inference_steps, cfg.guidance_scale, res)
        batched = time.perf_counter() - start
    return {"images": len(grid_prompts(tokens)) * grid_seeds, "sequential_ddim_25_s": round(sequential, 3),
            f"batched_{cfg.grid_scheduler}_{cfg.grid_inference_steps}_s": round(batched, 3),
            "speedup": round(sequential / batched, 2)}


def bench_sam(args) -> dict:
    """Automatic mask generation, one image per encoder forward against ``--image-batch``."""
    import numpy as np
    import skimage.data

    from batchjob.settings import SegmenterConfig
    from batchjob.segmenters import SamSegmenter, TinySamSegmenter

    images = [np.asarray(f()) for f in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea,
                                        skimage.data.rocket)] * args.repeats
    out = {"machine": machine(), "points_per_side": args.points, "images": len(images)}
    variants = [("tiny-sam", TinySamSegmenter)]
    if torch.cuda.is_available():
        class RandomVitH(SamSegmenter):  # real ViT-H shapes, random weights: speed only
            def build_model(self):
                from segment_anything import sam_model_registry

                return sam_model_registry["vit_h"](checkpoint=None)
        variants.append(("sam-vit_h-random", RandomVitH))
    else:
        out["sam-vit_h-random"] = "needs a GPU: not measured on this machine"
    for name, cls in variants:
        row = {}
        for batch in sorted({1, args.image_batch}):
            seg = cls(SegmenterConfig(kind="tiny-sam", points_per_side=args.points, pred_iou_thresh=0.0,
                                      stability_score_thresh=0.0, image_batch=batch,
                                      points_per_batch=args.points_per_batch))
            seg.segment_many(images[:1])  # warm-up
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            seg.segment_many(images)
            seconds = time.perf_counter() - start
            row[f"image_batch_{batch}"] = {"seconds": round(seconds, 3),
                                           "images_per_s": round(len(images) / seconds, 3)}
        if args.image_batch != 1:
            row["batched_speedup"] = round(row["image_batch_1"]["seconds"]
                                           / row[f"image_batch_{args.image_batch}"]["seconds"], 3)
        out[name] = row
    return out


def bench_pipeline(args) -> dict:
    import yaml

    from commands.jobs import load_job
    from pipeline.records import read_records
    from pipeline.run import run_job

    with tempfile.TemporaryDirectory() as tmp:
        job_path = Path(tmp) / "job.yaml"
        job_path.write_text(yaml.safe_dump({
            "name": "bench", "output": f"{tmp}/out", "model": {"id": "tiny"}, "segmenter": {"kind": "classical"},
            "demo_inputs": {"sample_photos": [], "generated_scenes": args.images, "size": 128},
            "extract": {"phase1_steps": args.steps, "phase2_steps": args.steps, "phase2_mode": "lora",
                        "prior": {"num_class_images": 2, "generation_steps": 2}, "grid_seeds": 0},
            "resources": {"num_cpus": args.cpus, "num_gpus": args.actors, "extract_actors": args.actors,
                          "extract_gpus": 1},
        }))
        import ray

        started_ray = not ray.is_initialized()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
                summary = run_job(load_job(job_path))
        finally:
            if started_ray:  # leave no embedded cluster attached to the caller's process
                ray.shutdown()
        windows = [(r["image"]["extract_started_at"], r["image"]["extract_ended_at"])
                   for r in read_records(f"{tmp}/out").values() if r["image"]["status"] == "ok"]
    busy = sum(e - s for s, e in windows)
    span = max(e for _, e in windows) - min(s for s, _ in windows)
    return {"machine": machine(), "images": args.images, "extract_actors": args.actors,
            "logical_gpus": args.actors, "counts": summary["counts"], "wall_s": summary["seconds"],
            "images_per_hour": summary["images_per_hour"],
            "extract_busy_fraction": round(busy / (span * args.actors), 3) if span > 0 else None}


def bench_levers(args) -> dict:
    from benchmarks.levers import run_levers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scene, scene_name = example_scene()
    return {"machine": machine(), "model": args.model, "scene": scene_name,
            **run_levers(args.model, scene, device, args.steps, args.compile, args.rounds)}


def bench_quality(args) -> dict:
    """Mask quality score vs true IoU, leave-one-scene-out on the example scenes."""
    from benchmarks.quality import run_quality
    from breakscene.scenes.noise import FAMILIES

    families = args.families or list(FAMILIES)
    problems = [f"unknown noise family {f!r} (known: {', '.join(FAMILIES)})" for f in families if f not in FAMILIES]
    problems += [f"severity {s} is outside [0, 1]" for s in args.severities if not 0 <= s <= 1]
    if not Path(args.scenes).is_dir():
        problems.append(f"--scenes {args.scenes} is not a folder")
    if problems or args.seeds < 1:
        print(f"error: {problems[0] if problems else '--seeds must be at least 1'}", file=sys.stderr)
        sys.exit(2)
    try:
        return {"machine": machine(), **run_quality(root=Path(args.scenes), families=families,
                                                     severities=args.severities, seeds=list(range(args.seeds)),
                                                     fit=args.fit)}
    except ValueError as exc:  # too few scenes: found before any noise is made
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


CARDS_GIB = {"24gb": 24, "16gb": 16}  # the cards the memory rows are judged against
FITS_RULE = ("fits_<card>: the predicted peak of both phases is at most runtime.memory_headroom (0.9) of the "
             "card's memory, the rule of the memory check and of gradient_checkpointing auto")


def bench_memory(args) -> dict:
    """Predicted peaks (meta-device count) of every lever combination per model, whether a
    run fits 24 and 16 GB cards, and the measured peak where CUDA is."""
    import importlib.util

    out: dict = {"machine": machine(), "fits_rule": FITS_RULE,
                 "adamw_8bit": "bitsandbytes installed" if importlib.util.find_spec("bitsandbytes") else
                 "bitsandbytes not installed here: its rows are predicted from its state layout (1 byte per "
                 "moment, an fp32 scale per 256 values, fp32 moments under 4096 values)"}
    cuda = torch.cuda.is_available()
    for model in args.model:
        out[model] = memory_rows(model, args.resolution)
        if cuda:
            out[model]["measured_peak_gib"] = measured_peaks(model, out[model])
    if not cuda:
        out["measured"] = "needs a GPU: the peak is measured by `extract` on a CUDA machine"
    return out


def memory_models(model: str):
    from breakscene.models.loading import load_any
    from breakscene.models.memory import meta_models

    return meta_models(model) or load_any(model)  # shapes are all a prediction needs: no weights for presets


def memory_rows(model: str, resolution: int | None) -> dict:
    """One row per phase-2 mode, checkpointing and optimizer: phase 2's parts, both phases'
    peak and the cards it fits; the lever sets that fit each card."""
    from breakscene.config import ExtractConfig, RuntimeConfig
    from breakscene.models.memory import GIB, predict_step_memory

    models = memory_models(model)
    res = resolution or models.native_resolution
    levers = [(ckpt, opt) for ckpt in (False, True) for opt in ("adamw", "adamw-8bit")]
    phase1 = {(ckpt, opt): predict_step_memory(models, ExtractConfig(), res, "phase1", ckpt, optimizer=opt)
              for ckpt, opt in levers}
    headroom = RuntimeConfig().memory_headroom
    vae = sum(p.numel() * p.element_size() for p in models.vae.parameters())
    out: dict = {"resolution": res, "predicted_gib": {}, "fits_with": {card: [] for card in CARDS_GIB}}
    for mode in ("full", "lora"):
        for ckpt, opt in levers:
            est = predict_step_memory(models, ExtractConfig(phase2_mode=mode), res, "phase2", ckpt, optimizer=opt)
            key = f"{mode}.checkpointing_{'on' if ckpt else 'off'}.{opt}"
            peak = max(est.total, phase1[ckpt, opt].total)
            row = {**est.gib(), "phase1_total": round(phase1[ckpt, opt].total / GIB, 3), "peak": round(peak / GIB, 3)}
            if mode == "lora":  # frozen UNet and encoder weights kept in bf16: no fp32 copy, no autocast copy
                row["what_if_frozen_weights_bf16"] = round(max(
                    e.total - (e.weights - e.gradients - vae) for e in (est, phase1[ckpt, opt])) / GIB, 3)
            for card, gib in CARDS_GIB.items():
                row[f"fits_{card}"] = peak <= headroom * gib * GIB
                if row[f"fits_{card}"]:
                    out["fits_with"][card].append(key)
            out["predicted_gib"][key] = row
    return out


def measured_peaks(model: str, rows: dict) -> dict:
    """The measured peak of a short extraction for each mode and checkpointing (fp32 AdamW)
    whose prediction fits this GPU; the others are said not to fit."""
    from breakscene.config import ExtractConfig, RuntimeConfig
    from breakscene.extraction.extractor import Extractor
    from breakscene.models.memory import GIB

    scene, _ = example_scene()
    total = torch.cuda.get_device_properties(0).total_memory
    out: dict = {"device_total_gib": round(total / GIB, 2)}
    for ckpt in ("off", "on"):
        wanted = [m for m in ("full", "lora") if rows["predicted_gib"][f"{m}.checkpointing_{ckpt}.adamw"]["peak"]
                  * GIB < total]
        out.update({f"{m}.checkpointing_{ckpt}": "predicted not to fit this GPU: not run"
                    for m in ("full", "lora") if m not in wanted})
        if not wanted:
            continue
        ex = Extractor(model, progress=False, runtime=RuntimeConfig(gradient_checkpointing=ckpt))
        for mode in wanted:
            cfg = ExtractConfig(phase1_steps=3, phase2_steps=3, phase2_mode=mode, grid_seeds=0,
                                resolution=rows["resolution"], prior={"num_class_images": 2, "generation_steps": 2})
            out[f"{mode}.checkpointing_{ckpt}"] = ex.extract(scene, cfg).runtime["peak_gpu_gib"]
        del ex
        torch.cuda.empty_cache()
    return out


def table(name: str, result: dict) -> str:
    lines = [f"== {name}"]

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            lines.append(f"  {prefix:<40} {value}")
    walk("", result)
    return "\n".join(lines)


def add_extract_parser(sub) -> None:
    ex = sub.add_parser("extract", help="one scene: ours vs the authors' flow")
    ex.add_argument("--model", default="tiny")
    ex.add_argument("--steps", type=int, default=400, help="steps per phase")
    ex.add_argument("--class-images", type=int, default=100)
    ex.add_argument("--class-steps", type=int, default=50)
    ex.add_argument("--modes", nargs="+", default=["full", "lora"])
    ex.add_argument("--grid-seeds", type=int, default=2, help="sample grid columns per bundle (0: no grid)")
    ex.add_argument("--no-baseline", action="store_true")
    ex.add_argument("--resolution", type=int, help="pixels a side (default: the model's native size)")
    ex.add_argument("--rounds", type=int, default=8, help="per-step rows: rounds of one block of each kind")
    ex.add_argument("--block", type=int, default=12, help="per-step rows: steps per block")
    ex.add_argument("--per-step-only", action="store_true", help="only the per-step rows, no whole scenes")
    ex.add_argument("--per-step", action=argparse.BooleanOptionalAction, default=True,
                    help="the per-step rows (blocks of steps of each kind, phase 2 in full mode)")
    ex.add_argument("--realistic", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="also the per-step rows at sd21-base-random shapes (default: on with a GPU)")
    ex.add_argument("--realistic-resolution", type=int, default=256)
    ex.add_argument("--realistic-rounds", type=int, default=2)
    ex.add_argument("--realistic-block", type=int, default=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="bench", required=True)
    add_extract_parser(sub)
    sam = sub.add_parser("sam", help="automatic mask generation throughput")
    sam.add_argument("--points", type=int, default=32)
    sam.add_argument("--repeats", type=int, default=1, help="times the four photos are segmented")
    sam.add_argument("--image-batch", type=int, default=4, help="images per encoder forward (vs 1)")
    sam.add_argument("--points-per-batch", type=int, default=64)
    pl = sub.add_parser("pipeline", help="local Ray, logical GPUs, tiny models: actor busy fraction")
    pl.add_argument("--images", type=int, default=6)
    pl.add_argument("--steps", type=int, default=20)
    pl.add_argument("--actors", type=int, default=1)
    pl.add_argument("--cpus", type=int, default=2)
    lv = sub.add_parser("levers", help="each speed lever alone: everything on, then one lever flipped")
    lv.add_argument("--model", default="tiny")
    lv.add_argument("--steps", type=int, default=10, help="timed steps per phase, variant and round")
    lv.add_argument("--rounds", type=int, default=3, help="paired rounds; medians are reported")
    lv.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compile time on a CPU)")
    mem = sub.add_parser("memory", help="predicted (and on CUDA measured) peak memory per phase and lever")
    mem.add_argument("--model", nargs="+", default=["sd21-base-random", "sdxl-base-random"])
    mem.add_argument("--resolution", type=int, help="pixels a side (default: each model's native size)")
    qu = sub.add_parser("quality", help="mask quality score vs true IoU, leave-one-scene-out (CPU)")
    qu.add_argument("--scenes", default=str(EXAMPLES), help="folder of <scene>/img.jpg + mask<i>.png")
    qu.add_argument("--families", nargs="+", default=None, help="noise families (default: all)")
    qu.add_argument("--severities", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    qu.add_argument("--seeds", type=int, default=3)
    qu.add_argument("--fit", action="store_true", help="also refit and write breakscene/quality/data/quality_model_v1.json")
    from benchmarks.scale import add_parser as add_scale, bench_scale

    add_scale(sub)
    sub.add_parser("all", help="every benchmark with its defaults")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    runs = {"extract": bench_extract, "levers": bench_levers, "memory": bench_memory, "sam": bench_sam,
            "pipeline": bench_pipeline, "quality": bench_quality, "scale": bench_scale}
    names = list(runs) if args.bench == "all" else [args.bench]
    results = {}
    for name in names:
        sub_args = args if args.bench != "all" else parser.parse_args([name])
        results[name] = runs[name](sub_args)
        print(table(name, results[name]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
