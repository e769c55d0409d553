"""Builds the CUDA C++ backend from the sources shipped in the package (adassl_fast/csrc, installed as package data).

The kernels (``csrc/*.cu``) are compiled by nvcc into objects; the thin binding ``csrc/binding.cpp``
(which includes only ``<torch/extension.h>``) is built with ninja through
``torch.utils.cpp_extension.load`` and linked against those objects and the static CUDA runtime. This
works unchanged with a CUDA torch and with the CPU wheel (where the module imports but no kernel can
launch). Builds are cached under ``$TORCH_EXTENSIONS_DIR/adassl_fast`` or ``~/.cache/adassl_fast``,
keyed by the sources, the flags, the torch version and the toolkit. adassl_fast/_cuda.py wraps the built
module as the backend's entry points.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.resources
import io
import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# The sources ship inside the package (adassl_fast/csrc, package data in pyproject); nvcc needs them as
# files on disk, which every install but a zip import gives.
CSRC = Path(str(importlib.resources.files("adassl_fast.csrc")))
KERNEL_SOURCES = ("nt_xent.cu", "adassl.cu")
BINDING_SOURCE = "binding.cpp"
NVCC_FLAGS = ("-std=c++17", "-O3", "-Xptxas", "-v", "-Xcompiler", "-fPIC")
# Targets when no GPU is visible (build checks on CPU machines): Ampere and Hopper (wgmma-capable).
DEFAULT_GENCODES = ("arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a")

_lock = threading.Lock()
_state: dict = {"module": None, "log": "", "build_dir": None}


# ------------------------------------------------------------------------------------------------
# Toolkit discovery (as torch does: CUDA_HOME / CUDA_PATH, then the standard prefix; `nvcc` on PATH
# may be a wrapper script, so ask nvcc itself where its toolkit is).
# ------------------------------------------------------------------------------------------------
def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isdir(os.path.join(path, "include"))
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        p = os.environ.get(var)
        if _is_toolkit(p):
            return os.path.realpath(p)
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script (exec /opt/.../nvcc "$@") hides the toolkit; `nvcc -dryrun` prints TOP=.
        try:
            out = subprocess.run(
                [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m and _is_toolkit(os.path.realpath(m.group(1))):
                return os.path.realpath(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(cand):
            return cand
    found = sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for p in found:
        if _is_toolkit(p):
            return p
    return None


def _static_cudart(cuda_home: str) -> str | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = os.path.join(cuda_home, sub, "libcudart_static.a")
        if os.path.isfile(p):
            return p
    return None


def _gencodes() -> tuple[str, ...]:
    env = os.environ.get("ADASSL_CUDA_GENCODES")
    if env:
        return tuple(g for g in env.split(";") if g)
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        out = []
        for major, minor in caps:
            cc = f"{major}{minor}"
            if cc == "90":
                out.append("arch=compute_90a,code=sm_90a")
            else:
                out.append(f"arch=compute_{cc},code=sm_{cc}")
        return tuple(out)
    return DEFAULT_GENCODES


def _cache_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / "adassl_fast"
    return Path(os.path.expanduser("~")) / ".cache" / "adassl_fast"


def _build_key(cuda_home: str, gencodes: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.glob("*")):
        if f.suffix in (".cu", ".cuh", ".h"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update(repr((NVCC_FLAGS, gencodes, torch.__version__, os.path.realpath(cuda_home))).encode())
    return h.hexdigest()[:16]


def compile_cu(src: Path, obj: Path, gencodes: tuple[str, ...], cuda_home: str, extra=()) -> str:
    """nvcc -c one kernel source; returns the compiler output (ptxas -v report). Raises on error."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    cmd = [
        nvcc,
        *NVCC_FLAGS,
        *extra,
        *(f"-gencode={g}" for g in gencodes),
        "-I",
        str(CSRC),
        "-c",
        str(src),
        "-o",
        str(obj),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = " ".join(cmd) + "\n" + res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{log[-6000:]}")
    return log


def compile_kernels(
    gencodes: tuple[str, ...] = DEFAULT_GENCODES, cuda_home: str | None = None, force: bool = False
) -> tuple[Path, list[str], dict[str, str]]:
    """nvcc-compile every kernel source (cached); -> (build dir, object paths, {source: nvcc/ptxas log})."""
    cuda_home = cuda_home or find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME; nvcc was not found either)")
    key = _build_key(cuda_home, gencodes)
    bdir = _cache_root() / f"build_{key}"
    bdir.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> tuple[str, str]:
        obj = bdir / (Path(name).stem + ".o")
        logf = bdir / (Path(name).stem + ".nvcc.log")
        if obj.is_file() and logf.is_file() and not force:
            return name, logf.read_text()
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        log = compile_cu(CSRC / name, tmp, gencodes, cuda_home)
        os.replace(tmp, obj)
        logf.write_text(log)
        return name, log

    with ThreadPoolExecutor(max_workers=len(KERNEL_SOURCES)) as ex:
        logs = dict(ex.map(one, KERNEL_SOURCES))
    return bdir, [str(bdir / (Path(n).stem + ".o")) for n in KERNEL_SOURCES], logs


def build(force: bool = False):
    """Build (or load the cached build of) the extension module; raises RuntimeError on failure."""
    jit = bool(os.environ.get("ADASSL_CUDA_JIT"))
    with _lock:
        # ADASSL_CUDA_JIT asks for the ninja build even when the prebuilt module was loaded first
        if _state["module"] is not None and not force and (not jit or _state.get("jit")):
            return _state["module"]
        if not force and not jit:
            # Prebuilt by setup.py (CUDAExtension "adassl_fast._C_cuda") when a CUDA torch was present.
            try:
                from adassl_fast import _C_cuda as prebuilt  # type: ignore[attr-defined]
            except ImportError:
                prebuilt = None
            if prebuilt is not None:
                _state.update(
                    module=prebuilt,
                    build_dir=os.path.dirname(prebuilt.__file__),
                    log="prebuilt by setup.py (adassl_fast._C_cuda)",
                    jit=False,
                )
                return prebuilt
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME; nvcc was not found either)")
        cudart = _static_cudart(cuda_home)
        if cudart is None:
            raise RuntimeError(f"libcudart_static.a not found under {cuda_home}")
        gencodes = _gencodes()
        bdir, objs, logs = compile_kernels(gencodes, cuda_home, force=force)
        key = bdir.name.removeprefix("build_")

        from torch.utils import cpp_extension

        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                mod = cpp_extension.load(
                    name=f"adassl_fast_cuda_{key}",
                    sources=[str(CSRC / BINDING_SOURCE)],
                    extra_cflags=["-O2", "-std=c++17"],
                    extra_ldflags=[*objs, cudart, "-ldl", "-lrt", "-lpthread"],
                    build_directory=str(bdir),
                    with_cuda=False,
                    verbose=False,
                )
        except Exception as e:  # noqa: BLE001 - reported through available()/info()
            raise RuntimeError(f"building the binding failed: {e}\n{buf.getvalue()[-6000:]}") from e
        _state.update(
            module=mod,
            build_dir=str(bdir),
            log="\n".join(logs.values()) + "\n" + buf.getvalue(),
            cuda_home=cuda_home,
            gencodes=gencodes,
            jit=True,
        )
        return mod


def build_info() -> dict:
    """What the last build() left: toolkit, targets, build directory and the build log text."""
    return {"build_dir": _state["build_dir"], "gencodes": _state.get("gencodes"), "build_log": _state["log"],
            "cuda_home": _state.get("cuda_home")}
