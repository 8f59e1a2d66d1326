"""The concept bundle: the unit the pipeline stores, how it is written from a trained scene,
and how to load it back for generation.

Layout (a local folder or any fsspec URI), shaped for diffusers' own loaders::

    bundle.json                      tokens, model, config, sampler, losses, timings, diagnostics (written last)
    README.md                        model card: tokens, base, settings, a plain-diffusers snippet
    embeddings/asset{i}.safetensors  {"<asset{i}>": vector}: diffusers' textual-inversion format; SDXL:
                                     {"clip_l": (1, 768), "clip_g": (1, 1280)}, the rows of text_encoder
                                     and text_encoder_2, as SDXL embeddings are exchanged
    pytorch_lora_weights.safetensors phase-2 `lora` adapters: ``pipe.load_lora_weights(bundle)``, or
    unet/, text_encoder/             phase-2 `full` weights (diffusers / transformers folders; SDXL: and
                                     text_encoder_2/)
    scheduler/                       the grid's sampler (``<Scheduler>.from_pretrained(bundle, subfolder=...)``)
    image.png, masks/mask{i}.png     the image and masks exactly as trained on (after orientation, crop, resize)
    diagnostics/attention_maps.safetensors   the diagnostic's per-token maps
    grid.png                         sample grid: each concept alone and all together

The root holds no other ``.safetensors`` file than the LoRA's: diffusers' LoRA loader
picks a folder's root ``.safetensors`` file.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from breakscene.config import MAX_RESOLUTION, validate_config
from breakscene.errors import BundleError
from breakscene.failpoints import failpoint
from breakscene.files.storage import exists, fetch_dir, join, publish_dir, read_bytes
from breakscene.files.strictjson import to_json

if TYPE_CHECKING:
    from breakscene.extraction.products import ExtractionResult, TrainedScene

MARKER = "bundle.json"
FORMAT = "breakscene-bundle"
VERSION = 2  # 2: LoRA at the root, diagnostics/, scheduler/, image.png, README.md, sampler
READABLE = (1, 2)


def manifest(**fields) -> dict:
    from breakscene import __version__

    return {"format": FORMAT, "version": VERSION, "library_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields}


def is_complete(uri: str) -> bool:
    return exists(join(uri, MARKER))


def read_manifest(uri: str) -> dict:
    """``bundle.json``, with the fields loading reads checked (``BundleManifest``): a
    BundleError naming the file and the field otherwise."""
    marker = join(uri, MARKER)
    if not is_complete(uri):
        raise BundleError(f"{uri} is not a complete bundle (no {MARKER})")
    try:
        info = json.loads(read_bytes(marker))
    except ValueError as exc:  # not JSON, not UTF-8
        raise BundleError(f"{marker} is not JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") not in READABLE:
        found = info if isinstance(info, dict) else {}
        raise BundleError(f"{uri}: unsupported bundle format {found.get('format')!r} v{found.get('version')}")
    validate_config(BundleManifest, info, marker, error=BundleError, what="bundle")
    return info


def save_text_encoder(text_encoder, vocab_rows: int, folder: Path) -> None:
    """Save a fine-tuned text encoder at the base vocabulary size: the asset rows live in the
    textual-inversion files, so the folder loads like any CLIP text encoder."""
    folder.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()}
    emb = text_encoder.get_input_embeddings().weight
    key = next(name for name, p in text_encoder.named_parameters() if p is emb)
    state[key] = state[key][:vocab_rows].contiguous()
    config = text_encoder.config.__class__.from_dict(text_encoder.config.to_dict())
    config.vocab_size = vocab_rows
    config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def write_bundle(out: str, trained: TrainedScene, result: ExtractionResult) -> None:
    """Write ``trained``'s bundle to ``out``: built in a temporary folder, then published with
    ``bundle.json`` last, so a failure leaves nothing. Sets ``result``'s URIs and grid timing."""
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict = {"embeddings": [], "masks": []}
        _write_weights(tmp, trained, result.tokens, files)
        failpoint("bundle-half-written")
        _write_inputs(tmp, trained.prepared.inputs, files)
        if trained.prepared.group:  # every image of a concept group, as trained on
            files["sources"] = [_write_inputs(tmp, x, {"masks": []}, f"sources/{j}/")
                                for j, x in enumerate(trained.prepared.group.inputs)]
        # Diagnostics in their own folder: diffusers' LoRA loader reads the root's .safetensors.
        (tmp / "diagnostics").mkdir()
        files["attention_maps"] = "diagnostics/attention_maps.safetensors"
        save_file({"maps": torch.from_numpy(result.attention_maps).contiguous()}, tmp / files["attention_maps"])
        sampler = _write_samples(tmp, trained, result, files)
        info = _bundle_manifest(trained, result, files, sampler)
        files["card"] = "README.md"
        _write_card(tmp, info, out)
        (tmp / MARKER).write_text(to_json(info, indent=2))
        publish_dir(tmp, out, MARKER)
    result.bundle_uri = out
    result.grid_uri = join(out, "grid.png") if "grid" in files else None


