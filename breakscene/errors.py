"""Errors the user can fix: each names the file or value that is wrong.

Commands turn these into one line on stderr and exit status 2.
"""


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
