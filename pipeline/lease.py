"""One run at a time per output: a lease object ``OUT/_lease.json``.

A run creates the lease with a conditional create (local files: ``O_CREAT | O_EXCL``;
object stores: a put with ``If-None-Match: *`` through s3fs' ``mode="create"``, which AWS
S3 and moto honour), renews its expiry from a background thread while it runs, and
deletes it at the end. A second run finds the lease held and stops with one message
naming the holder and the expiry. A crashed run stops renewing, so its lease expires
(``ttl_s``, default 10 minutes) and the next run takes it over; a lease whose holder was
a process of the same machine that is gone (a killed driver) is taken over at once.

Taking over an expired lease is delete-then-conditional-create: two runs racing for the
same expired lease cannot both create it. Renewal overwrites the lease (only its holder
renews); on a store without conditional puts the create is best effort (documented).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time

from breakscene.errors import BreakSceneError
from breakscene.storage import filesystem, is_remote, join, write_bytes

LEASE = "_lease.json"
DEFAULT_TTL_S = 600.0


class LeaseHeld(BreakSceneError):
    pass


def lease_uri(out: str) -> str:
    return join(out, LEASE)


def _create(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if it does not exist; False if it does."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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


def read_lease(out: str) -> dict | None:
    fs, path = filesystem(lease_uri(out))
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"holder": "unreadable lease", "expires_at": 0}  # half-written by a crash: expired


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


class Lease:
    """``with Lease(out, holder):`` holds the output for the block, or raises LeaseHeld."""

    def __init__(self, out: str, holder: str, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.out, self.holder, self.ttl_s = out, holder, ttl_s
        self.uri = lease_uri(out)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl_s}).encode()

    def acquire(self) -> None:
        for _ in range(3):
            if _create(self.uri, self._body()):
                self._verify()
                break
            current = read_lease(self.out)
            if current is None:
                continue  # released in between
            if current.get("expires_at", 0) > time.time() and not _dead_here(current):
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current["expires_at"]))
                raise LeaseHeld(f"output {self.out} is in use by run {current.get('holder')} "
                                f"(host {current.get('host')}, pid {current.get('pid')}) until {expires} "
                                f"({self.uri}); wait for it, or delete the lease if that run is gone")
            fs, path = filesystem(self.uri)  # expired: a crashed run's lease is taken over
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
        else:
            raise LeaseHeld(f"output {self.out}: could not take the lease {self.uri}")
        self._thread = threading.Thread(target=self._renew, name="lease-renew", daemon=True)
        self._thread.start()

    def _verify(self) -> None:
        current = read_lease(self.out)
        if current is None or current.get("holder") != self.holder:
            raise LeaseHeld(f"output {self.out} was taken by run {current and current.get('holder')} at the same time")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                write_bytes(self.uri, self._body())  # atomic locally: a reader never sees half a lease
            except Exception:  # noqa: BLE001 - the next renewal retries; expiry is the safety net
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_lease(self.out)
        if current is not None and current.get("holder") == self.holder:
            fs, path = filesystem(self.uri)
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
