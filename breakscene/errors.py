"""Errors the user can fix: each names the file or value that is wrong.

Commands turn these into one line on stderr and exit status 2 (or the error's own
``exit_status``).
"""
import errno


class BreakSceneError(Exception):
    """Bad input or configuration; the message names what is wrong."""


class SceneError(BreakSceneError):
    """An image or mask that cannot be used."""


class ModelLoadError(BreakSceneError):
    """A model id, folder or URI that cannot be loaded."""


class BundleError(BreakSceneError):
    """A concept bundle that is missing, incomplete or inconsistent."""


class StorageError(BreakSceneError):
    """A remote location that cannot be read or written: timeout, refused connection,
    HTTP error status, missing credentials. The message names the URI and what happened."""


class OutputError(BreakSceneError):
    """An output location that cannot be used: not writable, a file, one of the inputs, or
    a folder holding files the project did not write."""


class DeviceError(BreakSceneError):
    """A device name that is not one, or a device this machine does not have."""


class OutputWriteError(BreakSceneError):
    """The output stopped taking writes in the middle of work (a full disk, a read-only
    remount, lost permissions): not one row's fault, so the run stops cleanly."""

    exit_status = 4


# errno values that mean the output, not the row, is at fault
OUTPUT_FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def output_fault(exc: BaseException | None) -> BaseException | None:
    """The OutputWriteError, or the OSError of a full or read-only disk, somewhere in
    ``exc``'s chain (causes, contexts, and the ``cause`` a Ray task error carries); else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutputWriteError) or (isinstance(exc, OSError) and exc.errno in OUTPUT_FAULT_ERRNOS):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


class NonFiniteLossError(BreakSceneError):
    """A training loss became inf or nan: the weights are not worth keeping. Names the
    phase, the first step and the loss term that went wrong."""

    def __init__(self, phase: str, step: int, term: str, values: dict[str, float]) -> None:
        self.phase, self.step, self.term, self.values = phase, step, term, values
        shown = ", ".join(f"{k} {v:.6g}" for k, v in values.items())
        super().__init__(f"{phase}: the {term} loss is not finite at step {step} ({shown}); "
                         "lower the learning rates or the loss weights")


class StaleSceneError(RuntimeError):
    """A TrainedScene used after the Extractor reset the weights it was trained into: a
    programming error (use a trained scene before the next ``reset`` or ``prepare``)."""
