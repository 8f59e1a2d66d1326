"""One run at a time per output: a lease object ``OUT/_lease.json``.

A run creates the lease with a conditional create (local files: ``O_CREAT | O_EXCL``;
object stores: a put with ``If-None-Match: *`` through s3fs' ``mode="create"``, which AWS
S3 and moto honour), renews its expiry from a background thread while it runs, and
deletes it at the end. A second run finds the lease held and stops with one message
naming the holder and the expiry. A crashed run stops renewing, so its lease expires
(``ttl_s``, default 10 minutes) and the next run takes it over; a lease whose holder was
a process of the same machine that is gone (a killed driver) is taken over at once.

Taking over an expired lease is delete-then-conditional-create: two runs racing for the
same expired lease cannot both create it. On a local disk every change to the lease is
made under an exclusive ``flock`` of the output folder, so no contender sees it half
written or takes it over between another's read and write. Renewal rewrites the lease only after
checking that it is still ours (a stalled run taken over stops renewing); a lease file of
another shape counts as held until ``ttl_s`` after its last change. On a store without
conditional puts the create is best effort (documented).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time

from breakscene.errors import BreakSceneError
from breakscene.files.storage import filesystem, is_remote, join, write_bytes
from breakscene.files.strictjson import to_json

log = logging.getLogger(__name__)
LEASE = "_lease.json"
DEFAULT_TTL_S = 600.0


class LeaseHeld(BreakSceneError):
    pass


def lease_uri(out: str) -> str:
    return join(out, LEASE)


def _create(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if it does not exist; False if it does. Local files: the caller
    holds ``_guard``; the lease is written whole under a temporary name, then renamed (a
    full disk fails before any lease exists)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        if os.path.lexists(path):
            return False
        write_bytes(uri, data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # 412 Precondition Failed without its condition named
            return False
        raise
    except (TypeError, ValueError, NotImplementedError):  # a store without conditional puts: best effort
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    return True


def read_lease(out: str, ttl_s: float = DEFAULT_TTL_S) -> dict | None:
    """The lease's holder, host, pid and expiry; None when there is none. A lease that is
    not one this project writes (damaged, another shape) is held until ``ttl_s`` after its
    last change, then expired: never a crash, never taken over at once."""
    fs, path = filesystem(lease_uri(out))
    try:
        with fs.open(path, "rb") as fh:
            lease = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        lease = None
    if _well_formed(lease):
        return lease
    return {"holder": "an unreadable lease", "host": None, "pid": None, "expires_at": _changed_at(fs, path) + ttl_s}


def _well_formed(lease) -> bool:
    return (isinstance(lease, dict) and isinstance(lease.get("holder"), str)
            and isinstance(lease.get("expires_at"), (int, float)) and not isinstance(lease.get("expires_at"), bool)
            and (lease.get("pid") is None or isinstance(lease.get("pid"), int)))


def _changed_at(fs, path: str) -> float:
    try:
        modified = fs.modified(path)
    except (FileNotFoundError, NotImplementedError, OSError):
        return time.time()
    return modified.timestamp() if hasattr(modified, "timestamp") else float(modified)


def _dead_here(lease: dict) -> bool:
    """A lease held by a process of this machine that no longer exists (a killed run):
    stale at once, without waiting for its expiry."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def _guard(uri: str):
    """Local outputs: every change to the lease (create, take over, renew, release) happens
    under an exclusive ``flock`` of the output folder, so read-check-write is one step.
    Object stores rely on the conditional create instead."""
    if is_remote(uri):
        yield
        return
    _, path = filesystem(uri)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # the output folder itself: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _held_message(out: str, uri: str, current: dict) -> str:
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current["expires_at"]))
    return (f"output {out} is in use by run {current.get('holder')} (host {current.get('host')}, pid "
            f"{current.get('pid')}) until {expires} ({uri}); wait for it, or delete the lease if that run is gone")


class Lease:
    """``with Lease(out, holder):`` holds the output for the block, or raises LeaseHeld."""

    def __init__(self, out: str, holder: str, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.out, self.holder, self.ttl_s = out, holder, ttl_s
        self.uri = lease_uri(out)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return to_json({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl_s}).encode()

    def acquire(self) -> None:
        with _guard(self.uri):
            self._take()
        self._thread = threading.Thread(target=self._renew, name="lease-renew", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        for _ in range(3):
            if _create(self.uri, self._body()):
                self._verify()
                return
            current = read_lease(self.out, self.ttl_s)
            if current is None:
                continue  # released in between
            if current["expires_at"] > time.time() and not _dead_here(current):
                raise LeaseHeld(_held_message(self.out, self.uri, current))
            fs, path = filesystem(self.uri)  # expired: a crashed run's lease is taken over
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        raise LeaseHeld(f"output {self.out}: could not take the lease {self.uri}")

    def _verify(self) -> None:
        current = read_lease(self.out, self.ttl_s)
        if current is None or current.get("holder") != self.holder:
            raise LeaseHeld(f"output {self.out} was taken by run {current and current.get('holder')} at the same time")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseHeld as exc:
                log.error("%s", exc)
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - the next renewal retries; expiry is the safety net
                pass

    def renew(self) -> None:
        """Push the expiry on, only while the lease is still ours (a run that stalled past
        its expiry may have been taken over: it must not overwrite the new holder's lease)."""
        with _guard(self.uri):
            current = read_lease(self.out, self.ttl_s)
            if current is None or current.get("holder") != self.holder:
                raise LeaseHeld(f"output {self.out}: the lease was taken over by "
                                f"{current and current.get('holder')}; this run no longer holds it")
            write_bytes(self.uri, self._body())  # atomic: a reader never sees half a lease

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with _guard(self.uri):
                current = read_lease(self.out, self.ttl_s)
                if current is not None and current.get("holder") == self.holder:
                    fs, path = filesystem(self.uri)
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm(path)
        except OSError as exc:  # a read-only remount: the lease expires, or is taken over at once here
            log.info("the lease %s could not be removed (%s); it expires at its time, and a run "
                        "on this host takes it over at once", self.uri, exc)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
