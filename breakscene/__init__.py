"""Break-A-Scene as a library: models, losses, extractor, bundles, masks, noise, metrics.

Knows nothing of Ray; the batch pipeline lives in ``pipeline/``.
"""
__version__ = "0.1.0"

from .config import ExtractConfig  # noqa: E402

__all__ = ["ExtractConfig", "__version__"]
