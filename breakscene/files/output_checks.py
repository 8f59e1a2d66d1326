"""Checks on an output location, made before any model is loaded: it can be written, it is
not one of the inputs, and it holds nothing the project did not write (which would be lost
when the output is replaced). Each failure is an ``OutputError`` naming the location."""
from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from breakscene.errors import OutputError, StorageError
from breakscene.files.storage import describe_error, exists, filesystem, folder_state, is_remote, join, refuse_foreign


def _local(uri: str) -> Path:
    return Path(filesystem(uri)[1]).expanduser().resolve()


def check_plain_prefix(uri: str, *, what: str = "--out") -> None:
    """Refuse a remote URI with a '.', '..' or empty segment: an object store keeps such a
    key literally while other clients (delta-rs) normalise it, so one output would be split
    in two places. A local path is resolved once by the operating system and stays allowed."""
    if not is_remote(uri):
        return
    segments = uri.split("://", 1)[1].rstrip("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise OutputError(f"{what} {uri} has a '.', '..' or empty path segment: object stores keep it literally "
                          "while other clients normalise it; write the prefix without it")


def check_not_an_input(out: str, inputs: list[str], *, what: str = "--out") -> None:
    """Refuse an output equal to, inside, or holding one of the (local) inputs."""
    if is_remote(out):
        for src in inputs:
            if src and is_remote(src) and (src.rstrip("/") + "/").startswith(out.rstrip("/") + "/"):
                raise OutputError(f"{what} {out} holds the input {src}: writing there would replace it")
        return
    target = _local(out)
    for src in inputs:
        if not src or is_remote(src):
            continue
        path = _local(src)
        if target == path or path in target.parents:
            raise OutputError(f"{what} {out} is inside the input {src}: choose an output outside the inputs")
        if target in path.parents:
            raise OutputError(f"{what} {out} holds the input {src}: writing there would replace it")


def check_writable(uri: str, *, what: str = "--out", inside: bool = False) -> None:
    """Prove that ``uri`` can be written by making (and removing) a probe; nothing is left
    behind. ``inside``: files go into the folder (a pipeline output); else the folder is
    created and renamed into place beside its siblings (a bundle)."""
    if is_remote(uri):
        fs, root = filesystem(uri)
        probe = f"{root.rstrip('/')}/.breakscene-probe-{uuid.uuid4().hex[:8]}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - named below
            raise OutputError(f"{what} {uri} cannot be written: {describe_error(exc)[0]}") from None
        return
    target = _local(uri)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {uri} is a file, not a folder")
    # a bundle's parent receives the temporary folder and the final rename
    anchor = target if inside and target.exists() else target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"{what} {uri} cannot be created: {anchor} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".breakscene-probe-", dir=anchor)).rmdir()
    except OSError as exc:
        raise OutputError(f"{what} {uri} cannot be written: {exc.strerror or exc} ({anchor})") from None


def check_output_file(uri: str, *, replace: bool = False, what: str = "--out") -> None:
    """Refuse to replace an existing file unless asked (``replace``), and a folder always:
    a file the user already has is theirs, not ours."""
    check_plain_prefix(uri, what=what)
    if not is_remote(uri) and _local(uri).is_dir():
        raise OutputError(f"{what} {uri} is a folder; name the file to write")
    if exists(uri) and not replace:
        raise OutputError(f"{what} {uri} already exists; pass --force to replace it")


def check_output_dir(uri: str, *, marker: str, inputs: list[str] = (), replace: bool = False,
                     what: str = "--out") -> None:
    """All checks for a folder that will be written whole (a bundle): not an input, not a
    file, not a folder of someone else's files, not an existing result unless ``replace``,
    and writable."""
    check_plain_prefix(uri, what=what)
    check_not_an_input(uri, list(inputs), what=what)
    try:
        state = folder_state(uri, marker)
    except StorageError as exc:
        raise OutputError(f"{what} {exc}") from None
    try:
        refuse_foreign(uri, state, marker)
    except OutputError as exc:
        raise OutputError(f"{what} {exc}") from None
    if state == "ours" and not replace and exists(join(uri, marker)):  # a cut-short upload is replaced freely
        raise OutputError(f"{uri} already holds a bundle; pass --force to replace it")
    check_writable(uri, what=what)
