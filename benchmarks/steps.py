"""Per-step costs, measured in blocks of steps that take turns on one Extractor, so that a
busy shared machine slows neighbours alike: milliseconds are each kind's fastest block,
ratios the median over rounds of blocks run side by side.

Per phase (phase 2 in ``full`` mode, the authors' only mode):

- ``bare``: the training step alone: its random draws, forward, backward, gradient
  clipping, AdamW as ``run_phase`` builds it, the row hygiene; no bookkeeping;
- ``loop``: the extraction's own loop (``training.run_phase``) over the same step;
  ``loop - bare`` is what the loop adds per step (loss history, host read-backs,
  progress bar, autocast and scaler calls);
- ``authors``: the authors' loop rebuilt (``authors_flow.AuthorsFlow``) on the same
  models, with its processors and layout swapped in for its blocks;
- ``loop_fused`` (CPU only): the loop with one fused AdamW kernel, as on CUDA
  (``RuntimeConfig.optimizer: adamw-fused``). Not the CPU's default: it rounds the last
  bits differently from torch's default loop, which the golden loss curves were recorded
  with (the default, multi-tensor AdamW over flat groups, is bit for bit that loop).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.authors_flow import AuthorsFlow
from breakscene.config import ExtractConfig
from breakscene.extraction.extractor import Extractor
from breakscene.models.memory import GIB, predict_step_memory
from breakscene.method.phases import PHASES, PhaseSetup
from breakscene.method.prior import class_images
from breakscene.scenes.scene import Scene
from breakscene.method.training import autocast_context, clip_and_step, make_optimizer, release, run_phase


def bare_steps(setup: PhaseSetup, step_fn, steps: int, cfg: ExtractConfig, device: torch.device) -> float:
    """Seconds of ``steps`` bare training steps over ``setup``."""
    trainable = [p for p in setup.trainable if p.requires_grad]
    opt = make_optimizer(setup, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # off: the clipping and step run_phase calls
    try:
        start = time.perf_counter()
        for _ in range(steps):
            with autocast_context(device, cfg.mixed_precision):
                terms = step_fn()
            terms.total.backward()
            clip_and_step(opt, scaler, trainable, cfg.optimizer.max_grad_norm)
            setup.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        release(opt)


def memory_fits(ex: Extractor, cfg: ExtractConfig, resolution: int, phase: str) -> str | None:
    """None when ``phase``'s predicted peak fits this machine's free memory (CPU) or the
    GPU; else why it is not measured."""
    if ex.device.type != "cuda":  # the CPU trains in fp32: its activations are counted so
        cfg = cfg.model_copy(update={"mixed_precision": "no"})
    need = predict_step_memory(ex.models, cfg, resolution, phase, checkpointing=False).total
    if ex.device.type == "cuda":
        have = torch.cuda.mem_get_info(ex.device)[0]
    else:
        import psutil

        have = psutil.virtual_memory().available
    if need < have * 0.8:
        return None
    return f"not measured: predicted {need / GIB:.1f} GiB for the step, {have / GIB:.1f} GiB free here"


class StepBench:
    """Ours (bare and loop) and the authors' loop on one Extractor, one prepared scene."""

    def __init__(self, ex: Extractor, scene: Scene, cfg: ExtractConfig, class_dir: Path, authors: bool = True) -> None:
        self.ex, self.cfg = ex, cfg.model_copy(update={"phase2_mode": "full"})
        self.prepared = ex.prepare(scene, self.cfg)
        self.step = ex.step_fn(self.prepared)
        self.flow = None
        if authors:
            self.flow = AuthorsFlow(ex, self.prepared, self.class_files(class_dir), self.cfg)

    def class_files(self, folder: Path) -> list[Path]:
        """Up to 8 of the scene's class images (made by ``prepare``), as the script keeps them: JPEG files."""
        if not self.cfg.prior.enabled:
            return []
        files = []
        images = class_images(self.ex.models, self.cfg.prior, self.prepared.resolution, progress=False)
        for i, image in enumerate(images[:8]):
            files.append(folder / f"{i}.jpg")
            image.save(files[-1])
        return files

    def setup(self, phase: str) -> PhaseSetup:
        return self.ex.resident.phase_setup(phase, self.cfg,
                                            after_step=self.ex.assets.keep_only_new_rows(self.prepared.num_concepts))

    def seconds(self, kind: str, phase: str, steps: int) -> float:
        dev = self.ex.device
        try:
            if kind == "bare":
                return bare_steps(self.setup(phase), self.step, steps, self.cfg, dev)
            if kind in ("loop", "loop_fused"):
                return run_phase(phase, steps, self.setup(phase), self.step, cfg=self.cfg, device=dev,
                                 progress=False, optimizer="fused" if kind == "loop_fused" else "auto").seconds
            with self.flow.installed():
                return self.flow.run_phase(phase, steps, self.flow.setup(phase)).seconds
        finally:
            for p in self.ex.models.unet.parameters():  # the script's zeroed gradients stay with it
                p.grad = None
            for encoder in self.ex.models.text_encoders:  # both of SDXL's
                for p in encoder.parameters():
                    p.grad = None


def phase_row(bench: StepBench, phase: str, rounds: int, block: int) -> dict:
    """Milliseconds per step of each kind (its fastest block of ``block`` steps) and, from the
    blocks run side by side in each of ``rounds`` rounds (order rotated), the median ratios."""
    kinds = ["bare", "loop"] + (["authors"] if bench.flow else [])
    if bench.ex.device.type != "cuda":
        kinds.append("loop_fused")
    for kind in kinds:  # warm-up: first calls allocate and pick kernels
        bench.seconds(kind, phase, 2)
    ms: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            ms[kind].append(1000 * bench.seconds(kind, phase, block) / block)
    row = {f"{k}_ms": round(min(v), 2) for k, v in ms.items()}

    def paired(a: str, b: str) -> float:  # median over rounds of a / b
        return statistics.median(x / y for x, y in zip(ms[a], ms[b]))
    row["loop_overhead_ms"] = round(min(ms["loop"]) - min(ms["bare"]), 2)
    row["loop_overhead_share"] = round(1 - 1 / paired("loop", "bare"), 4)  # (loop - bare) / loop
    if bench.flow:
        row["speedup_vs_authors"] = round(paired("authors", "loop"), 3)
        if "loop_fused" in ms:
            row["speedup_vs_authors_fused"] = round(paired("authors", "loop_fused"), 3)
    return row


def per_step_costs(ex: Extractor, scene: Scene, cfg: ExtractConfig, *, rounds: int = 8, block: int = 12,
                   authors: bool = True) -> dict:
    """Per phase: bare step, the extraction's loop step, the authors' loop step; the loop's
    overhead and our speed-up over the authors, each from the fastest of ``rounds`` blocks."""
    out: dict = {"block_steps": block, "rounds": rounds,
                 "measure": "ms: fastest block; ratios: median over rounds of blocks run side by side"}
    ex.models.unet.train()
    for encoder in ex.models.text_encoders:
        encoder.train()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench = StepBench(ex, scene, cfg, Path(tmp), authors)
            for phase in PHASES:
                skip = memory_fits(ex, bench.cfg, bench.prepared.resolution, phase)
                out[phase] = {"skipped": skip} if skip else phase_row(bench, phase, rounds, block)
    finally:
        ex.models.unet.eval()
        for encoder in ex.models.text_encoders:
            encoder.eval()
        ex.reset()
    return out