def _write_weights(tmp: Path, trained: TrainedScene, tokens: list[str], files: dict) -> None:
    """One diffusers textual-inversion file per token; the phase-2 weights (LoRA at the root,
    where ``pipe.load_lora_weights(bundle)`` looks, or whole unet/ and text_encoder/)."""
    from breakscene.method.phases import phase2_mode  # peft and diffusers: only when writing

    (tmp / "embeddings").mkdir()
    assets, m, cfg = trained.assets, trained.models, trained.config
    for i, token in enumerate(tokens):
        rel = f"embeddings/asset{i}.safetensors"
        save_file(embedding_state(assets, i, token), tmp / rel)
        files["embeddings"].append(rel)
    base_rows = {id(e): rows for e, rows in zip(assets.text_encoders, assets.base_rows_per_encoder)}
    files.update(phase2_mode(cfg).save(tmp, m.unet, m.text_encoders, cfg, lambda te, folder: save_text_encoder(
        te, base_rows[id(te)], folder)))


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text_encoder's row, text_encoder_2's row


def embedding_state(assets, i: int, token: str) -> dict[str, torch.Tensor]:
    """Token ``i``'s textual-inversion file: {token: row} with one text encoder, else the
    rows of both SDXL encoders under ``clip_l`` and ``clip_g`` (each (1, width))."""
    rows = [e.weight.detach()[ids[i]].float().cpu().contiguous()
            for e, ids in zip(assets.embeddings, assets.ids_per_encoder)]
    if len(rows) == 1:
        return {token: rows[0]}
    return {key: row[None].contiguous() for key, row in zip(SDXL_EMBEDDING_KEYS, rows)}


def _write_inputs(tmp: Path, inputs, files: dict, prefix: str = "") -> dict:
    """The image and masks exactly as trained on (after orientation, crop and resize): the
    pixels are uint8 / 127.5 - 1, so the PNG holds them without loss. Returns ``files``."""
    import numpy as np
    from PIL import Image

    from breakscene.scenes.scene import rgb_values

    image = rgb_values(inputs.pixels).to(torch.uint8)
    (tmp / prefix / "masks").mkdir(parents=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / f"{prefix}image.png")
    files["image"] = f"{prefix}image.png"
    for i, mask in enumerate(inputs.masks):
        rel = f"{prefix}masks/mask{i}.png"
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp / rel)
        files["masks"].append(rel)
    return files


