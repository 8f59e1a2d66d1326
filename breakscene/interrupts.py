"""Ctrl-C and SIGTERM (how Kubernetes, Ray and schedulers stop a process) as an exception
in the main thread, so that every ``with`` and ``finally`` runs on the way out: the
output's lease is released, temporary folders (a half-written bundle) are removed, an
embedded Ray is shut down. The command then prints one line and exits 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM), as shells and schedulers expect."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that the
    ``except Exception`` of a per-row error handler does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise(signum, frame) -> None:
    # a second signal while cleaning up ends the process the default way
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    raise Stopped(signum)


def install() -> None:
    """Turn SIGINT and SIGTERM into ``Stopped`` (the main thread only: elsewhere a no-op).
    Called again after a library (Ray) installed handlers of its own."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


@contextlib.contextmanager
def stop_on_signals():
    """``install()`` for the block, the previous handlers restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def as_stopped(exc: BaseException) -> Stopped | None:
    """A ``Stopped`` (or a KeyboardInterrupt, Ctrl-C raised before the handler was in place
    or re-raised by a library) in ``exc`` or its chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Stopped):
            return exc
        if isinstance(exc, KeyboardInterrupt):
            return Stopped(signal.SIGINT)
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["Stopped", "install", "stop_on_signals", "as_stopped"]
