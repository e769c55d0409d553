"""Learning curves of `adassl-fast compare`'s three methods: held-out R^2, MCC and DCI-D against steps.

Three kinds, all over seeds 0..S-1 (one mixing each), tau 0.05, batch 256, (peak) learning rate --lr, everything
else `adassl-fast train`'s defaults:
  constant: one run per method and seed at a constant learning rate, evaluated every --eval-every steps
            (where does each method level off?);
  cosine, wsd: for each budget of --budgets, a full run with that learning-rate schedule over that budget,
            evaluated at its end (what `compare --lr-schedule KIND --steps BUDGET` would report).

    python convergence.py run constant --lr 2e-3 --steps 8000 --eval-every 500 --out constant.json
    python convergence.py run cosine --budgets 1000,2000,6000 --out cosine_a.json
    python convergence.py run wsd --budgets 5000,3500,2000 --out wsd.json
    python convergence.py plot constant.json [more constant or cosine files] --default-steps 5000 --out convergence.png

The plot marks the level-off steps of the first curve, the chosen protocol; the others are drawn for comparison.
The level-off (printed as JSON for every curve of two or more points) is the first step or budget whose seed-mean
is within 0.01 of the curve's best. Any file may also be a compare.json written by `adassl-fast compare` (one
point at its --steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from adassl_fast.apps import compare, train

METRICS = compare.METRICS


def _train(steps: int, schedule: str, lr: float, seeds: int, workers: int, eval_steps=(),
           warmup_of: int = 0) -> tuple[list, list, list]:
    """(jobs, final metrics per job, curve records): the runs in `workers` stacked groups in worker processes,
    as compare trains them. warmup_of > 0: AdaSSL-V warms beta up as a `warmup_of`-step run does (so at a constant
    learning rate the curve's first `warmup_of` steps are that run's)."""
    args = compare.build_parser().parse_args(["--steps", str(steps), "--lr-schedule", schedule, "--lr", str(lr)])
    jobs = [(m, s) for m in compare.METHODS for s in range(seeds)]
    groups = [jobs[i::workers] for i in range(workers)]

    def config(method: str, seed: int) -> train.Config:
        cfg = compare.run_config(method, seed, 0.05, args)
        if warmup_of and method == "adassl-v":
            cfg = train.make_config(**{**cfg.__dict__, "beta_warmup_steps": round(warmup_of / 15)})
        return cfg

    outs = compare.train_groups([[config(m, s) for m, s in g] for g in groups], eval_steps)
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
    p.add_argument("kind", choices=("constant", "cosine", "wsd"))
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--budgets", default="1000,2000,4000")
    p.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate of every run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-of", type=int, default=0,
                   help="AdaSSL-V's beta warm-up of a run of this many steps (default: of the curve's own length)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    points = []
    if a.kind == "constant":
        jobs, final, curve = _train(a.steps, "constant", a.lr, a.seeds, a.workers,
                                    range(a.eval_every, a.steps, a.eval_every), a.warmup_of)
        for rec in [*curve, {"step": a.steps, "runs": final}]:
            points.append({"step": rec["step"], "metrics": _record(jobs, rec["runs"])})
        _write(a, points, t0)
    else:
        for budget in (int(b) for b in a.budgets.split(",")):
            jobs, final, _ = _train(budget, a.kind, a.lr, a.seeds, a.workers)
            points.append({"step": budget, "metrics": _record(jobs, final)})
            print(budget, f"{time.perf_counter() - t0:.0f} s", flush=True)
            _write(a, points, t0)  # after every budget: a long sweep keeps what it has measured


def _write(a, points: list, t0: float) -> None:
    json.dump({"kind": a.kind, "lr": a.lr, "command": " ".join(sys.argv), "time_s": time.perf_counter() - t0,
               "points": points}, open(a.out, "w"), indent=1)


def _mean_std(point: dict, method: str, metric: str) -> tuple[float, float]:
    values = torch.tensor([v[metric] for v in point["metrics"][method].values()], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def level_off(points: list, method: str, metric: str, tol: float = 0.01) -> int:
    """The first evaluated step whose seed-mean is within `tol` of the best seed-mean on the curve."""
    means = [_mean_std(pt, method, metric)[0] for pt in points]
    return next(pt["step"] for pt, m in zip(points, means, strict=True) if m >= max(means) - tol)


def _lr(d: dict) -> float:
    """The (peak) learning rate of a curve file (from its command line if it predates the "lr" key; 1e-3 if it
    predates --lr) or of a compare summary."""
    if "meta" in d:
        return d["meta"]["protocol"]["lr"]
    words = d["command"].split()
    return d.get("lr", float(words[words.index("--lr") + 1]) if "--lr" in words else 1e-3)


def _load(path: str) -> dict:
    """A `run` file, or an `adassl-fast compare` summary as a one-point cosine-or-constant file."""
    d = json.load(open(path))
    if "points" in d:
        return {"kind": d["kind"], "lr": _lr(d), "points": d["points"]}
    protocol = d["meta"]["protocol"]
    methods = [m for m in d if m != "meta"]
    point = {"step": protocol["steps"], "metrics": {m: {str(s): {k: d[m][k]["values"][s] for k in METRICS}
                                                        for s in range(len(d[m]["r2"]["values"]))}
                                                    for m in methods}}
    return {"kind": "compare-" + protocol["lr_schedule"], "lr": _lr(d), "points": [point]}


def plot(argv) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+", help="the first is the chosen protocol (drawn thick, its level-off steps "
                                            "marked); further curves are drawn thinner (constant) or as markers")
    p.add_argument("--out", required=True)
    p.add_argument("--default-steps", type=int, default=0, help="draw the default compare's --steps")
    a = p.parse_args(argv)
    curves = [dict(_load(f), file=f) for f in a.files]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = {"simclr": "tab:blue", "adassl-v": "tab:orange", "adassl-s": "tab:green"}
    summary: dict = {}
    for ax, metric in zip(axes, METRICS, strict=True):
        for m, c in colors.items():
            for i, curve in enumerate(curves):
                pts = sorted(curve["points"], key=lambda pt: pt["step"])
                steps = [pt["step"] for pt in pts]
                ms = [_mean_std(pt, m, metric) for pt in pts]
                label = f"{m}, {curve['kind']} lr {curve['lr']:g} ({curve['file']})"
                main = i == 0
                if main or curve["kind"] == "constant":
                    ax.plot(steps, [x for x, _ in ms], color=c, lw=2 if main else 1, ls=("-", "--", ":", "-.")[i % 4],
                            marker="o" if curve["kind"] != "constant" else None,
                            alpha=1 if main else 0.6, label=label)
                    if main:
                        ax.fill_between(steps, [x - s for x, s in ms], [x + s for x, s in ms], color=c, alpha=0.15)
                else:
                    ax.errorbar(steps, [x for x, _ in ms], yerr=[s for _, s in ms], color=c, marker="osD^v<>p"[i % 8],
                                ls="-" if len(pts) > 1 else "none", lw=0.8, capsize=3, alpha=0.7, label=label)
                if len(pts) < 2:
                    continue
                knee = level_off(pts, m, metric)
                entry = {"level_off": knee, "best": round(max(x for x, _ in ms), 4)}
                at_default = [x for st, (x, _) in zip(steps, ms, strict=True) if st == a.default_steps]
                if at_default:  # how far below its best the method is at the default's steps
                    entry["below_best_at_default"] = round(entry["best"] - at_default[0], 4)
                summary.setdefault(curve["file"], {}).setdefault(m, {})[metric] = entry
                if main:
                    ax.axvline(knee, color=c, ls=":", lw=1.2)
        if a.default_steps:
            ax.axvline(a.default_steps, color="k", lw=1.5, label=f"default compare ({a.default_steps} steps)")
        ax.set_title(f"{compare.METRIC_NAMES[metric]}, held-out (dotted: level-off of {curves[0]['kind']} "
                     f"lr {curves[0]['lr']:g})",
                     fontsize=10)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    {"run": run, "plot": plot}[sys.argv[1]](sys.argv[2:])