def _write_samples(tmp: Path, trained: TrainedScene, result: ExtractionResult, files: dict) -> dict:
    """The sample grid in one batched call (timed on its own), and its sampler, saved for
    diffusers' loaders; returns the sampler record for the manifest."""
    from breakscene.extraction import generate

    cfg, resolution = trained.config, trained.prepared.resolution
    pipe = trained.pipeline(cfg.grid_scheduler)
    seeds = list(range(cfg.grid_seeds))
    prompts, batch_seeds = generate.grid_batch(result.tokens, seeds) if seeds else ([], [])
    if seeds:
        clock = time.perf_counter()
        with generate.fused_attention(trained.models.unet), trained.resident.loaded_layout():
            grid = generate.sample_grid(pipe, result.tokens, seeds, cfg.grid_inference_steps, cfg.guidance_scale,
                                        resolution)
        result.timings["grid"] = round(time.perf_counter() - clock, 3)
        grid.save(tmp / "grid.png")
        files["grid"] = "grid.png"
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    files["scheduler"] = "scheduler"
    return generate.sampler_record(pipe, steps=cfg.grid_inference_steps, guidance_scale=cfg.guidance_scale,
                                   height=resolution, width=resolution, seeds=batch_seeds, prompts=prompts)


def _bundle_manifest(trained: TrainedScene, result: ExtractionResult, files: dict, sampler: dict) -> dict:
    m, scene, cfg = trained.models, trained.prepared.scene, trained.config
    return manifest(
        tokens=result.tokens, phase2_mode=cfg.phase2_mode, resolution=trained.prepared.resolution,
        model={"id": m.model_id, "revision": m.revision, "preset": m.is_preset, "family": m.family,
               **base_reference(m.model_id, m.revision, m.is_preset, m.family)},
        sampler=sampler, config=cfg.model_dump(mode="json"), losses=result.losses, timings=result.timings,
        runtime=result.runtime,
        image={"name": scene.image_name, "sha256": scene.image_hash, "width": scene.image.width,
               "height": scene.image.height},
        concepts=[{**c, "mask": _concept_mask(c, files)} for c in result.concepts],
        files=files, warnings=scene.warnings, **_group_manifest(trained, result, files),
    )


def _concept_mask(concept: dict, files: dict) -> str:
    """The mask file a concept was learned from (a group's: the first of its sources)."""
    if "sources" in concept:
        image, mask = concept["sources"][0]
        return files["sources"][image]["masks"][mask]
    return files["masks"][concept["index"]]


def _group_manifest(trained: TrainedScene, result: ExtractionResult, files: dict) -> dict:
    """A concept group's record: every source image with its masks, labels and diagnostic."""
    group = trained.prepared.group
    if group is None:
        return {}
    images = [{"name": s.image_name, "sha256": s.image_hash, "width": s.image.width, "height": s.image.height,
               "image": files["sources"][j]["image"], "masks": files["sources"][j]["masks"],
               "labels": [group.labels[t] for t in group.tensors.token_of[j]],
               "diagnostic": result.group[j]["concepts"], "warnings": s.warnings}
              for j, s in enumerate(group.scenes)]
    return {"group": {"draw": group.tensors.draw, "labels": group.labels, "images": images}}


def _write_card(tmp: Path, info: dict, out: str) -> None:
    from breakscene.files import modelcard

    bundle_path, base, base_comment = card_paths(info, out)
    (tmp / "README.md").write_text(modelcard.render(info, bundle_path=bundle_path, base=base,
                                                    base_comment=base_comment))


def base_reference(model_id: str, revision: str | None, preset: bool, family: str = "sd") -> dict:
    """What diffusers can load as this bundle's base, or how to make it (for bundle.json)."""
    from breakscene.files.storage import is_remote

    if preset:
        pipeline = PIPELINES[family]
        return {"diffusers_base": None, "hub": False,
                "make_base": f"a random-weight preset: `breakscene export-base {model_id} DIR` writes it as a "
                             f"diffusers folder for {pipeline}.from_pretrained(DIR)"}
    if is_remote(model_id):
        return {"diffusers_base": None, "hub": False,
                "make_base": f"copy the diffusers folder {model_id} to a local folder and load that"}
    local = Path(model_id.removeprefix("file://")).expanduser()
    if local.is_dir():
        return {"diffusers_base": str(local.resolve()), "hub": False}
    return {"diffusers_base": model_id, "hub": True}


