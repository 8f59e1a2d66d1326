"""Typed configuration of one extraction run, with the published defaults.

Every field that changes the result of a run is here, so a bundle can record the
exact settings that produced it (``ExtractConfig.model_dump()``) and a job file can
override any of them by name. Unknown keys are rejected with the key named, and so are
inf / nan, seeds outside 0 .. 2**32 - 1 and resolutions over ``MAX_RESOLUTION``.
``GenerateOptions`` are `breakscene generate`'s numbers; ``read_settings_file`` is the one
YAML reader of job files, ``--config`` and ``--runtime-env`` (bounded size, alias
expansion and depth).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from breakscene.errors import BreakSceneError
from breakscene.models.schedulers import SamplerName

# The base model when none is named (a hub id); here rather than in models.py so that
# validating a job file needs no torch / diffusers import.
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
# Pixels a side, training or sampling: twice the largest native size of the models this
# loads (768); beyond it one image's tensors alone outgrow a machine's memory.
MAX_RESOLUTION = 2048
# Seeds are 0 .. 2**32 - 1: what torch.Generator, numpy and random all accept.
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


def _multiple_of_8(value: int) -> int:
    if value < 8 or value % 8 or value > MAX_RESOLUTION:
        raise ValueError(f"must be a positive multiple of 8 up to {MAX_RESOLUTION}")
    return value


Pixels = Annotated[int, AfterValidator(_multiple_of_8)]  # an image side the VAE can encode


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are an error, not silently ignored; inf and nan
    are refused in every float (they would train NaN weights and write non-JSON)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def validate_config(model: type[BaseModel], data: dict, where: str, *,
                    error: type[BreakSceneError] = BreakSceneError, what: str = "invalid configuration in"):
    """``model`` validated from ``data``, or one ``error`` naming ``where`` (a file,
    "command line") and every field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise error(f"{what} {where}: {problems}") from None


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
    # None: the model's native resolution; the model's own multiple is checked when it is loaded
    resolution: int | None = Field(None, ge=8, le=MAX_RESOLUTION)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    seed: Seed = 0
    # Mixed precision on CUDA ("bf16"/"fp16" autocast with fp32 master weights); CPU runs fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    # Attention diagnostic after training: timesteps and noise seed are fixed so that
    # two bundles are compared on equal terms.
    diagnostic_timesteps: tuple[int, ...] = (100, 300, 500, 700)
    diagnostic_seed: Seed = 1234
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


class GenerateOptions(StrictModel):
    """The numbers of `breakscene generate`, checked before the bundle is loaded; None takes
    the bundle's grid setting (steps, guidance, size) or leaves LoRA at full strength."""

    num_images: int = Field(1, ge=1)
    seed: Seed = 0
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    height: Pixels | None = None
    width: Pixels | None = None
    lora_scale: float | None = None

    @model_validator(mode="after")
    def _seeds(self) -> "GenerateOptions":
        if self.seed + self.num_images > SEED_LIMIT:
            raise ValueError(f"--seed {self.seed} with --num-images {self.num_images} uses seeds up to "
                             f"{self.seed + self.num_images - 1}, beyond the largest seed {SEED_LIMIT - 1}")
        return self


# --- settings files (job files, --config) ------------------------------------------
# A settings file holds a few KiB; the bounds stop a file that is data, or YAML aliases
# that expand a small file into gigabytes once serialised (a "billion laughs"), before any work.
MAX_SETTINGS_BYTES = 2**20
MAX_SETTINGS_EXPANSION = 2 * MAX_SETTINGS_BYTES  # see yaml_weight; an alias-free file stays under it
MAX_SETTINGS_DEPTH = 64  # jobs nest four levels; deep nesting only overflows recursive readers later
YAML_LOADER = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader


def read_settings_file(path: str | Path, what: str) -> dict:
    """The mapping in the YAML file ``path``, or one BreakSceneError naming ``what`` ("job
    file", "config file") and the file: unreadable, over MAX_SETTINGS_BYTES, not YAML,
    expanding through aliases beyond MAX_SETTINGS_EXPANSION, nested too deeply, or not a mapping."""
    where = f"{what} {path}"
    loader = YAML_LOADER(_read_bounded(Path(path), where))
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        yaml_weight(node, where)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise BreakSceneError(f"{where} is not valid YAML{at}: {problem}") from None
    except RecursionError:  # PyYAML's own composer, where libyaml is missing, recurses per level
        raise BreakSceneError(f"{where} is nested deeper than {MAX_SETTINGS_DEPTH} levels") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BreakSceneError(f"{where} must be a mapping of settings (key: value lines), not a {type(data).__name__}")
    return data


def _read_bounded(path: Path, where: str) -> bytes:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SETTINGS_BYTES + 1)  # never more: the file may be a device or endless
    except OSError as exc:
        raise BreakSceneError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_SETTINGS_BYTES:
        raise BreakSceneError(f"{where} is over {MAX_SETTINGS_BYTES // 2**20} MiB: a settings file holds settings, "
                              "not data")
    return raw


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def yaml_weight(root: yaml.Node, where: str) -> int:
    """The size of ``root`` with every alias expanded (1 per collection, a scalar's length),
    measured on the composed graph, where an alias is one shared node: each node is counted
    once, so a bomb is measured without being built. Over MAX_SETTINGS_EXPANSION, deeper
    than MAX_SETTINGS_DEPTH, or an alias inside its own anchor: BreakSceneError."""
    weights: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack = [(root, False, 0)]
    while stack:
        node, closing, depth = stack.pop()
        key = id(node)
        if closing:
            open_nodes.discard(key)
            weights[key] = max(1, len(node.value)) if isinstance(node, yaml.ScalarNode) else \
                1 + sum(weights[id(kid)] for kid in _children(node))
            if weights[key] > MAX_SETTINGS_EXPANSION:
                raise BreakSceneError(f"{where} expands through YAML aliases (*name) to more than "
                                      f"{MAX_SETTINGS_EXPANSION // 2**20} MiB of values: write the values out instead")
        elif key in open_nodes:
            raise BreakSceneError(f"{where}: the YAML anchor at line {node.start_mark.line + 1} refers to itself "
                                  "(an alias inside its own anchor)")
        elif depth > MAX_SETTINGS_DEPTH:
            raise BreakSceneError(f"{where} is nested deeper than {MAX_SETTINGS_DEPTH} levels "
                                  f"(line {node.start_mark.line + 1})")
        elif key not in weights:
            open_nodes.add(key)
            stack.append((node, True, depth))
            stack.extend((kid, False, depth + 1) for kid in _children(node))
    return weights[id(root)]
