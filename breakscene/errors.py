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
