"""The repository's `kernels/` folder never answers `import kernels` (a PyPI package's name, which transformers >= 5
installs and diffusers imports), and the Triton kernels stay reachable as `fastdiff.kernels` from a checkout and from a
wheel. Both checks run in a fresh interpreter: this one has imported too much to tell."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run with the repository root as the current folder and first on sys.path, as `python -m pytest`, `python -m
# fastdiff.distill` and `python -c` put it.
FROM_ROOT = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("kernels")
out = {"origin": spec.origin if spec else None,
       "locations": list(spec.submodule_search_locations or []) if spec else []}
sampler_step = importlib.util.find_spec("fastdiff.kernels.sampler_step")
out["fastdiff_kernels"] = sampler_step.origin if sampler_step else None
if out["origin"] and importlib.util.find_spec("diffusers"):
    import diffusers
    diffusers.UNet2DModel  # its import chain reaches `from kernels import ...` (diffusers 0.42, transformers 5)
    diffusers.DDIMPipeline
    out["diffusers"] = diffusers.__version__
print(json.dumps(out))
"""


def _inside(path: str | None, folder: Path) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(folder)


def test_import_kernels_from_the_repository_root_is_never_the_project_folder():
    proc = subprocess.run([sys.executable, "-c", FROM_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert _inside(out["fastdiff_kernels"], ROOT / "kernels"), out
    assert not (ROOT / "kernels" / "__init__.py").exists()  # a regular package at the root would shadow PyPI's
    if out["origin"]:
        # the PyPI package is installed: it, not the repository's folder, answers; diffusers' import chain loads
        assert not _inside(out["origin"], ROOT), out
        assert all(not _inside(p, ROOT) for p in out["locations"]), out
        assert "diffusers" in out or not _has("diffusers")
    else:
        # no PyPI `kernels` here: the folder is at most a namespace portion (no origin), which any installed
        # regular package outranks
        print("the PyPI package `kernels` is not installed: checked only that the repository's folder is a "
              "namespace portion, which an installed package outranks")
        assert all(_inside(p, ROOT / "kernels") for p in out["locations"]), out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_a_wheel_carries_the_kernels_as_fastdiff_kernels(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel here needs setuptools (pip's --no-build-isolation)")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("fastdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdiff/kernels/sampler_step.py" in names and "fastdiff/kernels/attention.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # nothing installs a top-level `kernels`
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import importlib.util, json; s = importlib.util.find_spec('fastdiff.kernels.sampler_step'); "
            "import fastdiff; print(json.dumps([s.origin, fastdiff.__file__]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin, package = json.loads(proc.stdout.splitlines()[-1])
    assert _inside(origin, tmp_path / "site" / "fastdiff" / "kernels") and _inside(package, tmp_path / "site")
