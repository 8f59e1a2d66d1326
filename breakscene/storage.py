"""Paths and URIs through fsspec, with atomic commits.

A local folder is committed by renaming a finished temporary folder into place. An
object store has no atomic folder rename, so a folder is uploaded file by file with its
marker file (e.g. ``bundle.json``) put last: a folder without its marker is incomplete,
is never read as a result, and is cleared by the next attempt.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(uri: str):
    """(fs, path) for a URI or local path."""
    return fsspec.core.url_to_fs(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file atomically: a temporary name then rename (local), a single put (remote)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def atomic_local_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(local_dir: Path, uri: str, marker: str) -> None:
    """Commit a finished local folder to ``uri`` so that ``marker`` appears last."""
    local_dir = Path(local_dir)
    if not (local_dir / marker).is_file():
        raise ValueError(f"{local_dir} has no {marker}: refusing to publish an unfinished folder")
    if not is_remote(uri):
        target = Path(filesystem(uri)[1])
        with atomic_local_dir(target) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return
    fs, root = filesystem(uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)  # a partial folder from an earlier, interrupted attempt
    try:
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != marker):
            fs.put_file(str(file), f"{root}/{file.relative_to(local_dir).as_posix()}")
        fs.put_file(str(local_dir / marker), f"{root}/{marker}")
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(root, recursive=True)
        raise


def fetch_dir(uri: str, local_dir: Path) -> Path:
    """Make a folder readable locally: the path itself, or a download of a remote one."""
    if not is_remote(uri):
        return Path(filesystem(uri)[1])
    fs, root = filesystem(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(root.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir


def configure(options: dict[str, dict]) -> None:
    """Default fsspec options per protocol for this process (e.g. an S3 endpoint)."""
    for protocol, opts in (options or {}).items():
        fsspec.config.conf.setdefault(protocol, {}).update(opts)
