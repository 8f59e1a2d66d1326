"""``breakscene submit``: send a job to a Ray cluster through the Jobs API, follow its log,
and exit with its outcome. The entrypoint is ``breakscene run`` on the same job file.

Everything that can be wrong is found before anything is sent, each as one line:
1. The runtime env: the job file's ``runtime_env`` (or ``--runtime-env FILE``, which
   replaces it as in ``ray job submit``). A relative ``working_dir`` is resolved against
   the project the file belongs to (the nearest folder above it holding
   ``pyproject.toml``, else the file's own folder), never the current directory; absent,
   it is that project. ``.venv/``, ``out/`` and ``.git/`` are always excluded; well-known
   secret files (``SECRET_EXCLUDES``) are left out unless the job names one with ``!NAME``
   in its ``excludes`` (gitignore's negation, which Ray's packaging reads too), and the
   files left out are named in one stderr line.
2. The upload: the files Ray would package (excludes, ``.gitignore``, ``.rayignore``,
   matched as Ray matches them) must fit the stated limit.
3. The address (``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``) and
   the token (found as Ray's own client finds it, see ``find_auth_token``).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from breakscene.config import StrictModel, read_settings_file  # StrictModel: a job of any kind
from breakscene.errors import BreakSceneError


TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ALWAYS_EXCLUDE = (".venv/", "out/", ".git/")
# Files that hold credentials, named as the tools that write them name them (gitignore
# patterns, at any depth). They go first in ``excludes`` so that a job's own ``!NAME``
# (later, so it wins) deliberately sends one. No negation here: a ``!`` makes the size
# check walk excluded folders (see upload_files), so only a job that asks pays for it.
SECRET_EXCLUDES = (
    ".env", ".env.*",  # dotenv: API keys by convention
    ".ssh/", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",  # SSH keys, wherever copied
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk", ".gnupg/",  # private keys, key stores
    ".aws/", ".azure/", "**/.config/gcloud/", "application_default_credentials.json", "credentials.json",
    ".s3cfg", ".boto",  # cloud CLIs (s3fs and boto read .aws/)
    "**/.kube/config", "**/.docker/config.json", "**/.ray/auth_token", ".vault-token",  # clusters, registries
    "**/huggingface/token", "**/.huggingface/token", "kaggle.json",  # model and data hubs
    ".npmrc", ".pypirc", "**/.cargo/credentials*", "**/.gem/credentials", "**/.config/gh/hosts.yml",
    ".netrc", "_netrc", ".git-credentials",  # package indexes, git hosts (.netrc: also wandb's key)
    ".pgpass", ".my.cnf",  # database passwords
)
SHOWN_WITHHELD = 30  # files named in the stderr line; the rest counted
# Ray refuses packages over its gRPC message size (512 MiB) only after zipping and
# uploading; a project's code and job files are a few MiB, so far less means a mistake.
DEFAULT_MAX_UPLOAD_MIB = 100.0
SUBMIT_TRIES = 5  # 1 + 2 + 4 + 8 s of waiting for a just-started cluster's job agent
MIB = 1024 * 1024


def entrypoint(job_file: str, manifest: str | None, output: str | None, force: bool) -> str:
    parts = ["breakscene", "run", job_file]
    if manifest:
        parts += ["--manifest", manifest]
    if output:
        parts += ["--output", output]
    if force:
        parts.append("--force")
    return shlex.join(parts)


# 1. the runtime env

def project_root(path: str | Path) -> Path:
    """The project a job (or runtime env) file belongs to: the nearest folder above it
    holding pyproject.toml, else the file's own folder."""
    folder = Path(path).resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return folder


def resolve_runtime_env(runtime_env: dict, base: Path) -> dict:
    """``runtime_env`` with ``working_dir`` absolute (relative ones against ``base``; a
    remote URI as it is) and the always-excluded folders added to ``excludes``."""
    env = dict(runtime_env)
    wd = env.get("working_dir")
    if wd is None or "://" not in str(wd):
        folder = (base / Path(str(wd if wd is not None else ".")).expanduser()).resolve()
        if not folder.is_dir():
            raise BreakSceneError(f"runtime_env.working_dir {wd!r} is not a folder (resolved against {base}: {folder})")
        env["working_dir"] = str(folder)
    excludes = env.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise BreakSceneError("runtime_env.excludes must be a list of patterns (as in .gitignore)")
    env["excludes"] = list(SECRET_EXCLUDES) + list(excludes) + [e for e in ALWAYS_EXCLUDE if e not in excludes]
    return env


def read_runtime_env_file(path: str) -> dict:
    """A runtime_env YAML file, as ``ray job submit --runtime-env`` reads it (with the job
    files' bounds: size, alias expansion, depth)."""
    return read_settings_file(path, "--runtime-env")


