"""Training-step time of `adassl-fast compare`'s 9 runs (3 methods x 3 seeds), batch 256, on this machine.

    python step_time.py alone     # each run as its own `train.train` process step, 1 thread (what compare did
                                  # before: 9 runs x 1,500 steps in worker processes); works at any commit
    python step_time.py stacked   # the 9 runs as stacked groups (compare.Runs), --workers threads

Prints milliseconds per step of all 9 runs (median of --repeats timings of --steps steps after 20 warm-up
steps). Run from the repository root; PYTHONPATH=<another checkout> times that checkout's code.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def alone(steps: int) -> float:
    from adassl_fast.apps import train

    total = 0.0
    for method, extra in (("simclr", {}), ("adassl-v", {"editor": "add"}), ("adassl-s", {"editor": "modular"})):
        with tempfile.TemporaryDirectory() as out:
            cfg = train.make_config(method=method, **extra, steps=steps, batch_size=256, eval_samples=128,
                                    progress=False, log_every=max(steps // 10, 1), ckpt_every=steps, threads=1,
                                    out=out, overwrite=True)
            result = train.train(cfg)
        total += 3 * result["time"] / steps  # one seed's run; compare trains three per method
    return total


def stacked(steps: int, workers: int) -> float:
    from adassl_fast.apps import compare

    torch.set_num_threads(1)
    args = compare.build_parser().parse_args(["--steps", str(steps + 20)])
    jobs = [(m, s) for m in compare.METHODS for s in range(3)]
    groups = [compare.Runs([compare.run_config(m, s, 0.05, args) for m, s in jobs[i::workers]])
              for i in range(workers)]

    def run(runs, first, last):
        for step in range(first, last):
            losses = runs.step(step)
        return bool(torch.isfinite(losses).all())  # one synchronisation at the end

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: run(r, 1, 21), groups))
        t = time.perf_counter()
        list(pool.map(lambda r: run(r, 21, 21 + steps), groups))
        return (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("alone", "stacked"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    times = [alone(a.steps) if a.mode == "alone" else stacked(a.steps, a.workers) for _ in range(a.repeats)]
    label = "alone, 1 thread" if a.mode == "alone" else f"stacked, {a.workers} worker thread(s)"
    print(f"{label}: {1000 * statistics.median(times):.1f} ms per step of all 9 runs "
          f"(median of {a.repeats}: {', '.join(f'{1000 * t:.1f}' for t in times)}; torch {torch.__version__})")


if __name__ == "__main__":
    main()
