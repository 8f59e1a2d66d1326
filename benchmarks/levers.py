"""Each speed lever measured on its own: every lever on, then one at a time turned off.

One Extractor serves every variant (models loaded once); a variant changes only what its
lever names, and its cost is reported as milliseconds per step and as the ratio
(lever off / everything on) per phase, so a ratio above 1 is what the lever buys.
Gradient checkpointing and torch.compile are off by default, so they are turned *on*.
Every lever's ``gain`` is (time without the lever) / (time with it): above 1 it pays.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, replace

import torch

from benchmarks.authors_flow import StoreEverything, install_explicit_everywhere
from breakscene.attention import install_capture, loss_layers
from breakscene.config import ExtractConfig
from breakscene.extractor import Extractor
from breakscene.scene import Scene
from breakscene.tensors import draw_batch
from breakscene.training import run_phase, training_step


@dataclass(frozen=True)
class Levers:
    cached_latents: bool = True
    loss_layers_only: bool = True
    frozen_weights_phase1: bool = True
    fused_optimizer: bool = True
    no_host_sync: bool = True
    channels_last: bool = True
    bf16_autocast: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False


DESCRIPTIONS = {
    "cached_latents": "image latents encoded once per flip (off: VAE-encode at every step)",
    "loss_layers_only": "explicit softmax only in the latent/4 cross-attention (off: every layer)",
    "frozen_weights_phase1": "no weight gradients in phase 1 (off: UNet and text encoder require grad)",
    "fused_optimizer": "fused AdamW (off: foreach AdamW)",
    "no_host_sync": "loss stays on the device (off: read on the host every step)",
    "channels_last": "NHWC UNet convolutions (off: NCHW)",
    "bf16_autocast": "bf16 autocast, fp32 master weights (off: fp32); CUDA only",
    "gradient_checkpointing": "recompute activations in backward (a cost: on vs off)",
    "compile": "torch.compile of the UNet (on vs off; compile time excluded)",
}
DEFAULT_ON = Levers()
OPT_IN = ("gradient_checkpointing", "compile")


class LeverBench:
    def __init__(self, model: str, scene: Scene, device: torch.device, class_images: int = 4) -> None:
        self.ex = Extractor(model, device=str(device), progress=False)
        self.device = device
        self.scene = scene
        self.cfg = ExtractConfig(prior={"num_class_images": class_images, "generation_steps": 2}, grid_seeds=0)
        self.n = scene.num_concepts
        self.prepared = self.ex.prepare(scene, self.cfg)

    def _apply(self, lv: Levers) -> tuple[ExtractConfig, object]:
        """Set the model-side levers; returns the config and the attention store to use."""
        ex, m = self.ex, self.ex.models
        m.unet.to(memory_format=torch.channels_last if lv.channels_last else torch.contiguous_format)
        if lv.compile and getattr(m.unet, "_compiled_call_impl", None) is None:
            m.unet.compile()  # measured last: nothing runs eager after it
        store = ex.store
        if lv.loss_layers_only:
            install_capture(m.unet, ex.store, self.cfg.attn_downsample)
        else:
            store = StoreEverything(loss_layers(m.unet, self.cfg.attn_downsample))
            install_explicit_everywhere(m.unet, store)
        mixed = "bf16" if lv.bf16_autocast else "no"
        return self.cfg.model_copy(update={"mixed_precision": mixed}), store

    def _step_fn(self, lv: Levers, cfg: ExtractConfig, store):
        ex, m, data = self.ex, self.ex.models, self.prepared.tensors
        rng, gen = random.Random(0), torch.Generator(device=self.device).manual_seed(0)
        pixels = torch.stack([self.prepared.inputs.pixels, self.prepared.inputs.pixels.flip(-1)])
        timesteps = m.scheduler.config.num_train_timesteps

        def step():
            if not lv.cached_latents:  # as the script does: both flips encoded again
                mean, std = ex.resident.encode_latents(pixels)
                data.latent_mean, data.latent_std = [mean[0:1], mean[1:2]], [std[0:1], std[1:2]]
            batch = draw_batch(data, self.prepared.class_tensors, cfg, rng=rng, gen=gen,
                               encode_subset=ex.assets.encode_subset, num_train_timesteps=timesteps)
            terms = training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)
            if not lv.no_host_sync:
                terms.total.detach().item()
            return terms
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
            options = {"cfg": cfg, "device": self.device, "progress": False, "fused": lv.fused_optimizer}
            run_phase("warm-up", warmup, setup, step, **options)
            result = run_phase(phase, steps, setup, step, **options)
            return 1000 * result.seconds / steps
        finally:
            for p in list(m.unet.parameters()) + list(m.text_encoder.parameters()):
                p.grad = None  # weight gradients of the no-freeze variant would linger
            self.prepared = ex.prepare(self.scene, self.cfg)  # pristine weights, latents not re-encoded


PHASES = {name: ("phase1", "phase2") for name in DESCRIPTIONS} | {"frozen_weights_phase1": ("phase1",)}


def run_levers(model: str, scene: Scene, device: torch.device, steps: int, include_compile: bool,
               rounds: int = 3) -> dict:
    """Paired measurements: in each round the default and the flipped variant run back to
    back, so drift on a shared machine cancels; medians over rounds are reported."""
    bench = LeverBench(model, scene, device)
    names = [name for name in DESCRIPTIONS if name != "compile" or include_compile]
    if device.type != "cuda":
        names.remove("bf16_autocast")  # autocast is a CUDA lever here; the CPU trains in fp32
    base = replace(DEFAULT_ON, bf16_autocast=device.type == "cuda")
    out: dict = {"steps": steps, "rounds": rounds, "levers": {}}
    for name in names:
        flipped = replace(base, **{name: not getattr(base, name)})
        row: dict = {"what": DESCRIPTIONS[name]}
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
        out["levers"][name] = row
    if device.type != "cuda":
        out["bf16_autocast"] = "CUDA only: not measured on this machine"
    return out
