"""The side-by-side table from raw/OP-rN-mM-{eager,before,after}/rows.json: medians over rounds (one fresh process
per row), and the time ratio to the plain eager loss of the same round (docs/perf.md: compare ratios from one run)."""

import json
import statistics
from pathlib import Path

here = Path(__file__).parent
cells = {}  # (op, M, variant) -> {round: (seconds, extra bytes)}
notes = {}  # (op, M, variant) -> why a row did not run
for path in sorted(here.glob("raw/*-r*-m*-*/rows.json")):
    op, rnd, m, variant = path.parent.name.split("-")
    for row in json.loads(path.read_text()):
        key = (op, int(m[1:]), variant)
        if row["status"] == "ok":
            cells.setdefault(key, {})[rnd] = (row["median_ms"] / 1e3, row["extra_bytes"])
        else:
            notes[key] = row["note"]
names = {"eager": "plain eager PyTorch", "before": "adassl_fast torch, before (fcc2923)",
         "after": "adassl_fast torch, after"}
print("| op | M | implementation | rounds | time (median, s) | spread (s) | peak extra memory (median) "
      "| time / eager, per round | median | memory / eager |")
print("|---|---|---|---|---|---|---|---|---|---|")
for op, m in sorted({(op, m) for op, m, _ in cells}):
    eager = cells.get((op, m, "eager"), {})
    b_e = statistics.median(b for _, b in eager.values()) if eager else None
    for variant in ("eager", "before", "after"):
        runs = cells.get((op, m, variant))
        if not runs:
            why = notes.get((op, m, variant), "-")
            print(f"| {op} | {m} | {names[variant]} | 0 | not measured: {why} | | | | | |")
            continue
        times, mems = [t for t, _ in runs.values()], [b for _, b in runs.values()]
        t, b = statistics.median(times), statistics.median(mems)
        ratios = [runs[r][0] / eager[r][0] for r in sorted(runs) if r in eager]
        each = ", ".join(f"{x:.3f}" for x in ratios) or "-"
        med = f"{statistics.median(ratios):.3f}" if ratios else "-"
        rb = f"{b / b_e:.4f}" if b_e else "-"
        print(f"| {op} | {m} | {names[variant]} | {len(runs)} | {t:.3f} | {min(times):.3f}-{max(times):.3f} "
              f"| {b / 2**20:.1f} MiB | {each} | {med} | {rb} |")
