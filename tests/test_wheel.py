"""The wheel carries the CUDA sources: `pip wheel .` -> a fresh venv -> impl="cuda" builds from inside the install.

The wheel is built from a copy of the tree (setuptools' build/ folder in the tree could carry stale files);
the venv gets this torch's CPU wheel from the local wheel store, the adassl_fast wheel and ninja. Everything
runs outside the checkout with PYTHONSAFEPATH=1, so only the installed package can be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".cu", ".cuh", ".cpp")

# Run in the venv (the suffixes as arguments): where the cuda backend looks for its sources, what it finds there.
PROBE = """
import hashlib, json, sys
from pathlib import Path
import adassl_fast
from adassl_fast import _cuda_build
print(json.dumps({"package": str(Path(adassl_fast.__file__).parent), "csrc": str(_cuda_build.CSRC),
                  "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in _cuda_build.CSRC.iterdir() if p.suffix in sys.argv[1:]},
                  "builds": [*_cuda_build.KERNEL_SOURCES, _cuda_build.BINDING_SOURCE]}))
"""

BUILD = """
from adassl_fast import _cuda_build
module = _cuda_build.build()
print(module.__file__, all(hasattr(module, n) for n in ("nt_xent_forward", "nt_xent_backward", "adassl_forward",
                                                         "adassl_backward")))
"""


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".*_cache", "results"))
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist"])
    wheel = next((tmp / "dist").glob("adassl_fast-*.whl"))
    _run([sys.executable, "-m", "venv", tmp / "venv"])
    python = tmp / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", wheel, "ninja"])
    return tmp


def _in_venv(venv: Path, code: str, *args, **env) -> str:
    """Run `code` with the venv's python from outside the checkout (its bin first on PATH: ninja)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    clean.update(PYTHONSAFEPATH="1", PATH=f"{venv / 'venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", **env)
    return _run([venv / "venv" / "bin" / "python", "-c", code, *args], cwd=venv, env=clean)


@pytest.mark.slow
def test_the_installed_package_holds_every_cuda_source(venv):
    found = json.loads(_in_venv(venv, PROBE, *SUFFIXES).strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(venv / "venv"), found["package"]  # the install, not the tree
    assert Path(found["csrc"]) == Path(found["package"]) / "csrc"
    tree = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "adassl_fast" / "csrc").iterdir()
            if p.suffix in SUFFIXES}
    assert found["sources"] == tree  # every source, byte for byte
    assert set(found["builds"]) <= set(tree)


@pytest.mark.slow
@pytest.mark.cuda
def test_the_binding_builds_from_the_installed_sources(venv):
    # the CPU-side build tests/test_cuda_build.py makes from the tree, here from the install, in a cache of its
    # own (nothing reused from a build of the tree)
    out = _in_venv(venv, BUILD, ADASSL_CUDA_JIT="1", TORCH_EXTENSIONS_DIR=str(venv / "extensions"))
    path, complete = out.strip().splitlines()[-1].split()
    assert Path(path).is_relative_to(venv / "extensions") and complete == "True", out
