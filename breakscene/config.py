"""Typed configuration of one extraction run, with the published defaults.

Every field that changes the result of a run is here, so a bundle can record the
exact settings that produced it (``ExtractConfig.model_dump()``) and a job file can
override any of them by name. Unknown keys are rejected with the key named.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import BreakSceneError
from .schedulers import SamplerName

# The base model when none is named (a hub id); here rather than in models.py so that
# validating a job file needs no torch / diffusers import.
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def validate_config(model: type[BaseModel], data: dict, where: str):
    """``model`` validated from ``data``, or one BreakSceneError naming ``where`` (a file,
    "command line") and every field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise BreakSceneError(f"invalid configuration in {where}: {problems}") from None


class OptimizerConfig(StrictModel):
    """AdamW as in the authors' code (the paper's text says Adam, betas (0.9, 0.99))."""

    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)


class PriorConfig(StrictModel):
    """Prior preservation: a plain diffusion loss on images of the base model's prior."""

    enabled: bool = True
    class_prompt: str = "a photo at the beach"
    num_class_images: int = Field(100, ge=1)
    loss_weight: float = Field(1.0, ge=0)
    class_data_dir: str | None = None  # a folder of ready class images (authors' --class_data_dir)
    generation_steps: int = Field(50, ge=1)  # sampler steps when the images must be generated


class LoraConfigFields(StrictModel):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    text_encoder: bool = True  # adapters on the text encoder too, not only the UNet


class RuntimeConfig(StrictModel):
    """How the resident models run. Nothing here changes what is learned beyond float
    rounding, so it is a property of the Extractor, not of a run: it is not part of
    ``ExtractConfig`` (nor of a cache key), and a bundle records it only as information."""

    channels_last: bool = True  # NHWC convolutions in the UNet (tensor cores on CUDA)
    compile: bool = False  # torch.compile the UNet once; pays off only over many scenes
    compile_backend: str = "inductor"  # torch.compile backend ("eager" traces without code generation)
    # Recompute activations in backward instead of storing them. "auto": decided for each
    # phase on CUDA: on when that phase's predicted peak would not fit the device (memory.py).
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    memory_headroom: float = Field(0.9, gt=0, le=1)  # "auto" keeps the prediction under this share


class ExtractConfig(StrictModel):
    """One Break-A-Scene run: two phases, union sampling, masked + attention losses."""

    phase1_steps: int = Field(400, ge=0)
    phase1_lr: float = Field(5e-4, gt=0)
    phase2_steps: int = Field(400, ge=0)
    phase2_lr: float = Field(2e-6, gt=0)
    phase2_mode: Literal["full", "lora"] = "full"
    lora: LoraConfigFields = Field(default_factory=LoraConfigFields)
    lambda_attn: float = Field(0.01, ge=0)
    flip_p: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(1, ge=1)
    max_concepts: int = Field(4, ge=1, le=16)
    # "mask": divide by the mask's area (fixes the authors' area-dependent weight);
    # "all": the authors' mean over all latent pixels (kept for parity checks).
    masked_loss_normalization: Literal["mask", "all"] = "mask"
    # Attention maps are read at latent / attn_downsample (16x16 for SD at 512 px).
    attn_downsample: int = Field(4, ge=1)
    attn_max_eps: float = Field(1e-6, gt=0)
    resolution: int | None = Field(None, ge=8)  # None: the model's native resolution
    prior: PriorConfig = Field(default_factory=PriorConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    seed: int = 0
    # Mixed precision on CUDA ("bf16"/"fp16" autocast with fp32 master weights); CPU runs fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    # Attention diagnostic after training: timesteps and noise seed are fixed so that
    # two bundles are compared on equal terms.
    diagnostic_timesteps: tuple[int, ...] = (100, 300, 500, 700)
    diagnostic_seed: int = 1234
    diagnostic_threshold: float = Field(0.5, gt=0, lt=1)
    # Sample grid written with every bundle: one batched call, one generator per seed.
    grid_seeds: int = Field(2, ge=0)
    grid_inference_steps: int = Field(20, ge=1)
    grid_scheduler: SamplerName = "dpm++"  # a name in schedulers.SCHEDULERS; recorded in the bundle
    guidance_scale: float = Field(7.5, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ExtractConfig":
        if self.phase1_steps + self.phase2_steps == 0:
            raise ValueError("phase1_steps and phase2_steps are both 0: nothing would be trained")
        return self
