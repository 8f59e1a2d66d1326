"""What the fault tests share: a small disk of its own (tmpfs, mounted and unmounted by the
test), a command stopped by a signal once its output's lease exists, and the check that
every table holds one current row per key."""
import contextlib
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline_helpers import ROOT, VENV_BIN, env

KEYS = {"images": ("image_id",), "masks": ("image_id", "mask_index"), "concepts": ("image_id", "concept_index")}


@contextlib.contextmanager
def small_disk(path: Path, size: str = "16m"):
    """A tmpfs of ``size`` at ``path`` (needs root, as in CI and on the project's machines)."""
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the filler file (remove it to free the disk)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * chunk)
    return filler


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


class Started:
    """A `breakscene` command in its own process, its output in files (a pipe left unread
    would stall a chatty Ray)."""

    def __init__(self, folder: Path, *args, **env_extra) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "stdout", folder / "stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([os.path.join(VENV_BIN, "breakscene"), *args], cwd=ROOT,
                                         env=env(**env_extra), stdout=out, stderr=err, text=True)

    def when(self, ready, then, timeout: float = 300) -> None:
        """Call ``then()`` as soon as ``ready(self)`` holds (polled), while the command runs."""
        deadline = time.time() + timeout
        while not ready(self):
            assert self.proc.poll() is None, f"it ended first: {self.stderr_path.read_text()[-2000:]}"
            assert time.time() < deadline, "not ready in time"
            time.sleep(0.1)
        then()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.stdout(), self.stderr_path.read_text()


def leased(out: Path):
    """Ready once the run at ``out`` holds its lease."""
    return lambda started: (out / "_lease.json").exists()


def streaming(started: Started) -> bool:
    """Ready once the run has read its manifest and starts its stages."""
    return "manifest rows" in started.stdout()


RAY_LOG = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+\t(INFO|WARNING|DEBUG|ERROR) [\w.]+:\d+ -- |\[\d{4}-\d\d-\d\d [\d:,.]+ [EWI] \d+ \d+\] )")


PROGRESS = re.compile(r"\|.*\| *\d+/\d+ \[")  # a tqdm progress bar


def error_lines(stderr: str) -> list[str]:
    """The lines a user reads: Ray's own log lines (Python's and its C++ core's) left out."""
    return [line for line in stderr.splitlines()
            if line.strip() and not RAY_LOG.match(line) and not PROGRESS.search(line)]


def one_row_per_key(out: str) -> dict[str, list]:
    from pipeline.records import read_table

    rows = {name: read_table(out, name).to_pylist() for name in KEYS}
    for name, keys in KEYS.items():
        twice = [k for k, n in Counter(tuple(r[k] for k in keys) for r in rows[name]).items() if n > 1]
        assert not twice, f"{name}: rows twice for {twice}"
    return rows


__all__ = ["small_disk", "fill", "remount", "Started", "leased", "streaming", "error_lines", "one_row_per_key",
           "KEYS"]
