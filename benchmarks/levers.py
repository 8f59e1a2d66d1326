"""Each speed lever measured on its own: every lever on, then one at a time turned off.

One Extractor serves every variant (models loaded once); a variant changes only what its
lever names, and its cost is reported as milliseconds per step and as the ratio
(lever off / everything on) per phase, so a ratio above 1 is what the lever buys.
Gradient checkpointing, torch.compile and CUDA graphs are off by default, so they are
turned *on*. Every lever's ``gain`` is (time without the lever) / (time with it): above 1
it pays. The settings are the extraction's (``full`` phase 2, prior preservation on, the
published loss weights), and "everything on" is the extraction's own loop (``run_phase``),
so a lever's milliseconds compare with ``python -m benchmarks extract``'s per-step rows.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, replace

import torch

from benchmarks.authors_flow import ControllerStore, ExplicitAttn
from breakscene.method.attention import install_capture, loss_layers
from breakscene.config import ExtractConfig
from breakscene.extraction.extractor import Extractor
from breakscene.scenes.scene import Scene
from breakscene.extraction.tensors import draw_batch
from breakscene.method.training import READBACK_EVERY, run_phase, training_step


@dataclass(frozen=True)
class Levers:
    cached_latents: bool = True
    loss_layers_only: bool = True
    frozen_weights_phase1: bool = True
    multi_tensor_optimizer: bool = True
    flat_optimizer: bool = True
    no_host_sync: bool = True
    channels_last: bool = True
    bf16_autocast: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    cuda_graphs: bool = False


DESCRIPTIONS = {
    "cached_latents": "image latents encoded once per flip (off: VAE-encode at every step)",
    "loss_layers_only": "explicit softmax only in the latent/4 cross-attention (off: every layer)",
    "frozen_weights_phase1": "no weight gradients in phase 1 (off: UNet and text encoder require grad)",
    "multi_tensor_optimizer": "AdamW over all tensors at once: fused on CUDA, multi-tensor over flat groups on "
                              "the CPU (bit for bit the loop there) (off: torch's default, a loop over tensors on "
                              "the CPU)",
    "flat_optimizer": "CPU: multi-tensor AdamW over each group laid end to end in one tensor, bit for bit "
                      "(off: over the separate tensors, one kernel per tensor and op); CUDA: fused either way",
    "no_host_sync": f"losses read on the host every {READBACK_EVERY} steps (off: after every step)",
    "channels_last": "NHWC UNet convolutions (off: NCHW)",
    "bf16_autocast": "bf16 autocast, fp32 master weights (off: fp32); CUDA only",
    "gradient_checkpointing": "recompute activations in backward (a cost: on vs off)",
    "compile": "torch.compile of the UNet (on vs off; compile time excluded)",
    "cuda_graphs": "torch.compile of the UNet in CUDA graphs, mode reduce-overhead (on vs off); CUDA only",
}
DEFAULT_ON = Levers()
OPT_IN = ("gradient_checkpointing", "compile", "cuda_graphs")
CUDA_ONLY = ("bf16_autocast", "cuda_graphs")


class LeverBench:
    def __init__(self, model: str, scene: Scene, device: torch.device, class_images: int = 4) -> None:
        self.ex = Extractor(model, device=str(device), progress=False)
        self.device = device
        self.scene = scene
        self.cfg = ExtractConfig(prior={"num_class_images": class_images, "generation_steps": 2}, grid_seeds=0)
        self.n = scene.num_concepts
        self.prepared = self.ex.prepare(scene, self.cfg)
        self.compiled: dict[str, torch.nn.Module] = {}  # compiled UNet wrappers by mode, made once

    def _apply(self, lv: Levers) -> tuple[ExtractConfig, object]:
        """Set the model-side levers; returns the config and the attention store to use."""
        ex, m = self.ex, self.ex.models
        m.unet.to(memory_format=torch.channels_last if lv.channels_last else torch.contiguous_format)
        store = ex.store
        if lv.loss_layers_only:
            install_capture(m.unet, ex.store, self.cfg.attn_downsample)
        else:
            store = ControllerStore(loss_layers(m.unet, self.cfg.attn_downsample))
            m.unet.set_attn_processor({name: ExplicitAttn(store, name) for name in m.unet.attn_processors})
        mixed = "bf16" if lv.bf16_autocast else "no"
        return self.cfg.model_copy(update={"mixed_precision": mixed}), store

    def _unet(self, lv: Levers):
        """The UNet the step calls: compiled wrappers share its weights and leave it eager."""
        mode = "reduce-overhead" if lv.cuda_graphs else "default" if lv.compile else None
        if mode is None:
            return self.ex.models.unet
        if mode not in self.compiled:
            self.compiled[mode] = torch.compile(self.ex.models.unet, mode=mode)
        return self.compiled[mode]

    def _step_fn(self, lv: Levers, cfg: ExtractConfig, store):
        ex, m, data = self.ex, self.ex.models, self.prepared.tensors
        rng, gen = random.Random(0), torch.Generator(device=self.device).manual_seed(0)
        pixels = torch.stack([self.prepared.inputs.pixels, self.prepared.inputs.pixels.flip(-1)])
        timesteps = m.scheduler.config.num_train_timesteps
        unet = self._unet(lv)

        def step():
            if not lv.cached_latents:  # as the script does: both flips encoded again
                mean, std = ex.resident.encode_latents(pixels)
                data.latent_mean, data.latent_std = [mean[0:1], mean[1:2]], [std[0:1], std[1:2]]
            if lv.cuda_graphs:  # each step is a new run of the captured graphs
                torch.compiler.cudagraph_mark_step_begin()
            batch = draw_batch(data, self.prepared.class_tensors, cfg, rng=rng, gen=gen,
                               encode_subset=ex.assets.encode_subset, num_train_timesteps=timesteps)
            return training_step(unet, m.text_encoder, m.scheduler, store, batch, cfg)
        return step

    def time_phase(self, lv: Levers, phase: str, steps: int, warmup: int = 2) -> float:
        """Milliseconds per step of ``phase`` under ``lv`` (phase 2 in ``full`` mode)."""
        ex, m = self.ex, self.ex.models
        cfg, store = self._apply(lv)
        step = self._step_fn(lv, cfg, store)
        m.unet.train()
        m.text_encoder.train()
        try:
            setup = ex.resident.phase_setup(phase, cfg, after_step=ex.assets.keep_only_new_rows(self.n))
            if phase == "phase1" and not lv.frozen_weights_phase1:
                m.unet.requires_grad_(True)
                m.text_encoder.requires_grad_(True)
            ex.resident.set_checkpointing(lv.gradient_checkpointing)
            options = {"cfg": cfg, "device": self.device, "progress": False,
                       "optimizer": optimizer_kind(lv),
                       "readback_every": READBACK_EVERY if lv.no_host_sync else 1}
            run_phase("warm-up", warmup, setup, step, **options)
            result = run_phase(phase, steps, setup, step, **options)
            return 1000 * result.seconds / steps
        finally:
            for p in list(m.unet.parameters()) + list(m.text_encoder.parameters()):
                p.grad = None  # weight gradients of the no-freeze variant would linger
            self.prepared = ex.prepare(self.scene, self.cfg)  # pristine weights, latents not re-encoded


PHASES = {name: ("phase1", "phase2") for name in DESCRIPTIONS} | {"frozen_weights_phase1": ("phase1",),
                                                                     "flat_optimizer": ("phase2",)}


def optimizer_kind(lv: Levers) -> str:
    """``make_optimizer``'s kind for ``lv``: "auto" is flat groups on the CPU."""
    if not lv.multi_tensor_optimizer:
        return "torch"
    return "auto" if lv.flat_optimizer else "foreach"


