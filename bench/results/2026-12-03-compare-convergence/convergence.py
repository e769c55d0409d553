"""Learning curves of `adassl-fast compare`'s three methods: held-out R^2, MCC and DCI-D against steps.

Two kinds, both over seeds 0..S-1 (one mixing each), tau 0.05, batch 256, peak lr 1e-3, everything else
`adassl-fast train`'s defaults:
  constant: one run per method and seed at a constant learning rate, evaluated every --eval-every steps
            (where does each method level off?);
  cosine:   for each budget of --budgets, a full run with the cosine schedule over that budget, evaluated at
            its end (what the default `compare` would report at that --steps).

    python convergence.py run constant --steps 8000 --eval-every 500 --out constant.json
    python convergence.py run cosine --budgets 1000,2000,6000 --out cosine_a.json
    python convergence.py plot constant.json cosine_a.json [more cosine files] --out convergence.png

A cosine file may also be a compare.json written by `adassl-fast compare --lr-schedule cosine`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from adassl_fast.apps import compare

METRICS = compare.METRICS


def _train(steps: int, schedule: str, seeds: int, workers: int, eval_steps=()) -> tuple[list, list, list]:
    """(jobs, final metrics per job, curve records): the runs in `workers` stacked groups, as compare does."""
    args = compare.build_parser().parse_args(["--steps", str(steps), "--lr-schedule", schedule])
    jobs = [(m, s) for m in compare.METHODS for s in range(seeds)]
    groups = [jobs[i::workers] for i in range(workers)]
    datasets: dict = {}
    stacks = [compare.Runs([compare.run_config(m, s, 0.05, args) for m, s in g], datasets) for g in groups]
    with ThreadPoolExecutor(workers) as pool:
        outs = list(pool.map(lambda runs: runs.train(eval_steps=eval_steps), stacks))
    order = [job for g in groups for job in g]
    final = [ev for out in outs for ev in out[0]]
    curve = [{"step": recs[0]["step"], "runs": [ev for rec in recs for ev in rec["runs"]]}
             for recs in zip(*(out[1] for out in outs), strict=True)]
    return order, final, curve


def _record(jobs, evals) -> dict:
    out: dict = {}
    for (m, s), ev in zip(jobs, evals, strict=True):
        out.setdefault(m, {})[str(s)] = {k: ev[k] for k in METRICS}
    return out


def run(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("constant", "cosine"))
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--budgets", default="1000,2000,4000")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    points = []
    if a.kind == "constant":
        jobs, final, curve = _train(a.steps, "constant", a.seeds, a.workers,
                                    range(a.eval_every, a.steps, a.eval_every))
        for rec in [*curve, {"step": a.steps, "runs": final}]:
            points.append({"step": rec["step"], "metrics": _record(jobs, rec["runs"])})
    else:
        for budget in (int(b) for b in a.budgets.split(",")):
            jobs, final, _ = _train(budget, "cosine", a.seeds, a.workers)
            points.append({"step": budget, "metrics": _record(jobs, final)})
            print(budget, f"{time.perf_counter() - t0:.0f} s", flush=True)
    json.dump({"kind": a.kind, "command": " ".join(sys.argv), "time_s": time.perf_counter() - t0,
               "points": points}, open(a.out, "w"), indent=1)


def _mean_std(point: dict, method: str, metric: str) -> tuple[float, float]:
    values = torch.tensor([v[metric] for v in point["metrics"][method].values()], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def level_off(points: list, method: str, metric: str, tol: float = 0.01) -> int:
    """The first evaluated step whose seed-mean is within `tol` of the best seed-mean on the curve."""
    means = [_mean_std(pt, method, metric)[0] for pt in points]
    return next(pt["step"] for pt, m in zip(points, means, strict=True) if m >= max(means) - tol)


def _cosine_points(path: str) -> list:
    """Points of a `run cosine` file, or the one point of an `adassl-fast compare` summary."""
    d = json.load(open(path))
    if "points" in d:
        return d["points"]
    steps = d["meta"]["protocol"]["steps"]
    methods = [m for m in d if m != "meta"]
    return [{"step": steps, "metrics": {m: {str(s): {k: d[m][k]["values"][s] for k in METRICS}
                                            for s in range(len(d[m]["r2"]["values"]))} for m in methods}}]


def plot(argv) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser()
    p.add_argument("constant")
    p.add_argument("cosine", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--default-steps", type=int, default=0, help="draw the default compare's --steps")
    a = p.parse_args(argv)
    const = json.load(open(a.constant))
    cos = {"points": sorted((pt for f in a.cosine for pt in _cosine_points(f)), key=lambda pt: pt["step"])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"simclr": "tab:blue", "adassl-v": "tab:orange", "adassl-s": "tab:green"}
    summary = {}
    for ax, metric in zip(axes, METRICS, strict=True):
        for m, c in colors.items():
            steps = [pt["step"] for pt in const["points"]]
            ms = [_mean_std(pt, m, metric) for pt in const["points"]]
            mean = [x for x, _ in ms]
            ax.plot(steps, mean, color=c, label=f"{m}, constant lr")
            ax.fill_between(steps, [x - s for x, s in ms], [x + s for x, s in ms], color=c, alpha=0.15)
            knee = level_off(const["points"], m, metric)
            summary.setdefault(m, {})[metric] = knee
            ax.axvline(knee, color=c, ls=":", lw=1)
            budgets = [pt["step"] for pt in cos["points"]]
            cms = [_mean_std(pt, m, metric) for pt in cos["points"]]
            ax.errorbar(budgets, [x for x, _ in cms], yerr=[s for _, s in cms], color=c, marker="o", ls="--",
                        capsize=3, label=f"{m}, cosine over the budget")
        if a.default_steps:
            ax.axvline(a.default_steps, color="k", lw=1.5, label=f"default compare ({a.default_steps} steps)")
        ax.set_title(f"{compare.METRIC_NAMES[metric]}, held-out (dotted: level-off)", fontsize=10)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(json.dumps({"level_off_step": summary}))


if __name__ == "__main__":
    {"run": run, "plot": plot}[sys.argv[1]](sys.argv[2:])
