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


# the most images one concept group is learned from (breakscene/scenes/group.py); the
# pipeline caps larger groups (pipeline/groups.py), with a warning
MAX_GROUP_IMAGES = 64


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

    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's betas")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW's decoupled weight decay")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this norm")


class PriorConfig(StrictModel):
    """Prior preservation: a plain diffusion loss on images of the base model's prior."""

    enabled: bool = Field(True, description="train on class images too, so the model keeps its prior")
    class_prompt: str = Field("a photo at the beach", description="the prompt the class images are made with and "
                                                                  "trained on")
    num_class_images: int = Field(100, ge=1, description="class images for prior preservation")
    loss_weight: float = Field(1.0, ge=0, description="weight of the prior loss")
    class_data_dir: str | None = None  # a folder of ready class images (authors' --class_data_dir)
    generation_steps: int = Field(50, ge=1)  # sampler steps when the images must be generated


class LoraConfigFields(StrictModel):
    """The adapters phase 2 trains when ``phase2_mode`` is ``lora``."""

    rank: int = Field(16, ge=1, description="the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="the adapters' alpha (their scale is alpha / rank)")
    lr: float = Field(1e-4, gt=0, description="learning rate of the adapters in phase 2")
    text_encoder: bool = True  # adapters on the text encoder too, not only the UNet


class RuntimeConfig(StrictModel):
    """How the resident models run. Nothing here changes what is learned beyond float
    rounding, so it is a property of the Extractor, not of a run: it is not part of
    ``ExtractConfig`` (nor of a cache key), and a bundle records it only as information."""

    channels_last: bool = True  # NHWC convolutions in the UNet (tensor cores on CUDA)
    # torch.compile the UNet once per Extractor: minutes of compiling, then faster steps on a
    # GPU; inductor's generated kernels fuse and reorder arithmetic, so the losses are not
    # bit for bit eager's (the golden curves are eager's)
    compile: bool = Field(False, description="torch.compile the UNet once (slow start, faster steps on a GPU; "
                                             "losses may differ from eager in their last digits)")
    compile_backend: str = "inductor"  # torch.compile backend ("eager" traces without code generation)
    # "adamw": fused on CUDA; on the CPU torch's multi-tensor AdamW over flat parameter
    # groups, bit for bit torch's default AdamW. "adamw-fused": fused on every device: on
    # the CPU faster still, but it rounds differently (losses move at ~1e-6 over 800 steps).
    # "adamw-8bit": bitsandbytes' AdamW8bit (the optional extra), CUDA only: moments in 8
    # bits (2 bytes a parameter instead of 8), the lever that shrinks a full phase 2 most
    optimizer: Literal["adamw", "adamw-fused", "adamw-8bit"] = Field(
        "adamw", description="adamw: fused on CUDA, bit for bit torch's default AdamW on the CPU; adamw-fused: "
                             "fused on the CPU too (faster there, losses differ at ~1e-6); adamw-8bit: "
                             "bitsandbytes' 8-bit AdamW (CUDA, the adamw-8bit extra; 2 instead of 8 bytes of "
                             "optimizer state a parameter)")
    # "auto": the prediction of models/memory.py
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="recompute activations in backward instead of storing them; auto: on CUDA, for each "
                            "phase whose predicted peak would not fit the device")
    memory_headroom: float = Field(0.9, gt=0, le=1)  # "auto" keeps the prediction under this share


class ExtractConfig(StrictModel):
    """One Break-A-Scene run: two phases, union sampling, masked + attention losses."""

    phase1_steps: int = Field(400, ge=0, description="phase 1: steps training only the new token rows")
    phase1_lr: float = Field(5e-4, gt=0, description="phase 1 learning rate")
    phase2_steps: int = Field(400, ge=0, description="phase 2: steps training the tokens with the UNet and text "
                                                     "encoder (or their LoRA adapters)")
    phase2_lr: float = Field(2e-6, gt=0, description="phase 2 learning rate of the UNet and text encoder (full)")
    phase2_mode: Literal["full", "lora"] = Field("full", description="full: train and save the whole UNet and text "
                                                                     "encoder (~4.8 GB bundles at SD 2.1); lora: "
                                                                     "LoRA adapters (a few MB)")
    lora: LoraConfigFields = Field(default_factory=LoraConfigFields)
    lambda_attn: float = Field(0.01, ge=0, description="weight of the cross-attention loss")
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip of each example")
    batch_size: int = Field(1, ge=1, description="examples per training step")
    max_concepts: int = Field(4, ge=1, le=16, description="concepts per image: the masks a scene may have in "
                                                          "`extract`; in a job, how many of an image's masks "
                                                          "become concepts")
    # "mask": divide by the mask's area (fixes the authors' area-dependent weight);
    # "all": the authors' mean over all latent pixels (kept for parity checks).
    masked_loss_normalization: Literal["mask", "all"] = "mask"
    # Attention maps are read at latent / attn_downsample (16x16 for SD at 512 px).
    attn_downsample: int = Field(4, ge=1)
    attn_max_eps: float = Field(1e-6, gt=0, description="added to a map's maximum when it is max-normalised")
    # None: the model's native resolution; the model's own multiple is checked when it is loaded
    resolution: int | None = Field(None, ge=8, le=MAX_RESOLUTION)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    seed: Seed = Field(0, description="seed of the run's randomness: union sampling, flips, noise and timesteps")
    # Mixed precision on CUDA ("bf16"/"fp16" autocast with fp32 master weights); CPU runs fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    # Attention diagnostic after training: timesteps and noise seed are fixed so that
    # two bundles are compared on equal terms.
    diagnostic_timesteps: tuple[int, ...] = (100, 300, 500, 700)
    diagnostic_seed: Seed = Field(1234, description="noise seed of the attention diagnostic")
    diagnostic_threshold: float = Field(0.5, gt=0, lt=1, description="a max-normalised map above this is the "
                                                                     "token's region, for its IoU with the mask")
    # Sample grid written with every bundle: one batched call, one generator per seed.
    grid_seeds: int = Field(2, ge=0, description="seeds of the bundle's sample grid; 0 writes no grid")
    grid_inference_steps: int = Field(20, ge=1, description="sampler steps of the grid")
    grid_scheduler: SamplerName = Field("dpm++", description="sampler of the grid, recorded in the bundle (the "
                                                             "default of `breakscene generate`)")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance of the grid")

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