def run_levers(model: str, scene: Scene, device: torch.device, steps: int, include_compile: bool,
               rounds: int = 3) -> dict:
    """Paired measurements: in each round the default and the flipped variant run back to
    back, so drift on a shared machine cancels; medians over rounds are reported."""
    bench = LeverBench(model, scene, device)
    cuda = device.type == "cuda"
    # compile runs minutes on a CPU: asked for there; CUDA graphs and autocast are CUDA levers
    names = [name for name in DESCRIPTIONS if (name != "compile" or include_compile or cuda)
             and (name not in CUDA_ONLY or cuda)]
    base = replace(DEFAULT_ON, bf16_autocast=cuda)
    out: dict = {"steps": steps, "rounds": rounds, "levers": {}}
    for name in names:
        flipped = replace(base, **{name: not getattr(base, name)})
        row: dict = {"what": DESCRIPTIONS[name]}
        try:
            row.update(lever_row(bench, name, base, flipped, steps, rounds))
        except Exception as exc:  # noqa: BLE001 (a lever this torch or device cannot run is a row, not a crash)
            row["error"] = f"{type(exc).__name__}: {exc}"
        out["levers"][name] = row
    for name in CUDA_ONLY:
        if not cuda:
            out[name] = "CUDA only: not measured on this machine"
    return out


def lever_row(bench: LeverBench, name: str, base: Levers, flipped: Levers, steps: int, rounds: int) -> dict:
    """Paired rounds of ``base`` and ``flipped`` per phase: milliseconds with and without the lever, and its gain."""
    row: dict = {}
    for phase in PHASES[name]:
        default_ms, flipped_ms = [], []
        for _ in range(rounds):
            default_ms.append(bench.time_phase(base, phase, steps))
            flipped_ms.append(bench.time_phase(flipped, phase, steps))
        ratios = sorted(f / d for f, d in zip(flipped_ms, default_ms))
        ratio = ratios[len(ratios) // 2]
        with_lever, without = (flipped_ms, default_ms) if name in OPT_IN else (default_ms, flipped_ms)
        row[f"{phase}_ms_with"] = round(statistics.median(with_lever), 2)
        row[f"{phase}_ms_without"] = round(statistics.median(without), 2)
        # time without the lever / time with it: above 1 the lever pays
        row[f"{phase}_gain"] = round(1 / ratio if name in OPT_IN else ratio, 3)
    return row
