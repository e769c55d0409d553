"""Helpers for the tests that compile Triton kernels for a GPU on a machine without one (test_cross_compile.py,
test_launch_path.py): a worker process without the interpreter, and a cubin's resource usage."""

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(module: str) -> list:
    """Run `python -m module --worker` (from the checkout, so `tests` imports) without TRITON_INTERPRET (the
    interpreter replaces @triton.jit when a kernel is decorated) or DISABLE_MMA_V3, and return the JSON list it
    prints last."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DISABLE_MMA_V3")}
    proc = subprocess.run([sys.executable, "-m", module, "--worker"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resource_usage(cubin: bytes) -> dict:
    """{registers, stack, local} of a cubin, from the cuobjdump that ships in the triton wheel (stack or
    local bytes > 0: the kernel spills)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {name: int(re.search(rf"\b{key}:(\d+)", usage).group(1))
            for name, key in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL"))}
