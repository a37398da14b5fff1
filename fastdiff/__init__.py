"""fastdiff: fast sampling of diffusion models — teachers, distillation, samplers, benchmarks.

Importing the package is cheap (no torch); `load_model` / `load_student` import it on first use.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _map_kernels() -> None:
    """Make the repository's top-level `kernels/` folder importable as `fastdiff.kernels` from a checkout.

    `kernels/` has no `__init__.py` on purpose: run from the repository root (`python -m ...` puts the current folder
    first on sys.path), a regular package there would answer `import kernels` — a name that belongs to the PyPI
    package transformers >= 5 installs and diffusers imports. As a bare folder it is at most a namespace portion,
    which any installed regular package outranks. A wheel carries the kernels inside the package (fastdiff/kernels/,
    found by the normal import system); in a checkout (an editable install, or the repository root) this maps the
    name to the folder beside the package. Nothing is imported from it here (Triton loads with a kernel's module).
    """
    here = Path(__file__).resolve().parent
    top = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (top / "sampler_step.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(top)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton kernels, one file per kernel, each with its launcher and plain-torch reference."
    sys.modules[spec.name] = module
    globals()["kernels"] = module


_map_kernels()


def __getattr__(name):
    if name in ("load_model", "load_student"):
        from fastdiff import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
