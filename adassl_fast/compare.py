"""`adassl-fast compare`: vanilla SimCLR vs AdaSSL-V vs AdaSSL-S on the embedded synthetic benchmark.

What it measures: each method trains the same MLP encoder (10 -> 256 -> 256 -> 256 -> 16) on SPEC 6.4's
natural pairs (z ~ U[-1,1]^10, each factor kept w.p. 0.8 else resampled, x = g(z) through a frozen
invertible MLP), with the same temperature (0.05, the paper's 3DIdent protocol), batch, optimiser and
steps, over several seeds (seeds change the initialisation, the training stream and the latent noise;
the mixing g and the held-out sets are shared). On held-out samples, from L2-normalised embeddings: linear
R^2 (fit on one held-out set, scored on another), MCC (|Pearson|, Hungarian matching) and DCI
disentanglement (Lasso importances). Prints mean +- std per method, writes a JSON summary and a bar chart,
and prints the JSON path last. JSON: {"<method>": {"r2"|"mcc"|"dci_d": {"mean", "std", "values"},
"temperature"}, ..., "meta": {"per_temperature", "protocol", "time_s"}}.

Methods (SPEC 7, 3DIdent column, scaled): AdaSSL-V: additive editor, latent predictor 16-128-128-2x16,
beta 0.5 warmed up over the first 1/15 of training (10k of 150k in the paper); AdaSSL-S: modular editor,
same predictor, beta 0.5, no warm-up. `--tune-tau` repeats everything for each temperature of
`--taus` and keeps each method's best by mean R^2 (selected on the same held-out data it reports: an
optimistic but equal treatment of all methods).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = {
    "simclr": dict(method="simclr"),
    "adassl-v": dict(method="adassl-v", editor="add", beta=0.5),
    "adassl-s": dict(method="adassl-s", editor="modular", beta=0.5, beta_warmup_steps=0),
}
METRICS = ("r2", "mcc", "dci_d")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adassl-fast compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--tune-tau", action="store_true", help="sweep --taus per method and keep each one's best")
    p.add_argument("--taus", default="0.05,0.1,0.2,0.5")
    p.add_argument("--eval-samples", type=int, default=4096)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="parallel training processes (one thread each)")
    p.add_argument("--out", default="runs/compare")
    return p


def run_config(method: str, seed: int, tau: float, args, out: Path) -> dict:
    return dict(METHODS[method], temperature=tau, seed=seed, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, eval_samples=args.eval_samples, beta_warmup_steps=_warmup(method, args.steps),
                out=str(out / f"{method}_tau{tau:g}_seed{seed}"), overwrite=True, progress=False,
                log_every=max(args.steps // 10, 1), ckpt_every=args.steps, threads=1)


def _warmup(method: str, steps: int) -> int:
    return round(steps / 15) if method == "adassl-v" else 0


def _train_one(values: dict) -> dict:
    from adassl_fast import train

    result = train.train(train.make_config(**values))
    return {"eval": result["eval"], "time": result["time"], "final_loss": result["losses"][-1]["loss"]}


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def _table(rows: dict, title: str) -> str:
    lines = [title, f"{'method':<22}" + "".join(f"{m:>18}" for m in ("R^2", "MCC", "DCI-D"))]
    for name, res in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{res[m]['mean']:>10.3f} +- {res[m]['std']:.3f}" for m in METRICS))
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(METRICS))]
        ax.bar(xs, [summary[m][k]["mean"] for k in METRICS], width, yerr=[summary[m][k]["std"] for k in METRICS],
               capsize=3, label=f"{m} (tau={summary[m]['temperature']:g})")
    ax.set_xticks(range(len(METRICS)), ["linear R^2", "MCC", "DCI-D"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("synthetic natural pairs (SPEC 6.4), held-out, mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"adassl-fast compare: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    taus = [float(t) for t in args.taus.split(",")] if args.tune_tau else [args.temperature]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, tau, seed) for m in methods for tau in taus for seed in range(args.seeds)]
    configs = [run_config(m, seed, tau, args, out) for m, tau, seed in jobs]
    print(f"compare: {len(methods)} methods x {len(taus)} temperature(s) x {args.seeds} seeds, {args.steps} steps, "
          f"batch {args.batch_size}, {args.workers} worker(s)", file=sys.stderr)
    t0 = time.perf_counter()
    if args.workers > 1:
        import multiprocessing

        # One BLAS/OpenMP thread per worker: the ops are tiny and idle threads spinning on a busy core cost
        # far more than they give. The environment is inherited by the spawned workers before they import.
        saved = {k: os.environ.get(k) for k in THREAD_VARS}
        os.environ.update({k: "1" for k in THREAD_VARS})
        try:
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_train_one, configs))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        results = [_train_one(c) for c in configs]
    elapsed = time.perf_counter() - t0

    grid: dict = {}
    for (m, tau, _), res in zip(jobs, results, strict=True):
        grid.setdefault(m, {}).setdefault(tau, []).append(res)
    per_tau = {m: {tau: {k: _stats([r["eval"][k] for r in runs]) for k in METRICS} for tau, runs in by_tau.items()}
               for m, by_tau in grid.items()}
    summary = {}
    for m in methods:
        best = max(taus, key=lambda t, m=m: per_tau[m][t]["r2"]["mean"])
        summary[m] = dict(per_tau[m][best], temperature=best)
    if args.tune_tau:
        rows = {f"{m} tau={tau:g}": per_tau[m][tau] for m in methods for tau in taus}
        print(_table(rows, "temperature sweep (held-out, mean +- std over seeds)"))
        print()
    rows = {f"{m} (tau={summary[m]['temperature']:g})": summary[m] for m in methods}
    print(_table(rows, f"{args.seeds} seeds x {args.steps} steps, {elapsed:.0f} s"))

    report = {m: summary[m] for m in methods}
    report["meta"] = {
        "per_temperature": {m: {f"{tau:g}": v for tau, v in d.items()} for m, d in per_tau.items()},
        "protocol": {"benchmark": "SPEC 6.4 synthetic natural pairs (n=10, keep 0.8, 3-layer invertible MLP mixing)",
                     "metrics": "held-out, L2-normalised embeddings: linear R^2, MCC (Pearson+Hungarian), DCI-D "
                                "(LassoCV importances)",
                     "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "temperatures": taus, "tune_tau": args.tune_tau,
                     "methods": {m: {k: v for k, v in run_config(m, 0, 0.0, args, out).items()
                                     if k in ("method", "editor", "beta", "beta_warmup_steps")} for m in methods}},
        "time_s": elapsed,
    }
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if _plot(summary, out / "compare.png"):
        print(f"chart: {out / 'compare.png'}")
    print(json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
