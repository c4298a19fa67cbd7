"""mpm: the image-to-text MPM model, its training recipe, chat, export, and the `mpm` command line.

    from mpm import MPMForConditionalGeneration, MPMProcessor, Request, generate, load_model

(Imported lazily, so `mpm data ...` commands do not load torch and transformers.)
"""

__version__ = "0.1.0"

_LAZY = {
    "MPMConfig": "mpm.configuration",
    "MPMForConditionalGeneration": "mpm.modeling",
    "MPMProcessor": "mpm.processor",
    "Request": "mpm.inference",
    "generate": "mpm.inference",
    "load_model": "mpm.inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpm' has no attribute {name!r}")
