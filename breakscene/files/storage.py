"""Paths and URIs through fsspec, with atomic commits, timeouts and bounded retries.

A local folder is committed by renaming a finished temporary folder into place. An
object store has no atomic folder rename, so a folder is uploaded file by file: a small
``PARTIAL`` object first (so that an interrupted upload is recognisably ours), then the
files, then its marker file (e.g. ``bundle.json``), and ``PARTIAL`` is removed last. A
folder without its marker is incomplete and never read as a result. Only a folder that
holds the marker or ``PARTIAL`` is ever replaced: what the project did not write is never
deleted.

Every remote call has connect and read timeouts and a bounded retry with backoff
(``DEFAULT_TIMEOUT_S`` / ``DEFAULT_RETRIES``; ``BREAKSCENE_IO_TIMEOUT_S`` /
``BREAKSCENE_IO_RETRIES`` in the environment, or ``configure(timeout_s=, retries=)``
from a job file). A remote failure is a ``StorageError`` naming the URI and what happened.

S3's endpoint, region and credentials are resolved in one place (``s3_settings``: the job's
options, then the AWS environment, profile and instance credentials, as botocore finds them)
and handed to every client: s3fs here, delta-rs through ``pipeline.tables.delta_options``.
A folder committed locally gets the process's normal modes (0777 / 0666 less the umask).
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import fsspec

from breakscene.errors import BreakSceneError, OutputError, StorageError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0  # per request: connecting, and each wait for data
DEFAULT_RETRIES = 2  # attempts after the first, for timeouts, refused connections and 5xx
BACKOFF_S = 0.5  # waits 0.5 s, 1 s, 2 s, ... between attempts
PARTIAL = ".breakscene-partial"  # written first into a remote folder being uploaded, removed last
S3_PROTOCOLS = ("s3", "s3a")
_IO: dict = {"timeout_s": None, "retries": None}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def io_settings() -> tuple[float, int]:
    """(timeout in seconds, retries): ``configure``'s, else the environment's, else the defaults."""
    values = []
    for key, env, default, kind in (("timeout_s", "BREAKSCENE_IO_TIMEOUT_S", DEFAULT_TIMEOUT_S, float),
                                    ("retries", "BREAKSCENE_IO_RETRIES", DEFAULT_RETRIES, int)):
        value = _IO[key]
        if value is None:
            raw = os.environ.get(env, "")
            try:
                value = kind(raw) if raw else default
            except ValueError:
                raise BreakSceneError(f"{env}={raw!r} is not a number") from None
        values.append(value)
    timeout, retries = values
    if timeout <= 0 or retries < 0:
        raise BreakSceneError(f"storage timeout must be > 0 and retries >= 0 (got {timeout}, {retries})")
    return float(timeout), int(retries)


def protocol_options(protocol: str, timeout: float, retries: int) -> dict:
    """The fsspec options that bound a request's time for one protocol."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                   sock_read=timeout)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": retries + 1, "mode": "standard"}}}
    return {}  # other protocols: their own defaults; the retries of ``_remote`` still apply


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@functools.lru_cache(maxsize=16)
def _cached_session(profile: str | None, environment: tuple):
    """botocore's session for a profile and an AWS environment (``environment`` only keys
    the cache): it reads the config and credentials files once, and refreshes expiring
    credentials (instance, container, SSO) itself."""
    import botocore.session

    return botocore.session.Session(profile=profile)


