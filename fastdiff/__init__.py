"""fastdiff: fast sampling of diffusion models — teachers, progressive distillation, samplers, benchmarks.

Importing the package is cheap (no torch); `load_model` / `load_student` import it on first use.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("load_model", "load_student"):
        from fastdiff import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
