"""Reading a job file: YAML in, the validated config of its ``kind`` out, with command-line
overrides. The kinds (``extract``, ``study``) are registered by the command line, the one
layer that knows both products. Every problem is one BreakSceneError naming the file and
the field."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from breakscene.config import read_settings_file, validate_config
from breakscene.errors import BreakSceneError


def read_job(path: str | Path, overrides: dict | None, kinds: Mapping[str, Callable[[], type]]):
    """The config of the file's ``kind`` (the first of ``kinds`` when the file names none);
    ``overrides`` (None values ignored) replace the file's settings, a ``manifest`` URI
    keeping its columns. ``kinds``: kind -> a function returning its config class, called
    for the file's kind only (a study's imports stay out of an extraction's driver). A
    kind's config may list keys it refuses, with the reason (``REFUSED_KEYS``)."""
    path = Path(path)
    data = read_settings_file(path, "job file")  # bounded: size, alias expansion, depth
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(overrides.get("manifest"), str) and isinstance(data.get("manifest"), dict):
        overrides["manifest"] = {**data["manifest"], "uri": overrides["manifest"]}  # keep the column mapping
    data.update(overrides)
    default, *others = kinds
    kind = data.get("kind", default)
    if kind not in kinds:
        raise BreakSceneError(f"{path}: kind {kind!r} is not a job kind: use {default} (the default) or "
                              f"{' or '.join(others)}")
    config = kinds[kind]()
    for key, reason in getattr(config, "REFUSED_KEYS", {}).items():
        if key in data:
            raise BreakSceneError(f"{path}: {reason}")
    flags = sorted(k for k in overrides if k not in config.model_fields)
    if flags:  # the command line's, not the file's: say so
        names = ", ".join("--" + k.replace("_", "-") for k in flags)
        raise BreakSceneError(f"{names}: not an option of a {kind} job ({path} has kind: {kind})")
    return validate_config(config, data, str(path))
