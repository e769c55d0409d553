"""Training-step time of `adassl-fast compare`'s 9 runs (3 methods x 3 seeds), batch 256, on this machine.

    python step_time.py threads     # the runs dealt into --workers stacked groups, one thread each (compare
                                    # before e47ac8f)
    python step_time.py processes   # the same groups, one worker process each (compare.train_groups' layout)

Prints milliseconds per step of all 9 runs: the slowest group's time for --steps steps after 20 warm-up steps
(all groups start together), median of --repeats. 1 torch thread per group. Run from the repository root.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from adassl_fast.apps import compare


def _groups(workers: int) -> list[list]:
    args = compare.build_parser().parse_args(["--steps", "100000"])
    jobs = [(m, s) for m in compare.METHODS for s in range(3)]
    return [[compare.run_config(m, s, 0.05, args) for m, s in jobs[i::workers]] for i in range(workers)]


def _timed(configs, steps: int, barrier) -> float:
    torch.set_num_threads(1)
    runs = compare.Runs(configs)
    for step in range(1, 21):
        runs.step(step)
    barrier.wait()
    t = time.perf_counter()
    for step in range(21, 21 + steps):
        losses = runs.step(step)
    assert bool(torch.isfinite(losses).all())
    return time.perf_counter() - t


def threads(steps: int, workers: int) -> float:
    import threading

    barrier = threading.Barrier(workers)
    with ThreadPoolExecutor(workers) as pool:
        return max(pool.map(lambda g: _timed(g, steps, barrier), _groups(workers))) / steps


def processes(steps: int, workers: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(workers)
    with ctx.Pool(workers) as pool:
        return max(pool.starmap(_timed, [(g, steps, barrier) for g in _groups(workers)])) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("threads", "processes"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    measure = threads if a.mode == "threads" else processes
    times = [measure(a.steps, a.workers) for _ in range(a.repeats)]
    print(f"{a.mode}, {a.workers} stacked groups: {1000 * statistics.median(times):.1f} ms per step of all 9 runs "
          f"(median of {a.repeats}: {', '.join(f'{1000 * t:.1f}' for t in times)}; torch {torch.__version__})")


if __name__ == "__main__":
    main()
