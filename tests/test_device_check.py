"""bench/device_check.sh --dry-run: the GPU machine's one script, run on CPU so that it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adassl_fast.apps.benchmark import ROW_KEYS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path), BUDGET_S="400")
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    assert {"device_check.log", "rows.json", "rows.csv"} <= set(files), files
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows
    for r in rows:
        missing = set(ROW_KEYS) - set(r)
        assert not missing, (missing, r)
    ok = {(r["op"], r["impl"]) for r in rows if r["status"] == "ok"}
    assert {("nt_xent", "torch"), ("nt_xent", "reference"), ("adassl", "torch"), ("adassl", "reference")} <= ok
    assert all(r["note"] for r in rows if r["status"] != "ok")
    tail = out[-6000:]
    assert "summary:" in tail and "UNMEASURED" in tail  # the summary comes last
    assert "installed: pip install" in out or "copying adassl_fast" in out
    assert "adassl_fast from " + "/tmp/adassl_site" in out  # the install, not this tree, was imported
