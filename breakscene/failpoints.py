"""Named points where a test stops a process at a chosen moment (``BREAKSCENE_FAILPOINT``):
``name`` kills it there (SIGKILL, no cleanup, like ``kill -9``), ``name:pause`` makes it
wait there for a signal. They prove that a rerun after a kill at every commit boundary
leaves each row exactly once, and that a stop mid-write leaves nothing behind (as fail-rs
and FoundationDB's buggify do). Off unless the variable names the point."""
from __future__ import annotations

import os
import signal
import time

ENV = "BREAKSCENE_FAILPOINT"
PAUSE_S = 120.0


def failpoint(name: str) -> None:
    """Act as ``BREAKSCENE_FAILPOINT`` says when it names ``name``; otherwise nothing."""
    wanted = os.environ.get(ENV)
    if not wanted or wanted.split(":")[0] != name:
        return
    if wanted.endswith(":pause"):
        print(f"failpoint {name}: paused", flush=True)
        time.sleep(PAUSE_S)
        return
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "failpoint"]
