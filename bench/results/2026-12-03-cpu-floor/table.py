"""The side-by-side table from raw/OP-rN-mM-{eager,before,after}/rows.json: median over rounds (fresh processes)."""

import json
import statistics
from pathlib import Path

here = Path(__file__).parent
cells = {}  # (op, M, variant) -> [(seconds, extra bytes)]
notes = {}  # (op, M, variant) -> why a row did not run
for path in sorted(here.glob("raw/*-r*-m*-*/rows.json")):
    op, _, m, variant = path.parent.name.split("-")
    for row in json.loads(path.read_text()):
        key = (op, int(m[1:]), variant)
        if row["status"] == "ok":
            cells.setdefault(key, []).append((row["median_ms"] / 1e3, row["extra_bytes"]))
        else:
            notes[key] = row["note"]
names = {"eager": "plain eager PyTorch", "before": "adassl_fast torch, before (fcc2923)",
         "after": "adassl_fast torch, after"}
print("| op | M | implementation | runs | time (median, s) | spread (s) | peak extra memory (median) | time / eager "
      "| memory / eager |")
print("|---|---|---|---|---|---|---|---|---|")
for op, m in sorted({(op, m) for op, m, _ in cells}):
    eager = cells.get((op, m, "eager"))
    t_e = statistics.median(t for t, _ in eager) if eager else None
    b_e = statistics.median(b for _, b in eager) if eager else None
    for variant in ("eager", "before", "after"):
        runs = cells.get((op, m, variant))
        if not runs:
            print(f"| {op} | {m} | {names[variant]} | 0 | not measured: {notes.get((op, m, variant), '-')} | | | | |")
            continue
        t = statistics.median(x for x, _ in runs)
        b = statistics.median(x for _, x in runs)
        spread = f"{min(x for x, _ in runs):.3f}-{max(x for x, _ in runs):.3f}"
        rt = f"{t / t_e:.3f}" if t_e else "-"
        rb = f"{b / b_e:.4f}" if b_e else "-"
        mib = f"{b / 2**20:.1f} MiB"
        print(f"| {op} | {m} | {names[variant]} | {len(runs)} | {t:.3f} | {spread} | {mib} | {rt} | {rb} |")
