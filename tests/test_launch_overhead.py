"""bench/launch_overhead.py's --python-only mode: the host path with every Triton launch stubbed, on any machine."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_python_only_mode_times_every_op_without_a_gpu():
    # a fresh process: the mode replaces the kernels module's launchers for good
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "launch_overhead.py"), "--python-only",
                          "--op", "nt_xent,info_nce,adassl", "--M", "256", "--d", "16"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"nt_xent", "info_nce", "adassl"}
    for op, (m, low, median) in rows.items():
        assert m == "256" and 0 < float(low) <= float(median), (op, low, median)


def test_unknown_op_is_refused():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "launch_overhead.py"), "--python-only",
                          "--op", "ntxent"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--op takes nt_xent, info_nce, adassl" in out.stderr
