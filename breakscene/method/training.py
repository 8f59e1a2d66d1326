"""One Break-A-Scene training step, and the loop that runs a phase of them.

``training_step`` is a function of (models, batch) where the batch already holds every
random draw (subsets, flips, noise, timesteps), so tests can feed fixed inputs and
compare with hand-computed numbers. ``run_phase`` owns the optimiser and the loop: the
losses stay on the device and are read back every ``readback_every`` steps, where a
non-finite one stops the phase (``NonFiniteLossError``). On the CPU its AdamW runs over
flat parameter groups (``FlatAdamW``): a few kernels a step instead of thousands, bit for
bit the same numbers.
"""
from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from breakscene.method.attention import AttentionStore, token_maps
from breakscene.config import ExtractConfig
from breakscene.errors import BreakSceneError, NonFiniteLossError
from breakscene.method.losses import attention_loss, masked_mse

if TYPE_CHECKING:
    from breakscene.method.phases import PhaseSetup


@dataclass
class Batch:
    """One training batch; instance rows first, then (with prior preservation) class rows."""

    latents: torch.Tensor  # (B, 4, h, w) instance latents
    input_ids: torch.Tensor  # (B, L)
    token_positions: list[torch.Tensor]  # per example: prompt positions of its chosen tokens
    attn_masks: list[torch.Tensor]  # per example: (k_b, h/ds, w/ds) masks of those tokens, same order
    union_mask: torch.Tensor  # (B, 1, h, w) union of the chosen masks at latent size
    noise: torch.Tensor
    timesteps: torch.Tensor
    class_latents: torch.Tensor | None = None
    class_input_ids: torch.Tensor | None = None
    class_noise: torch.Tensor | None = None
    class_timesteps: torch.Tensor | None = None


@dataclass
class LossTerms:
    total: torch.Tensor
    diffusion: torch.Tensor
    attention: torch.Tensor
    prior: torch.Tensor

    def detached(self) -> torch.Tensor:
        return torch.stack([t.detach() for t in (self.total, self.diffusion, self.attention, self.prior)]).float()


LOSS_NAMES = ("total", "diffusion", "attention", "prior")
READBACK_EVERY = 50  # steps between host reads of the losses: the finite check and the progress bar
OPTIMIZERS = ("auto", "fused", "foreach", "for-loop", "torch", "8bit")
# RuntimeConfig.optimizer -> make_optimizer's kind
RUNTIME_OPTIMIZERS = {"adamw": "auto", "adamw-fused": "fused", "adamw-8bit": "8bit"}
# bitsandbytes' 8-bit AdamW: one byte per moment and value, an fp32 scale per block of a
# moment; tensors under the minimum size keep fp32 moments (models/memory.py counts both)
ADAMW_8BIT_MIN_SIZE = 4096
ADAMW_8BIT_BLOCK = 256


def diffusion_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def training_step(unet, text_encoder, scheduler, store: AttentionStore, batch: Batch,
                  cfg: ExtractConfig, *, backbone=None) -> LossTerms:
    """Forward pass and the three loss terms for one batch (no backward, no optimiser).

    ``backbone`` (``models.backbones``): encodes the ids and gives the UNet's added
    conditioning (SDXL); without it, ``text_encoder``'s last hidden state (SD 1.x/2.x)."""
    num_instance = batch.latents.shape[0]
    with_prior = batch.class_latents is not None
    latents, noise, timesteps, ids = batch.latents, batch.noise, batch.timesteps, batch.input_ids
    if with_prior:
        latents = torch.cat([latents, batch.class_latents])
        noise = torch.cat([noise, batch.class_noise])
        timesteps = torch.cat([timesteps, batch.class_timesteps])
        ids = torch.cat([ids, batch.class_input_ids])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if backbone is None:
        encoder_states, added = text_encoder(ids)[0], None
    else:
        encoder_states, added = backbone.encode_ids(ids, tuple(latents.shape[-2:]))
    store.clear()
    store.enabled = cfg.lambda_attn > 0
    pred = unet(noisy, timesteps, encoder_states, added_cond_kwargs=added).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)

    diffusion = masked_mse(pred[:num_instance], target[:num_instance], batch.union_mask,
                           cfg.masked_loss_normalization)
    zero = diffusion.new_zeros(())
    prior = F.mse_loss(pred[num_instance:].float(), target[num_instance:].float()) if with_prior else zero
    attention = zero
    if cfg.lambda_attn > 0:
        mean_map = store.mean_map()
        size = (latents.shape[-2] // cfg.attn_downsample, latents.shape[-1] // cfg.attn_downsample)
        # Rows 0..B-1 are the instance prompts: the class rows carry no asset token.
        maps = [token_maps(mean_map, row, batch.token_positions[row], size) for row in range(num_instance)]
        attention = attention_loss(maps, batch.attn_masks, cfg.attn_max_eps)
    total = diffusion + cfg.prior.loss_weight * prior + cfg.lambda_attn * attention
    return LossTerms(total=total, diffusion=diffusion, attention=attention, prior=prior)


def autocast_context(device: torch.device, mixed_precision: str):
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class PhaseResult:
    name: str
    steps: int
    seconds: float
    losses: torch.Tensor = field(repr=False)  # (steps, 4), columns LOSS_NAMES

    def summary(self, points: int = 50) -> dict:
        """First / last / mean / min per term and a curve of ``points`` window means."""
        out: dict = {"steps": self.steps, "seconds": round(self.seconds, 3)}
        if self.steps == 0:
            return out
        losses = self.losses.cpu()
        for i, name in enumerate(LOSS_NAMES):
            col = losses[:, i]
            windows = torch.tensor_split(col, min(points, len(col)))
            out[name] = {
                "first": float(col[0]), "last": float(col[-1]), "mean": float(col.mean()),
                "min": float(col.min()), "curve": [round(float(w.mean()), 6) for w in windows],
            }
        return out


def flat_layout(p: torch.Tensor) -> bool:
    """Whether ``p`` can live in a slice of a flat tensor with its own strides: dense, in
    the contiguous or the channels-last order."""
    return not p.is_sparse and (p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
        memory_format=torch.channels_last)))