def job_runtime_env(job: StrictModel, job_file: str, runtime_env_file: str | None = None) -> dict:
    """The job file's runtime_env, or the one ``--runtime-env`` names (its relative
    working_dir against its own project; without one, the job's project)."""
    if runtime_env_file:
        env = read_runtime_env_file(runtime_env_file)
        base = project_root(runtime_env_file if "working_dir" in env else job_file)
        return resolve_runtime_env(env, base)
    return resolve_runtime_env(job.runtime_env, project_root(job_file))


# 2. the upload

def upload_files(working_dir: str | Path, excludes: list[str]) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file Ray would package from ``working_dir``:
    ``excludes`` matched from the top, each folder's ``.gitignore`` (unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and ``.rayignore`` from that folder, all with
    gitignore rules (pathspec's gitwildmatch, as Ray's packaging uses). As in Ray, a
    folder is skipped when its path matches, and a file when its path does; a folder
    that only ``dir/`` matches is skipped whole only when no ``!`` pattern could take a
    file in it back (the same files, without walking ``.venv/``)."""
    from pathspec import PathSpec

    root = Path(working_dir)
    use_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    specs = [(root, PathSpec.from_lines("gitwildmatch", excludes))]
    found: list[tuple[str, int]] = []

    def ignored(path: Path, is_dir: bool) -> bool:
        for folder, spec in specs:
            rel = path.relative_to(folder).as_posix()
            if spec.match_file(rel) or (is_dir and spec.match_file(rel + "/") and not has_negation(spec)):
                return True
        return False

    def walk(folder: Path) -> None:
        added = 0
        for name in (".gitignore", ".rayignore") if use_gitignore else (".rayignore",):
            if (folder / name).is_file():
                specs.append((folder, PathSpec.from_lines("gitwildmatch", (folder / name).read_text().splitlines())))
                added += 1
        for entry in sorted(folder.iterdir()):
            is_dir = entry.is_dir() and not entry.is_symlink()
            if ignored(entry, is_dir):
                continue
            if is_dir:
                walk(entry)
            elif entry.is_file():
                found.append((entry.relative_to(root).as_posix(), entry.stat().st_size))
        del specs[len(specs) - added:]

    walk(root)
    return found


def has_negation(spec) -> bool:
    return any(pattern.include is False for pattern in spec.patterns)


def withheld_secrets(runtime_env: dict) -> list[str]:
    """The files of a local working_dir that only ``SECRET_EXCLUDES`` keeps out of the upload
    (those the job sends back with ``!NAME`` are not among them)."""
    wd = runtime_env.get("working_dir")
    if not wd or "://" in wd:
        return []
    excludes = runtime_env.get("excludes") or []
    sent = {rel for rel, _ in upload_files(wd, excludes)}
    without = upload_files(wd, [e for e in excludes if e not in SECRET_EXCLUDES])
    return [rel for rel, _ in without if rel not in sent]


def withheld_line(files: list[str]) -> str:
    shown = ", ".join(files[:SHOWN_WITHHELD]) + (f" and {len(files) - SHOWN_WITHHELD} more"
                                                  if len(files) > SHOWN_WITHHELD else "")
    return (f"submit: {len(files)} secret file(s) left out of the upload (send one deliberately with '!NAME' in "
            f"runtime_env.excludes): {shown}")


def check_upload(runtime_env: dict, max_bytes: float) -> tuple[int, int]:
    """(files, bytes) the working_dir would upload; BreakSceneError when over the limit,
    naming the largest entries so that the fix (an exclude) is obvious."""
    wd = runtime_env.get("working_dir")
    if not wd or "://" in wd:
        return 0, 0
    files = upload_files(wd, runtime_env.get("excludes") or [])
    total = sum(size for _, size in files)
    if total > max_bytes:
        per_top: dict[str, int] = {}
        for rel, size in files:
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            per_top[top] = per_top.get(top, 0) + size
        largest = sorted(per_top.items(), key=lambda kv: -kv[1])[:3]
        raise BreakSceneError(
            f"runtime_env.working_dir {wd} would upload {total / MIB:.1f} MiB in {len(files)} files, over the "
            f"{max_bytes / MIB:g} MiB limit (--max-upload-mib); largest: "
            + ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in largest)
            + "; add them to runtime_env.excludes or point working_dir at the project")
    return len(files), total


# 3. address and token

def resolve_address(flag: str | None, environ=os.environ) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (Ray's CLI reads the same
    two; there the environment beats the flag, here the explicit flag wins)."""
    return flag or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def find_auth_token(environ=os.environ) -> tuple[str | None, str]:
    """(token, where it came from), looked up in the order of Ray's own loader
    (src/ray/rpc/authentication/authentication_token_loader.cc): RAY_AUTH_TOKEN; the
    first line of the file RAY_AUTH_TOKEN_PATH names (set but unreadable or empty is an
    error, as in Ray); $HOME/.ray/auth_token. Whitespace is trimmed. (None, "") when
    there is none: the cluster may not use tokens."""
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        token = _first_line(Path(path))
        if not token:
            raise BreakSceneError(f"RAY_AUTH_TOKEN_PATH is set but {path} cannot be read or is empty")
        return token, path
    home = environ.get("HOME")
    default = Path(home if home else ".") / ".ray" / "auth_token"
    token = _first_line(default)
    return (token, str(default)) if token else (None, "")


