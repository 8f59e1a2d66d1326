"""Break-A-Scene as a library: models, losses, extractor, bundles, masks, noise, metrics.

Knows nothing of Ray; the batch pipeline lives in ``pipeline/``. What users import is
here: ``from breakscene import Extractor, ExtractConfig, load_scene``. The names that
need torch are imported on first use (PEP 562), so that ``import breakscene`` (a job
file's validation, say) stays light.
"""
__version__ = "0.1.0"

from breakscene.config import ExtractConfig  # noqa: E402

# public name -> the module that defines it (imported when the name is first used)
LAZY = {
    "Extractor": "extraction.extractor",
    "ExtractionResult": "extraction.products",
    "TrainedScene": "extraction.products",
    "PreparedExtraction": "extraction.products",
    "load_scene": "scenes.scene",
    "load_scene_dir": "scenes.scene",
    "Scene": "scenes.scene",
    "load_bundle_pipeline": "files.bundle",
}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExtractConfig", "__version__", *LAZY]
