"""What a diffusers model folder must hold, read without loading any weights (no torch
import): its family from ``model_index.json`` and the subfolders a load of that family
reads. ``loading`` refuses a folder with a part missing; ``check_model`` lets a batch
driver refuse it before it starts any work."""
from __future__ import annotations

import json
from pathlib import Path

from breakscene.errors import ModelLoadError
from breakscene.files.storage import describe_error, filesystem, is_remote

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
FAMILY_NAMES = {"sd": "Stable Diffusion", "sdxl": "Stable Diffusion XL"}


def index_family(index_text: str | None) -> str:
    """"sdxl" when a model_index.json's text names an SDXL pipeline, else "sd" (no index: a
    hand-made folder, which the SD 1.x/2.x check names the missing parts of)."""
    try:
        index = json.loads(index_text) if index_text else None
    except ValueError:
        index = None
    return "sdxl" if isinstance(index, dict) and index.get("_class_name") in SDXL_PIPELINES else "sd"


def folder_family(folder: Path) -> str:
    """``index_family`` of a local folder."""
    try:
        return index_family((folder / "model_index.json").read_text())
    except OSError:
        return "sd"


def check_parts(model_id: str, family: str, present: set[str]) -> None:
    """One error naming every subfolder a load of ``family`` needs that is not in ``present``."""
    missing = [p for p in (SDXL_PARTS if family == "sdxl" else SD_PARTS) if p not in present]
    if missing:
        raise ModelLoadError(f"model folder {model_id!r} is not a diffusers {FAMILY_NAMES[family]} folder: "
                             f"missing {', '.join(missing)}")


def looks_like_path(model: str) -> bool:
    """A model id no hub repository could have: a path (the hub's are ``owner/name``)."""
    return bool(Path(model).suffix) or model.startswith((".", "/", "~")) or model.count("/") > 1


def local_parts(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()}


def remote_parts(uri: str) -> tuple[set[str], str | None]:
    """(subfolder names, model_index.json's text or None) of a folder at ``uri``."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    try:
        entries = fs.ls(root, detail=True)
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] for e in entries}
        index = fs.cat_file(f"{root}/model_index.json").decode() if "model_index.json" in names else None
    except FileNotFoundError:
        raise ModelLoadError(f"model URI {uri!r} is not a folder that can be read") from None
    except Exception as exc:  # noqa: BLE001 - no credentials, timeouts, refused: said as such
        raise ModelLoadError(f"model URI {uri!r} cannot be read: {describe_error(exc)[0]}") from None
    if not names:
        raise ModelLoadError(f"model URI {uri!r} is not a folder that can be read")
    return {n for n, kind in names.items() if kind == "directory"}, index


def check_model(model: str) -> str | None:
    """The family of a model folder or URI whose parts are all there, else one
    ``ModelLoadError``; None for a preset name or hub id (the load resolves those)."""
    if is_remote(model):
        present, index = remote_parts(model)
        family = index_family(index)
        check_parts(model, family, present)
        return family
    local = Path(model.removeprefix("file://")).expanduser()
    if not local.is_dir():
        if looks_like_path(model):
            raise ModelLoadError(f"model folder {model!r} does not exist")
        return None
    from breakscene.models.presets import preset_family  # only here: it imports the model classes

    if "/" not in model and preset_family(model):
        return preset_family(model)  # a preset's name wins over a folder of that name, as in loading
    family = folder_family(local)
    check_parts(model, family, local_parts(local))
    return family