def _aws_session(profile: str | None):
    return _cached_session(profile, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


def s3_settings(*, credentials: bool = False) -> dict:
    """The S3 endpoint, region (and with ``credentials``, keys) of this process, found once
    for every client (s3fs, delta-rs, the lease): the job's storage options first, then
    where the AWS SDKs look (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_REGION,
    AWS_DEFAULT_REGION, AWS_PROFILE and its files, instance or container credentials)."""
    from botocore.configprovider import ConfiguredEndpointProvider
    from botocore.exceptions import ProfileNotFound

    conf = fsspec.config.conf.get("s3", {})
    client = conf.get("client_kwargs") or {}
    session = _aws_session(conf.get("profile"))
    try:
        configured = ConfiguredEndpointProvider(full_config=session.full_config,
                                                scoped_config=session.get_scoped_config(), client_name="s3")
    except ProfileNotFound as exc:  # a typo in AWS_PROFILE or the job's "profile"
        raise StorageError(f"S3 settings cannot be read: {exc}") from None
    found = {"endpoint_url": client.get("endpoint_url") or conf.get("endpoint_url") or configured.provide(),
             "region": (client.get("region_name") or os.environ.get("AWS_REGION")
                        or session.get_config_variable("region")),
             "anon": bool(conf.get("anon"))}
    if credentials and not found["anon"]:
        found.update(s3_credentials(conf, client, session))
    return found


def s3_credentials(conf: dict, client: dict, session) -> dict:
    """Keys named in the job's options, else the ones botocore finds now (current even
    when they rotate: instance and container credentials are refreshed by botocore)."""
    if conf.get("key") or client.get("aws_access_key_id"):
        return {"key": conf.get("key") or client.get("aws_access_key_id"),
                "secret": conf.get("secret") or client.get("aws_secret_access_key"),
                "token": conf.get("token") or client.get("aws_session_token")}
    found = session.get_credentials()
    if found is None:
        return {}
    frozen = found.get_frozen_credentials()
    return {"key": frozen.access_key, "secret": frozen.secret_key, "token": frozen.token}


def s3fs_defaults() -> dict:
    """The endpoint and region of ``s3_settings`` as s3fs options: botocore would find the
    endpoint itself, but not AWS_REGION, which delta-rs reads; given here, both agree."""
    found = s3_settings()
    client = {k: found[ours] for k, ours in (("endpoint_url", "endpoint_url"), ("region_name", "region"))
              if found[ours]}
    return {"client_kwargs": client} if client else {}


def filesystem(uri: str):
    """(fs, path) for a URI or local path, with this process's timeouts for remote protocols
    (options given to ``configure`` win over the defaults, key by key) and, for S3, the
    endpoint and region every other client uses (``s3_settings``)."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    if "::" in uri or protocol in ("file", "local", "memory"):
        return fsspec.core.url_to_fs(uri)
    timeout, retries = io_settings()
    options = protocol_options(protocol, timeout, retries)
    if protocol in S3_PROTOCOLS:
        options = _merge(options, s3fs_defaults())
    options = _merge(options, fsspec.config.conf.get("s3" if protocol in S3_PROTOCOLS else protocol, {}))
    return fsspec.core.url_to_fs(uri, **options)


_NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, BreakSceneError)


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(what happened in words, whether another attempt may succeed) for a remote failure."""
    timeout, _ = io_settings()
    name = type(exc).__name__
    status = getattr(exc, "status", None)
    if isinstance(status, int):  # aiohttp.ClientResponseError
        return f"HTTP {status} {getattr(exc, 'message', '') or ''}".strip(), status >= 500 or status == 429
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return f"timed out: no answer within {timeout:g} s", True
    if name == "NoCredentialsError" or ("credentials" in str(exc) and "Unable to locate" in str(exc)):
        return ("no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS profile, or "
                "key/secret in the storage options)"), False
    if isinstance(exc, ConnectionRefusedError) or "Connect" in name or "connect" in str(exc).lower():
        return f"cannot connect ({str(exc).splitlines()[0][:200] or name})", True
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{name}: {text}" if text else name, isinstance(exc, ConnectionError)


def _remote(uri: str, verb: str, call: Callable[[], T]) -> T:
    """Run one remote call with bounded retries; errors that name a missing or forbidden
    file pass through, every other failure becomes a StorageError naming ``uri``."""
    _, retries = io_settings()
    for attempt in range(retries + 1):
        try:
            return call()
        except _NOT_TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            reason, transient = describe_error(exc)
            if not transient or attempt == retries:
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                raise StorageError(f"{uri} cannot be {verb}: {reason}{tries}") from None
        time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return fs.exists(path)
    return _remote(uri, "checked", lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    """The whole file. Missing: FileNotFoundError; any other remote failure: StorageError."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return fs.cat_file(path)
    return _remote(uri, "read", lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file atomically: a temporary name then rename (local), a single put (remote)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        _remote(uri, "written", lambda: fs.pipe_file(path, data))
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


def folder_state(uri: str, marker: str) -> str:
    """What is at a folder location: "absent" (nothing, or an empty folder), "ours" (it holds
    ``marker``, or is a remote upload of ours cut short: it holds ``PARTIAL``), "file", or
    "foreign" (a folder holding other things: never to be replaced)."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    if not is_remote(uri):
        path = Path(root)
        if not path.exists():
            return "absent"
        if not path.is_dir():
            return "file"
        if (path / marker).is_file():
            return "ours"
        return "foreign" if any(path.iterdir()) else "absent"

    def state() -> str:
        fs.invalidate_cache()
        if fs.exists(f"{root}/{marker}") or fs.exists(f"{root}/{PARTIAL}"):
            return "ours"
        if not fs.exists(root):
            return "absent"
        return "file" if fs.isfile(root) else ("foreign" if fs.find(root) else "absent")

    return _remote(uri, "checked", state)


def refuse_foreign(uri: str, state: str, marker: str) -> None:
    if state == "file":
        raise OutputError(f"{uri} is a file, not a folder: refusing to replace it")
    if state == "foreign":
        raise OutputError(f"{uri} holds files that this project did not write (no {marker}): refusing to "
                          "replace it; choose a new or empty folder")


def give_normal_modes(root: Path, folder_mode: int) -> None:
    """Set every folder under ``root`` to ``folder_mode`` (what mkdir makes here: 0777 less
    the umask) and every file to the same less the execute bits unless it had them:
    temporary folders are 0700 and some writers (safetensors) make 0600 files, which
    would hide a shared output from its other readers."""
    file_mode = folder_mode & 0o666
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, folder_mode)
        else:
            os.chmod(path, folder_mode & 0o777 if path.stat().st_mode & 0o111 else file_mode)


@contextlib.contextmanager
def atomic_local_dir(target: Path, *, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename,
    with the process's normal modes (``give_normal_modes``). An existing ``target`` is
    replaced only when it is empty or holds ``marker`` (what this project wrote): anything
    else there is the user's and is never deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    refuse_foreign(str(target), folder_state(str(target), marker or PARTIAL), marker or "marker file")
    tmp.mkdir()
    folder_mode = stat.S_IMODE(tmp.stat().st_mode)  # the umask, read without changing it (os.umask would)
    try:
        yield tmp
        give_normal_modes(tmp, folder_mode)
        state = folder_state(str(target), marker or PARTIAL)
        refuse_foreign(str(target), state, marker or "marker file")  # it may have changed meanwhile
        if state == "ours":
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()  # empty
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(local_dir: Path, uri: str, marker: str) -> None:
    """Commit a finished local folder to ``uri`` so that ``marker`` appears last. Whatever is
    at ``uri`` is replaced only if this project wrote it (it holds ``marker`` or ``PARTIAL``)."""
    local_dir = Path(local_dir)
    if not (local_dir / marker).is_file():
        raise ValueError(f"{local_dir} has no {marker}: refusing to publish an unfinished folder")
    if not is_remote(uri):
        target = Path(filesystem(uri)[1])
        with atomic_local_dir(target, marker=marker) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return
    state = folder_state(uri, marker)
    refuse_foreign(uri, state, marker)
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    try:
        fs.pipe_file(f"{root}/{PARTIAL}", b"upload in progress; removed when the folder is complete\n")
        if state == "ours":  # the old marker goes first: from here on the folder reads as incomplete
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{marker}")
            fs.invalidate_cache()
            for path in fs.find(root):
                if not path.endswith(f"/{PARTIAL}"):
                    fs.rm_file(path)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != marker):
            fs.put_file(str(file), f"{root}/{file.relative_to(local_dir).as_posix()}")
        fs.put_file(str(local_dir / marker), f"{root}/{marker}")
        fs.rm_file(f"{root}/{PARTIAL}")
    except BaseException as exc:
        with contextlib.suppress(Exception):
            fs.rm(root, recursive=True)  # ours: PARTIAL was written before anything else
        if isinstance(exc, Exception) and not isinstance(exc, BreakSceneError):
            raise StorageError(f"{uri} cannot be written: {describe_error(exc)[0]}") from exc
        raise


def fetch_dir(uri: str, local_dir: Path) -> Path:
    """Make a folder readable locally: the path itself, or a download of a remote one."""
    if not is_remote(uri):
        return Path(filesystem(uri)[1])
    fs, root = filesystem(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(root.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir


def reset_io_settings() -> None:
    """Forget ``configure``'s timeout and retries (the environment's or the defaults apply again)."""
    _IO["timeout_s"] = _IO["retries"] = None


def configure(options: dict[str, dict] | None, *, timeout_s: float | None = None,
              retries: int | None = None) -> None:
    """Default fsspec options per protocol for this process (e.g. an S3 endpoint), and the
    timeout and retries of every remote call (None keeps the environment's or the default)."""
    for protocol, opts in (options or {}).items():
        fsspec.config.conf.setdefault(protocol, {}).update(opts)
    if timeout_s is not None:
        _IO["timeout_s"] = float(timeout_s)
    if retries is not None:
        _IO["retries"] = int(retries)
