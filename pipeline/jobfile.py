"""Reading a job file: YAML in, the validated config out (an extraction ``JobConfig``, or
the robustness study's ``StudyConfig`` for ``kind: study``), with command-line overrides.
Every problem is one BreakSceneError naming the file and the field."""
from __future__ import annotations

from pathlib import Path

from breakscene.config import read_settings_file, validate_config
from breakscene.errors import BreakSceneError

from .config import JobConfig


def load_job(path: str | Path, overrides: dict | None = None):
    """A JobConfig, or a StudyConfig for files with ``kind: study``; ``overrides`` (None
    values ignored) replace the file's settings, a ``manifest`` URI keeping its columns."""
    path = Path(path)
    data = read_settings_file(path, "job file")  # bounded: size, alias expansion, depth
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(overrides.get("manifest"), str) and isinstance(data.get("manifest"), dict):
        overrides["manifest"] = {**data["manifest"], "uri": overrides["manifest"]}  # keep the column mapping
    data.update(overrides)
    if data.get("kind") == "study":
        from robustness.grid import StudyConfig  # the study's package, only for study files

        if "force" in data:
            raise BreakSceneError(f"{path}: a study never recomputes finished cells; remove its outputs to redo them")
        flags = sorted(k for k in overrides if k not in StudyConfig.model_fields)
        if flags:  # the command line's, not the file's: say so
            names = ", ".join("--" + k.replace("_", "-") for k in flags)
            raise BreakSceneError(f"{names}: not an option of a study job ({path} has kind: study)")
        return validate_config(StudyConfig, data, str(path))
    if "kind" in data and data["kind"] != "extract":
        raise BreakSceneError(f"{path}: kind {data['kind']!r} is not a job kind: use extract (the default) or study")
    return validate_config(JobConfig, data, str(path))
