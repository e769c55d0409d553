"""Sweep `nt_xent` over every backend with the shared harness (adassl_fast/apps/benchmark.py).

    python bench/bench_nt_xent.py [--out DIR] [any `adassl-fast bench` flag; later flags win]

Defaults: CPU M 1024..16384, GPU M 4096..2^21 (sizes the reference or torch cannot take are recorded as
skipped, with the reason), d in {128, 256, 512}, phase full. Plot with bench/plot.py DIR/rows.json.
"""

import sys

from adassl_fast.apps.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--op", "nt_xent", "--d", "128,256,512", *sys.argv[1:]]))
