"""PNGs from benchmark rows (rows.json written by `adassl-fast bench --out`): matplotlib is optional.

    python bench/plot.py bench/results/<run>/rows.json [more.json ...] --out DIR

Writes time.png (median time vs M per backend, the docs/perf.md floor as a dashed line), tflops.png (achieved
TFLOP/s vs M), memory.png (extra memory vs M, log-log) and speedup.png (speed-up over the eager reference).
One panel per (op, d, dtype, phase). Without matplotlib it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

STYLE = {"reference": "k", "compile": "tab:gray", "torch": "tab:blue", "triton": "tab:red", "cuda": "tab:green"}


def load(paths) -> list[dict]:
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        rows += data if isinstance(data, list) else data.get("rows", [])
    return [r for r in rows if r.get("status") == "ok" and r.get("median_ms")]


def panels(rows):
    out = defaultdict(list)
    for r in rows:
        out[(r["op"], r["d"], r["dtype"], r["phase"])].append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def series(rows, value):
    by_impl = defaultdict(dict)
    for r in rows:
        v = value(r)
        if v is not None and v > 0:
            by_impl[r["impl"]][r["M"]] = v
    return {impl: sorted(pts.items()) for impl, pts in by_impl.items()}


def figure(plt, groups, title, ylabel, value, *, floor=False, loglog=True):
    n = max(1, len(groups))
    cols = min(n, 3)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.9 * rows_n), squeeze=False)
    for ax, (key, rows) in zip(axes.flat, groups.items(), strict=False):
        for impl, pts in series(rows, value).items():
            ax.plot([m for m, _ in pts], [v for _, v in pts], "o-", color=STYLE.get(impl), label=impl)
        if floor:
            fl = sorted({r["M"]: r["floor_ms"] for r in rows if r.get("floor_ms")}.items())
            if fl:
                ax.plot([m for m, _ in fl], [v for _, v in fl], "--", color="tab:purple", label="floor")
        ax.set_xscale("log", base=2)
        if loglog:
            ax.set_yscale("log")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel(ylabel)
        ax.set_title("{} d={} {} {}".format(*key), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    meta = groups and next(iter(groups.values()))[0]
    if meta:
        fig.suptitle(f"{title} - {meta['device']}, torch {meta['torch']}, commit {meta['commit']}", fontsize=10)
    fig.tight_layout()
    return fig


def speedups(rows):
    ref = {(r["op"], r["M"], r["d"], r["dtype"], r["phase"]): r["median_ms"] for r in rows if r["impl"] == "reference"}
    return lambda r: (ref.get((r["op"], r["M"], r["d"], r["dtype"], r["phase"])) or 0) / r["median_ms"] or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help="rows.json files")
    p.add_argument("--out", default=".", help="folder for the PNGs")
    p.add_argument("--only", default="time,tflops,memory,speedup",
                   help="comma-separated plots to write (default: all four)")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed (pip install adassl-fast[plot]); no PNGs written")
        return 0
    rows = load(args.rows)
    if not rows:
        print("plot.py: no measured rows to plot")
        return 0
    groups = panels(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        ("time.png", "median time vs M (dashed: docs/perf.md floor)", "ms", lambda r: r["median_ms"], True, True),
        ("tflops.png", "achieved TFLOP/s (executed matmul FLOPs)", "TFLOP/s", lambda r: r.get("tflops"), False, False),
        ("memory.png", "peak extra memory vs M", "bytes", lambda r: r.get("extra_bytes"), False, True),
        ("speedup.png", "speed-up over the eager reference", "x eager", speedups(rows), False, True),
    ]
    wanted = {f"{w.strip()}.png" for w in args.only.split(",")}
    for name, title, ylabel, value, floor, loglog in specs:
        if name not in wanted:
            continue
        fig = figure(plt, groups, title, ylabel, value, floor=floor, loglog=loglog)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