class FlatAdamW(torch.optim.AdamW):
    """torch's multi-tensor AdamW over each parameter group laid end to end in one tensor.

    On the CPU a multi-tensor ("foreach") op is a loop of one kernel per tensor: over a
    UNet's hundreds of small tensors AdamW makes some 3,000 kernel calls a step, which cost
    more than its arithmetic. Here each group's parameters become views into one flat
    tensor (with their own strides: channels-last stays channels-last), the gradients are
    copied into a flat twin, and torch's AdamW runs over one tensor per group. Its every
    operation is elementwise, so the numbers are bit for bit those of AdamW over the
    separate tensors. A parameter left without a gradient counts as a zero gradient (as
    in the authors' script, which zeroes gradients rather than freeing them).
    ``release`` gives each parameter its own storage back (``run_phase`` calls it)."""

    def __init__(self, groups: list[dict], **options) -> None:
        self.members: list[torch.nn.Parameter] = []
        self.grad_views: list[torch.Tensor] = []
        flat_groups = []
        for group in groups:
            params = list(group["params"])
            flat = torch.nn.Parameter(params[0].new_empty(sum(p.numel() for p in params)))
            flat.grad = torch.zeros_like(flat)
            offset = 0
            for p in params:
                view = flat.detach().as_strided(p.shape, p.stride(), offset)
                view.copy_(p.detach())
                p.data = view  # the model's parameter now lives in ``flat``
                self.grad_views.append(flat.grad.as_strided(p.shape, p.stride(), offset))
                offset += p.numel()
            self.members += params
            flat_groups.append({**group, "params": [flat]})
        super().__init__(flat_groups, **options)
        self.gathered = False

    @classmethod
    def fits(cls, groups: list[dict]) -> bool:
        """Worth it and exact: more tensors than groups, each group's of one dtype and device,
        every tensor in a ``flat_layout``."""
        params = [list(g["params"]) for g in groups]
        return sum(map(len, params)) > len(groups) and all(
            len({(p.dtype, p.device) for p in ps}) == 1 and all(flat_layout(p) for p in ps) for ps in params)

    @property
    def flats(self) -> list[torch.nn.Parameter]:
        return [g["params"][0] for g in self.param_groups]

    @torch.no_grad()
    def gather(self) -> None:
        """The members' gradients into the flat gradients, once per step."""
        if self.gathered:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.members]
        torch._foreach_copy_(self.grad_views, grads)
        self.gathered = True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the members: the norm from the separate
        tensors (its rounding depends on them), the scaling on the flat gradients."""
        total = torch.nn.utils.get_total_norm([p.grad for p in self.members if p.grad is not None])
        self.gather()
        torch.nn.utils.clip_grads_with_norm_(self.flats, max_norm, total)
        return total

    def step(self, closure=None):
        self.gather()
        loss = super().step(closure)
        self.gathered = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.members:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def release(self) -> None:
        """Each member back in storage of its own (a bundle's writer refuses shared storage)."""
        for p in self.members:
            p.data = p.data.clone()  # preserves the strides of a dense tensor


def optimizer_problem(optimizer: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run the ``RuntimeConfig.optimizer`` named ``optimizer``, or None."""
    if optimizer != "adamw-8bit":
        return None
    if device.type != "cuda":
        return f"runtime.optimizer adamw-8bit needs a CUDA device (this run's device is {device.type})"
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("runtime.optimizer adamw-8bit needs bitsandbytes, which is not installed: "
                "pip install 'breakscene[adamw-8bit]'")
    return None


def adamw_8bit(groups: list[dict], options: dict, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (its moments in 8 bits, blockwise scaled): CUDA only."""
    problem = optimizer_problem("adamw-8bit", device)
    if problem:
        raise BreakSceneError(problem)
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, min_8bit_size=ADAMW_8BIT_MIN_SIZE, **options)


def make_optimizer(setup: PhaseSetup, cfg: ExtractConfig, device: torch.device,
                   kind: str = "auto") -> torch.optim.Optimizer:
    """AdamW over ``setup``'s parameter groups. ``kind``: "auto" is one fused kernel on CUDA
    and, on the CPU, the multi-tensor ("foreach") form over flat groups (``FlatAdamW``, where
    they fit), bit for bit torch's default one-tensor-at-a-time loop; "fused" (on the CPU it
    rounds differently, ~1e-7 per step), "foreach", "for-loop" as named; "torch" is torch's
    own default (what a training script gets); "8bit" is bitsandbytes' 8-bit AdamW (CUDA
    only, ``adamw_8bit``). A FlatAdamW must be ``release``d after use."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {kind!r}")
    groups = [dict(g) for g in setup.groups]  # AdamW writes its settings into each group it is given
    options = {"betas": cfg.optimizer.betas, "weight_decay": cfg.optimizer.weight_decay, "eps": cfg.optimizer.eps}
    if kind == "8bit":
        return adamw_8bit(groups, options, device)
    if kind == "auto" and device.type == "cuda":
        kind = "fused"
    elif kind == "auto":
        if FlatAdamW.fits(groups):
            return FlatAdamW(groups, foreach=True, **options)
        kind = "foreach"
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}, "torch": {}}[kind]
    return torch.optim.AdamW(groups, **options, **impl)


def clip_and_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, trainable: list[torch.nn.Parameter],
                  max_norm: float) -> None:
    """After backward: gradients unscaled, clipped to ``max_norm``, applied, then freed."""
    scaler.unscale_(opt)
    if isinstance(opt, FlatAdamW):
        opt.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def release(opt: torch.optim.Optimizer) -> None:
    """What ``make_optimizer`` borrowed from the model, given back."""
    if isinstance(opt, FlatAdamW):
        opt.release()


def check_finite(phase: str, losses: torch.Tensor, first_step: int) -> None:
    """Raise NonFiniteLossError at the first row of ``losses`` (host rows of LOSS_NAMES,
    the first being step ``first_step``, counted from 1) that holds inf or nan."""
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return
    row = int(bad.any(dim=1).nonzero()[0])
    # a part names the cause better than the total it makes non-finite
    term = next(LOSS_NAMES[i] for i in (1, 2, 3, 0) if bad[row, i])
    values = {name: float(losses[row, i]) for i, name in enumerate(LOSS_NAMES)}
    raise NonFiniteLossError(phase, first_step + row, term, values)


def run_phase(name: str, steps: int, setup: PhaseSetup, step_fn: Callable[[], LossTerms], *, cfg: ExtractConfig,
              device: torch.device, progress: bool = True, optimizer: str = "auto",
              readback_every: int = READBACK_EVERY) -> PhaseResult:
    """Run ``steps`` optimiser steps over ``setup``'s parameter groups (``phases.phase_setup``),
    calling its ``after_step`` after each. Loss values stay on the device: the host reads
    them every ``readback_every`` steps and at the end (one synchronisation each), checks
    they are finite (else NonFiniteLossError) and shows the latest on the progress bar.

    ``optimizer``: an OPTIMIZERS name (``make_optimizer``)."""
    trainable = [p for p in setup.trainable if p.requires_grad]
    after_step = setup.after_step
    opt = make_optimizer(setup, cfg, device, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.mixed_precision == "fp16")
    history = torch.zeros(steps, len(LOSS_NAMES), device=device)
    readback_every = max(1, readback_every)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, disable=not progress or steps == 0, leave=False)
    read = 0  # rows of history already read back
    try:
        for step in bar:
            with autocast_context(device, cfg.mixed_precision):
                terms = step_fn()
            scaler.scale(terms.total).backward()
            clip_and_step(opt, scaler, trainable, cfg.optimizer.max_grad_norm)
            after_step()
            history[step] = terms.detached()
            if step + 1 - read == readback_every or step == steps - 1:
                rows = history[read:step + 1].cpu()  # the loop's only host synchronisation
                check_finite(name, rows, read + 1)
                read = step + 1
                if progress:
                    bar.set_postfix(loss=f"{float(rows[-1, 0]):.4f}")
    finally:
        release(opt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return PhaseResult(name=name, steps=steps, seconds=time.perf_counter() - start, losses=history)