def card_paths(info: dict, uri: str) -> tuple[str, str, str]:
    """(bundle path, base, comment on the base) for the model card's snippet."""
    from breakscene.files.storage import is_remote

    model = info["model"]
    bundle_path = "path/to/a/local/copy/of/this/bundle" if is_remote(uri) else \
        str(Path(uri.removeprefix("file://")).expanduser().resolve())
    if model.get("diffusers_base"):
        return bundle_path, model["diffusers_base"], "the base model" + (" on the Hugging Face Hub" if model.get("hub") else "")
    if model.get("preset"):
        folder = f"{model['id']}-diffusers"
        return bundle_path, folder, f"made by: breakscene export-base {model['id']} {folder}"
    return bundle_path, "path/to/a/local/copy/of/the/base", f"a local copy of {model['id']}"


# --- reading a bundle --------------------------------------------------------------
# Everything bundle.json names is checked before a model is loaded: the fields loading reads,
# paths that stay inside the bundle, and weights that are whole safetensors files. Nothing here
# lets a loader fall back to a pickle (torch.load) or to the hub for a file that is missing.

# the names diffusers and transformers save weights under, and read them from
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                "text_encoder_2": "model.safetensors", "lora": "pytorch_lora_weights.safetensors"}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}  # by bundle.json's model.family
T = TypeVar("T")


def inside_bundle(rel: str) -> str:
    path = PurePosixPath(rel)
    if not rel or "://" in rel or "\\" in rel or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{rel!r} is outside the bundle: its paths are relative to its folder, without ..")
    return rel


BundlePath = Annotated[str, AfterValidator(inside_bundle)]


class BundleSource(BaseModel):
    """One image of a concept group and its masks, as trained on."""

    image: BundlePath
    masks: list[BundlePath] = Field(default_factory=list)


class BundleFiles(BaseModel):
    model_config = ConfigDict(extra="allow")

    embeddings: list[BundlePath] = Field(min_length=1)
    lora: BundlePath | None = None
    unet: BundlePath | None = None
    text_encoder: BundlePath | None = None
    text_encoder_2: BundlePath | None = None  # SDXL's second text encoder (phase 2 mode full)
    scheduler: BundlePath | None = None
    masks: list[BundlePath] = Field(default_factory=list)
    image: BundlePath | None = None
    attention_maps: BundlePath | None = None
    grid: BundlePath | None = None
    card: BundlePath | None = None
    sources: list[BundleSource] = Field(default_factory=list)  # a concept group's images