def _first_line(path: Path) -> str:
    try:
        with path.open() as fh:
            return fh.readline().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def _address_env_hidden():
    """JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address
    it is given; hide them while it is built so that the resolved one is used."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    token, _ = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _address_env_hidden():
            return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - connection problems of every kind
        raise BreakSceneError(f"cannot reach the Ray Jobs API at {address}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:600] + ("..." if len(text) > 600 else "")


# 4. submit and follow

def submit(job: StrictModel, job_file: str, address: str | None, wait: bool, *, manifest: str | None = None,
           output: str | None = None, force: bool = False, submission_id: str | None = None,
           runtime_env_file: str | None = None, max_upload_mib: float = DEFAULT_MAX_UPLOAD_MIB) -> int:
    if not max_upload_mib > 0:
        raise BreakSceneError(f"--max-upload-mib {max_upload_mib:g} must be above 0")
    env = job_runtime_env(job, job_file, runtime_env_file)
    n_files, n_bytes = check_upload(env, max_upload_mib * MIB)
    job_path = Path(job_file).resolve()
    if "://" in env["working_dir"]:
        rel = job_file  # a packaged working_dir: the job file is named as given, relative to it
    else:
        try:
            rel = job_path.relative_to(env["working_dir"]).as_posix()
        except ValueError:
            raise BreakSceneError(f"job file {job_file} is outside runtime_env.working_dir {env['working_dir']}: "
                                  "the cluster could not read it") from None
    withheld = withheld_secrets(env)
    if withheld:  # after every check: a refused job prints its one error line only
        print(withheld_line(withheld), file=sys.stderr, flush=True)
    address = resolve_address(address)
    client = connect(address)
    for attempt in range(SUBMIT_TRIES):
        try:
            job_id = client.submit_job(entrypoint=entrypoint(rel, manifest, output, force), runtime_env=env,
                                       submission_id=submission_id, metadata={"job": job.name})
            break
        except Exception as exc:  # noqa: BLE001 - HTTP errors (401, 409, 413, ...) arrive as RuntimeError
            # a cluster that has just started answers 500 "No available agent ..., try again later"
            if "try again later" in str(exc) and attempt + 1 < SUBMIT_TRIES:
                time.sleep(2 ** attempt)
                continue
            raise BreakSceneError(f"the Jobs API at {address} refused the job: {_one_line(exc)}") from None
    print(f"submitted {job_id} to {address} ({n_files} files, {n_bytes / MIB:.1f} MiB from {env['working_dir']})",
          flush=True)
    if not wait:
        return 0
    follow_logs(client, job_id)
    return job_exit_status(client, job_id)


def follow_logs(client, job_id: str, out=sys.stdout) -> None:
    """Stream the job's log as the driver writes it (Ray's tail_job_logs websocket); it
    ends when the job does."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - a dropped connection: the status still tells the outcome
        print(f"(log stream ended: {_one_line(exc)})", file=sys.stderr, flush=True)


def job_exit_status(client, job_id: str, poll_seconds: float = 2.0) -> int:
    """Wait for the job to end; its exit status (``exit_status``)."""
    while True:
        info = client.get_job_info(job_id)
        status = str(info.status).split(".")[-1]
        if status in TERMINAL:
            break
        time.sleep(poll_seconds)
    why = (info.message or "").split(", last available logs")[0]  # the log was streamed already
    print(f"job {job_id}: {status}" + (f" ({why})" if status != "SUCCEEDED" and why else ""), flush=True)
    return exit_status(status, info.message, getattr(info, "driver_exit_code", None))


def exit_status(status: str, message: str | None, driver_exit_code: int | None = None) -> int:
    """0 when the job succeeded; the entrypoint's own 2, 3 or 4 (bad input, too many failed
    rows, an output that stopped taking writes) when Ray reports it (JobInfo.driver_exit_code,
    else its message); else 1."""
    if status == "SUCCEEDED":
        return 0
    if driver_exit_code is None:
        found = re.search(r"exit code (\d+)", message or "")
        driver_exit_code = int(found.group(1)) if found else None
    return driver_exit_code if driver_exit_code in (2, 3, 4) else 1