class BundleBase(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    revision: str | None = None
    family: Literal["sd", "sdxl"] = "sd"  # bundles before SDXL did not say: Stable Diffusion 1.x/2.x


class BundleSampler(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = "ddim"
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)


class BundleManifest(BaseModel):
    """The fields of ``bundle.json`` that loading reads; the others are information."""

    model_config = ConfigDict(extra="allow")

    tokens: list[str] = Field(min_length=1)
    phase2_mode: str = "full"
    resolution: int = Field(ge=8, le=MAX_RESOLUTION)
    model: BundleBase
    files: BundleFiles
    sampler: BundleSampler | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "BundleManifest":
        if len(self.tokens) != len(self.files.embeddings):
            raise ValueError(f"{len(self.tokens)} tokens for {len(self.files.embeddings)} files.embeddings: "
                             "one token per file")
        if bool(self.files.unet) != bool(self.files.text_encoder):
            raise ValueError("files.unet and files.text_encoder come together (phase 2 mode full)")
        return self


def guarded(uri: str, rel: str, call: Callable[[], T]) -> T:
    """``call()``, a library loader reading ``rel``: whatever it raises becomes one
    BundleError naming the file."""
    try:
        return call()
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library raises its own types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(f"{uri}: {rel} cannot be loaded: {reason}") from exc


def bundle_path(uri: str, local: Path, field: str, rel: str) -> Path:
    """``rel`` in the local copy, refused when it leads outside the bundle (a symbolic link)."""
    path = (local / rel).resolve()
    if not path.is_relative_to(local.resolve()):
        raise BundleError(f"{uri}: files.{field}: {rel!r} is outside the bundle")
    return path


def check_safetensors(uri: str, path: Path, rel: str) -> Path:
    """``path``, when it is a whole safetensors file (a pickle, a truncated file are not)."""
    if not path.is_file():
        raise BundleError(f"{uri}: {rel} is missing (bundle.json lists it)")
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{uri}: {rel} is not a whole safetensors file ({exc})") from None
    return path


def weight_file(uri: str, local: Path, field: str, rel: str) -> Path:
    """The checked weights of ``files.<field>``: the file itself, or the one the library
    reads inside the folder it names (with its config.json for unet / text_encoder)."""
    path = bundle_path(uri, local, field, rel)
    if field == "lora" and not path.is_dir():
        return check_safetensors(uri, path, rel)
    folder = rel.rstrip("/")
    if field != "lora" and not (path / "config.json").is_file():
        raise BundleError(f"{uri}: {folder}/config.json is missing (bundle.json lists {folder})")
    name = f"{folder}/{WEIGHT_FILES[field]}"
    return check_safetensors(uri, bundle_path(uri, local, field, name), name)


def checked_files(uri: str, local: Path, files: dict) -> dict:
    """The local paths of what loading reads, each checked: embeddings (files), lora (a
    file), unet / text_encoder / scheduler (folders)."""
    out: dict = {"embeddings": [check_safetensors(uri, bundle_path(uri, local, "embeddings", rel), rel)
                                for rel in files["embeddings"]]}
    for field in ("unet", "text_encoder", "text_encoder_2", "lora"):
        if files.get(field):
            path = weight_file(uri, local, field, files[field])
            out[field] = path.parent if field != "lora" else path
    if files.get("scheduler"):
        out["scheduler"] = bundle_path(uri, local, "scheduler", files["scheduler"])
        if not (out["scheduler"] / "scheduler_config.json").is_file():
            raise BundleError(f"{uri}: {files['scheduler']}/scheduler_config.json is missing")
    return out


def read_embeddings(uri: str, info: dict, paths: list[Path], widths: list[int]) -> list[list[torch.Tensor]]:
    """Per token, one vector (or rows of vectors) per text encoder, each as wide as that
    encoder's rows: a file's one tensor, or SDXL's ``clip_l`` and ``clip_g``."""
    from safetensors.torch import load_file

    vectors = []
    for rel, path in zip(info["files"]["embeddings"], paths):
        state = load_file(path)
        tensors = [state.get(k) for k in SDXL_EMBEDDING_KEYS] if len(widths) == 2 else list(state.values())
        if len(tensors) != len(widths) or any(t is None or t.ndim not in (1, 2) or t.shape[-1] != w
                                               for t, w in zip(tensors, widths)):
            shapes = {k: tuple(t.shape) for k, t in state.items()}
            want = (f"one vector of {widths[0]} values (the text encoder's width)" if len(widths) == 1 else
                    f"clip_l ({widths[0]} values) and clip_g ({widths[1]} values), the two encoders' rows")
            raise BundleError(f"{uri}: {rel} holds {shapes}: {want} was expected")
        vectors.append(tensors)
    return vectors


def bundle_scheduler(uri: str, info: dict, paths: dict, default, sampler: str | None):
    """The sampler the bundle's grid used (its saved config), or ``sampler`` when named."""
    import diffusers

    from breakscene.models.schedulers import SCHEDULERS, make_scheduler

    recorded, scheduler = info.get("sampler"), default  # version 1 bundles sampled with DDIM
    if recorded and "scheduler" in paths:
        if recorded.get("name") not in SCHEDULERS:
            raise BundleError(f"{uri}: sampler {recorded.get('name')!r} is not one of {', '.join(SCHEDULERS)}")
        cls = getattr(diffusers, SCHEDULERS[recorded["name"]])
        scheduler = guarded(uri, info["files"]["scheduler"], lambda: cls.from_pretrained(paths["scheduler"]))
    if sampler and sampler != (recorded or {}).get("name", "ddim"):
        scheduler = make_scheduler(sampler, scheduler.config)
    return scheduler


def load_bundle_pipeline(uri: str, device: str | None = None, sampler: str | None = None):
    """(pipeline with the bundle's tokens, weights and sampler, manifest), via diffusers' own
    loaders. ``sampler`` (a schedulers.SCHEDULERS name) replaces the bundle's recorded one.
    The bundle is checked whole before the base model is loaded."""
    from breakscene.extraction.generate import models_pipeline
    from breakscene.models.loading import load_models, load_sdxl_models, pick_device

    info = read_manifest(uri)
    files, sdxl = info["files"], info["model"].get("family") == "sdxl"
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        local = fetch_dir(uri, Path(tmp))
        paths = checked_files(uri, local, files)
        models = (load_sdxl_models if sdxl else load_models)(info["model"]["id"], info["model"]["revision"])
        if "unet" in paths:  # safetensors only: never a pickle beside a missing file
            load_full_weights(uri, files, paths, models)
        widths = [e.get_input_embeddings().embedding_dim for e in models.text_encoders]
        vectors = read_embeddings(uri, info, paths["embeddings"], widths)
        pipe = models_pipeline(models)
        pipe.scheduler = bundle_scheduler(uri, info, paths, pipe.scheduler, sampler)
        pipe.to(pick_device(device))
        if "lora" in paths:
            guarded(uri, files["lora"], lambda: pipe.load_lora_weights(str(paths["lora"]), use_safetensors=True))
        encoders = [(pipe.text_encoder, pipe.tokenizer)] + ([(pipe.text_encoder_2, pipe.tokenizer_2)] if sdxl else [])
        for k, (encoder, tokenizer) in enumerate(encoders):
            guarded(uri, ", ".join(files["embeddings"]), lambda k=k, e=encoder, t=tokenizer: pipe.load_textual_inversion(
                [v[k] for v in vectors], token=info["tokens"], text_encoder=e, tokenizer=t))
    return pipe, info


def load_full_weights(uri: str, files: dict, paths: dict, models) -> None:
    """Phase 2 ``full``: the bundle's UNet and text encoder(s) in place of the base's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models.unet = guarded(uri, files["unet"], lambda: UNet2DConditionModel.from_pretrained(
        paths["unet"], use_safetensors=True))
    models.text_encoder = guarded(uri, files["text_encoder"], lambda: CLIPTextModel.from_pretrained(
        paths["text_encoder"], use_safetensors=True))
    if getattr(models, "text_encoder_2", None) is not None:
        if "text_encoder_2" not in paths:
            raise BundleError(f"{uri}: an SDXL bundle of phase 2 mode full lists no files.text_encoder_2")
        models.text_encoder_2 = guarded(uri, files["text_encoder_2"], lambda: CLIPTextModelWithProjection.from_pretrained(
            paths["text_encoder_2"], use_safetensors=True))


def load_embeddings(uri: str) -> dict[str, torch.Tensor]:
    """{file's token: vector} of every embedding file the bundle lists."""
    from safetensors.torch import load

    info = read_manifest(uri)
    out = {}
    for rel in info["files"]["embeddings"]:
        out.update(guarded(uri, rel, lambda rel=rel: load(read_bytes(join(uri, rel)))))
    return out
