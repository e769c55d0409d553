"""`adassl-fast compare`: vanilla SimCLR vs AdaSSL-V vs AdaSSL-S on the embedded synthetic benchmark.

What it measures: each method trains the same MLP encoder (10 -> 256 -> 256 -> 256 -> 16) on docs/spec.md 6.4's
natural pairs (z ~ U[-1,1]^10, each factor kept w.p. 0.8 else resampled, x = g(z) standardised, g a frozen
invertible MLP), with the same temperature (0.05, the paper's 3DIdent protocol), batch, optimiser, learning rate
and steps: `adassl-fast train`'s defaults, so `adassl-fast train --method M --seed S`
trains run (M, S) of the table. A seed fixes the mixing g (one mixing per seed, so the +- is over
mixings), the initialisation, the training stream and the latent noise; every method sees the same three.
On held-out samples, from L2-normalised embeddings: linear R^2 (fit on one held-out set, scored on
another), MCC (|Pearson|, Hungarian matching) and DCI disentanglement (Lasso importances). Prints mean +-
std per method and each AdaSSL variant's paired difference to SimCLR (per seed, and how many seeds it is
ahead on), writes a JSON summary and a bar chart, and prints the JSON path last. JSON: {"<method>":
{"r2"|"mcc"|"dci_d": {"mean", "std", "values"}, "temperature"}, ..., "meta": {"paired", "per_temperature",
"protocol", "time_s"}}; "paired": {"<method>": {"<metric>": {"deltas", "mean", "ahead"}}}.

Methods (docs/spec.md 7, 3DIdent column, scaled): AdaSSL-V: additive editor, latent predictor 16-128-128-2x16,
beta 0.5 warmed up over the first 1/15 of training (10k of 150k in the paper); AdaSSL-S: modular editor,
same predictor, beta 0.5, no warm-up. `--tune-tau` repeats everything for each temperature of `--taus` and
keeps each method's best by mean R^2 (selected on the same held-out data it reports: an optimistic but
equal treatment of all methods).

How it is fast: the runs (methods x seeds x temperatures) are dealt into `--workers` groups, each trained
in its own worker process (one per core: the loss heads' many small ops are Python-bound, and separate
interpreters run them side by side where threads take turns on one GIL). A group trains as one stacked
encoder, R copies of the MLP whose layers are batched matmuls over (R, rows, features); each run keeps its own loss head
(adassl_fast's NTXentLoss / AdaSSL modules, called once per run per step), its own gradient clipping and
its own latent-noise generator, so a run computes what `adassl-fast train` computes for it alone (AdamW is
elementwise, so one optimiser over the stacked weights equals one per run). No value is read back to
Python inside the loop except a finiteness check every 100 steps; evaluation runs once, at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adassl_fast.apps import metrics as metrics_mod
from adassl_fast.apps import train

METHODS = {
    "simclr": dict(method="simclr"),
    "adassl-v": dict(method="adassl-v", editor="add"),
    "adassl-s": dict(method="adassl-s", editor="modular"),
}
METRICS = ("r2", "mcc", "dci_d")
METRIC_NAMES = {"r2": "linear R^2", "mcc": "MCC", "dci_d": "DCI-D"}
CHECK_EVERY = 100  # steps between finiteness checks of the losses (each one synchronises)


# ----------------------------------------------------------------------------------------------------
# Command line.


class UsageError(Exception):
    """A command-line mistake: `main` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)  # instead of argparse's usage block and sys.exit


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _tau_list(text: str) -> list[float]:
    taus = [_positive_float(t) for t in text.split(",") if t.strip()]
    if not taus:
        raise argparse.ArgumentTypeError("expected comma-separated temperatures, e.g. 0.05,0.1")
    return list(dict.fromkeys(taus))


def build_parser() -> argparse.ArgumentParser:
    defaults = train.Config()
    p = _Parser(prog="adassl-fast compare", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=_int_at_least(1), default=3, metavar="N>=1",
                   help="seeds 0..N-1; each fixes a mixing, an initialisation and a data stream")
    p.add_argument("--steps", type=_int_at_least(1), default=defaults.steps, metavar="N>=1",
                   help="training steps per run")
    p.add_argument("--batch-size", type=_int_at_least(2), default=defaults.batch_size, metavar="N>=2",
                   help="pairs per step")
    p.add_argument("--lr", type=_positive_float, default=defaults.lr, metavar="X>0",
                   help="AdamW learning rate (the peak, with --lr-schedule cosine or wsd)")
    p.add_argument("--lr-schedule", choices=train.OPTIONS["lr_schedule"].choices, default=defaults.lr_schedule,
                   help=train.OPTIONS["lr_schedule"].help)
    p.add_argument("--temperature", type=_positive_float, default=defaults.temperature, metavar="X>0",
                   help="NT-Xent temperature of every method (without --tune-tau)")
    p.add_argument("--methods", type=_method_list, default=",".join(METHODS), metavar="LIST",
                   help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--tune-tau", action="store_true", help="train at every --taus value, keep each method's best")
    p.add_argument("--taus", type=_tau_list, default="0.05,0.1,0.2,0.5", metavar="LIST",
                   help="comma-separated temperatures > 0 for --tune-tau")
    p.add_argument("--eval-samples", type=_int_at_least(100), default=defaults.eval_samples, metavar="N>=100",
                   help="held-out samples in each of the two evaluation sets")
    p.add_argument("--workers", type=_int_at_least(1), default=min(os.cpu_count() or 1, 4), metavar="N>=1",
                   help="groups of runs trained side by side in worker processes (CPUs / N torch threads each)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a live progress bar with ETA on stderr")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.json and compare.png")
    return p


def run_config(method: str, seed: int, tau: float, args) -> train.Config:
    """The `adassl-fast train` config of one run: its defaults, with the command line's overrides."""
    return train.make_config(**METHODS[method], temperature=tau, seed=seed, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
                             eval_samples=args.eval_samples, progress=False)


# ----------------------------------------------------------------------------------------------------
# Many runs as one model.


class StackedMLP(nn.Module):
    """R independent copies of `train.mlp_encoder`, one batched matmul per layer.

    Built from R encoders of the same shape (their initial weights are copied); forward maps
    (R, rows, n_in) -> (R, rows, n_out), run r through encoder r.
    """

    def __init__(self, encoders: list[nn.Sequential]):
        super().__init__()
        layers = [[m for m in enc if isinstance(m, nn.Linear)] for enc in encoders]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([run[i].weight.detach().T for run in layers])) for i in range(len(layers[0])))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([run[i].bias.detach()[None] for run in layers])) for i in range(len(layers[0])))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = F.leaky_relu(x, 0.01)
        return x


class Runs:
    """Runs trained together: per run an `adassl-fast train` model (its encoder moved into one StackedMLP),
    per distinct seed one synthetic data set."""

    def __init__(self, configs: list[train.Config]):
        first = configs[0]
        shared = ("steps", "batch_size", "lr", "lr_schedule", "weight_decay", "grad_clip", "n_latents", "emb_dim",
                  "encoder_hidden", "eval_samples")
        for cfg in configs:
            if cfg.data != "synthetic" or any(getattr(cfg, k) != getattr(first, k) for k in shared):
                raise ValueError(f"runs trained together must share the synthetic data and {', '.join(shared)}")
        self.configs = configs
        self.datasets: dict[tuple, object] = {}
        self.models, self.noise = [], []
        for cfg in configs:
            # As train.train: the seed, then the encoder, then the head; the latent noise continues that stream.
            torch.manual_seed(cfg.seed)
            self.models.append(train.SSLModel(cfg, train.make_encoder(cfg)))
            self.noise.append(torch.Generator())
            self.noise[-1].set_state(torch.get_rng_state())
            key = (cfg.data_seed, cfg.seed)
            if key not in self.datasets:
                self.datasets[key] = train.make_data(cfg, 0, 1)
        keys = list(self.datasets)
        self.run_data = torch.tensor([keys.index((cfg.data_seed, cfg.seed)) for cfg in configs])
        self.encoder = StackedMLP([m.encoder for m in self.models])
        self.heads = [list(m.head.parameters()) for m in self.models]
        decay = [*self.encoder.weights, *(p for h in self.heads for p in h if p.ndim != 1)]
        no_decay = [*self.encoder.biases, *(p for h in self.heads for p in h if p.ndim == 1)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": first.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=first.lr,
                                           fused=True)

    def _loss(self, r: int, e_x: Tensor, e_y: Tensor) -> Tensor:
        model, cfg = self.models[r], self.configs[r]
        if not cfg.method.startswith("adassl"):
            return model.loss(e_x, e_y)["loss"]
        draw = torch.randn if cfg.method == "adassl-v" else torch.rand  # what the head would draw itself
        shape = (len(e_x), cfg.latent_dim)
        noise_xy, noise_yx = (draw(shape, generator=self.noise[r]) for _ in range(2))
        return model.head(e_x, e_y, noise_xy=noise_xy, noise_yx=noise_yx)["loss"]

    def _clip_gradients(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ per run: each run's norm over its slice of the encoder and its head."""
        enc_sq = sum(p.grad.pow(2).sum((1, 2)) for p in self.encoder.parameters())
        head_sq = torch.stack([torch.nn.utils.get_total_norm([p.grad for p in h]) ** 2 if h else enc_sq.new_zeros(())
                               for h in self.heads])
        total = (enc_sq + head_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient, per run
        for p in self.encoder.parameters():
            p.grad.mul_(coef[:, None, None])
        for h, norm in zip(self.heads, total, strict=True):
            torch.nn.utils.clip_grads_with_norm_(h, max_norm, norm)

    def step(self, step: int) -> Tensor:
        """One optimisation step of every run; returns the (R,) losses (not synchronised)."""
        cfg = self.configs[0]
        b = cfg.batch_size
        pairs = torch.stack([torch.cat(ds.batch(step, b)) for ds in self.datasets.values()])
        emb = self.encoder(pairs[self.run_data])  # (R, 2B, d): rows [x; x+] of each run
        losses = torch.stack([self._loss(r, emb[r, :b], emb[r, b:]) for r in range(len(self.configs))])
        losses.sum().backward()  # the runs share no parameter: each gets its own loss's gradient
        if cfg.grad_clip > 0:
            self._clip_gradients(cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    @torch.no_grad()
    def evaluate(self) -> list[dict]:
        """Held-out metrics of every run, as train.evaluate: linear R^2, MCC and DCI-D of L2-normalised
        embeddings of the run's own seed's two evaluation sets."""
        n = self.configs[0].eval_samples
        sets = {split: [ds.eval_set(n, split) for ds in self.datasets.values()] for split in ("train", "test")}
        emb = {split: F.normalize(self.encoder(torch.stack([x for x, _ in s])[self.run_data]), dim=-1)
               for split, s in sets.items()}
        results = []
        for r, k in enumerate(self.run_data.tolist()):
            results.append(metrics_mod.evaluate(emb["train"][r], sets["train"][k][1], emb["test"][r],
                                                sets["test"][k][1]))
        return results

    def train(self, advance=None, eval_steps=()) -> tuple[list[dict], list[dict]]:
        """Train every run for the configs' steps; -> (final metrics per run, curve records at `eval_steps`).

        `advance(k)` is called after every step with k = the number of runs (a progress bar's update)."""
        curve, steps = [], self.configs[0].steps
        for step in range(1, steps + 1):
            losses = self.step(step)
            if (step % CHECK_EVERY == 0 or step == steps) and not bool(torch.isfinite(losses).all()):
                bad = [self.configs[r].method for r in torch.nonzero(~torch.isfinite(losses))[:, 0].tolist()]
                raise FloatingPointError(f"step {step}: non-finite loss in run(s) of {', '.join(bad)}")
            if step in eval_steps:
                curve.append({"step": step, "runs": self.evaluate()})
            if advance is not None:
                advance(len(self.configs))
        return self.evaluate(), curve


# ----------------------------------------------------------------------------------------------------
# Statistics and report.


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def paired(summary: dict, method: str, baseline: str = "simclr") -> dict:
    """Per metric: the per-seed differences method - baseline, their mean and how many favour `method`."""
    out = {}
    for k in METRICS:
        deltas = [a - b for a, b in zip(summary[method][k]["values"], summary[baseline][k]["values"], strict=True)]
        out[k] = {"deltas": deltas, "mean": sum(deltas) / len(deltas), "ahead": sum(d > 0 for d in deltas)}
    return out


def _table(rows: dict, title: str) -> str:
    lines = [title, f"{'method':<22}" + "".join(f"{METRIC_NAMES[m]:>18}" for m in METRICS)]
    for name, res in rows.items():
        lines.append(f"{name:<22}" + "".join(f"{res[m]['mean']:>10.3f} +- {res[m]['std']:.3f}" for m in METRICS))
    return "\n".join(lines)


def _paired_table(pairs: dict, seeds: int) -> str:
    lines = [f"paired against simclr (same seed: same mixing, data stream and initialisation; "
             f"per seed 0..{seeds - 1}, mean, seeds ahead)"]
    for method, by_metric in pairs.items():
        for k, p in by_metric.items():
            per_seed = " ".join(f"{d:+.3f}" for d in p["deltas"])
            lines.append(f"{method:<10} {METRIC_NAMES[k]:<11} {per_seed}   mean {p['mean']:+.3f}   "
                         f"ahead on {p['ahead']}/{seeds}")
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
    ax.set_xticks(range(len(METRICS)), [METRIC_NAMES[k] for k in METRICS])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("synthetic natural pairs (docs/spec.md 6.4), held-out, mean +- std over seeds (mixings)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# Main.


# Worker processes: each trains one stacked group with its own interpreter, so the groups' Python (the loss
# heads are many small ops) runs in parallel instead of taking turns on one GIL.

_run_steps_done = None  # in a worker: the multiprocessing.Value counting the run-steps of every worker


def _share_counter(counter) -> None:
    global _run_steps_done
    _run_steps_done = counter


def _count_run_steps(k: int) -> None:
    with _run_steps_done.get_lock():
        _run_steps_done.value += k


def _train_group(configs: list[train.Config], eval_steps: tuple, threads: int) -> tuple[list[dict], list[dict]]:
    """In a worker process: Runs(configs).train, counting its run-steps for the parent's progress bar."""
    torch.set_num_threads(threads)
    return Runs(configs).train(_count_run_steps, eval_steps)


def train_groups(groups: list[list[train.Config]], eval_steps=(), advance=None) -> list[tuple[list[dict], list[dict]]]:
    """Train each group of runs as one stacked `Runs` in its own worker process, side by side; -> per group,
    `Runs.train`'s (final metrics per run, curve records at `eval_steps`).

    Workers are spawned (fresh interpreters: no forked thread pools) with CPUs / len(groups) torch threads
    each; every group builds its own seeds' data. `advance(k)` is called here as the workers complete k more
    run-steps (a progress bar's update). The first worker to fail stops the others and its error is raised."""
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    seen = 0
    with ctx.Pool(len(groups), initializer=_share_counter, initargs=(counter,)) as pool:  # exit: terminate
        pending = [pool.apply_async(_train_group, (g, tuple(eval_steps), threads)) for g in groups]
        while True:
            finished = [r for r in pending if r.ready()]
            now = counter.value
            if advance is not None and now > seen:
                advance(now - seen)
                seen = now
            for r in finished:
                if not r.successful():
                    r.get()  # raises the worker's error
            if len(finished) == len(pending):
                return [r.get() for r in pending]
            time.sleep(0.2)


def _train_all(args, taus: list[float]) -> dict:
    """{(method, tau): [metrics of seed 0, 1, ...]}: the runs dealt round-robin into `--workers` stacked
    groups, trained side by side in worker processes."""
    from tqdm import tqdm

    jobs = [(m, seed, tau) for tau in taus for m in args.methods for seed in range(args.seeds)]
    groups = [jobs[i::args.workers] for i in range(min(args.workers, len(jobs)))]
    name = f"compare ({len(jobs)} runs)"
    bar = tqdm(total=args.steps * len(jobs), desc=f"{name}: building the data", unit=" run-steps",
               dynamic_ncols=True, file=sys.stderr, disable=not args.progress)

    def advance(k: int) -> None:
        if bar.n == 0:  # training has begun: time the rate and the ETA from here, not from the data's build
            bar.set_description(name, refresh=False)
            bar.reset()
        bar.update(k)

    with bar:
        results = train_groups([[run_config(m, seed, tau, args) for m, seed, tau in g] for g in groups],
                               advance=advance)
    by_job = {job: ev for group, (group_evals, _) in zip(groups, results, strict=True)
              for job, ev in zip(group, group_evals, strict=True)}
    return {(m, tau): [by_job[m, seed, tau] for seed in range(args.seeds)] for m in args.methods for tau in taus}


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: {e.strerror or e}") from None
    return args


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    taus = args.taus if args.tune_tau else [args.temperature]
    out = args.out
    print(f"compare: {len(args.methods)} methods x {len(taus)} temperature(s) x {args.seeds} seeds, {args.steps} "
          f"steps ({args.lr_schedule} lr {args.lr:g}), batch {args.batch_size}, {args.workers} worker(s)",
          file=sys.stderr)
    t0 = time.perf_counter()
    results = _train_all(args, taus)
    elapsed = time.perf_counter() - t0

    per_tau = {m: {tau: {k: _stats([r[k] for r in results[m, tau]]) for k in METRICS} for tau in taus}
               for m in args.methods}
    summary = {}
    for m in args.methods:
        best = max(taus, key=lambda t, m=m: per_tau[m][t]["r2"]["mean"])
        summary[m] = dict(per_tau[m][best], temperature=best)
    if args.tune_tau:
        rows = {f"{m} tau={tau:g}": per_tau[m][tau] for m in args.methods for tau in taus}
        print(_table(rows, "temperature sweep (held-out, mean +- std over seeds)"))
        print()
    rows = {f"{m} (tau={summary[m]['temperature']:g})": summary[m] for m in args.methods}
    print(_table(rows, f"{args.seeds} seeds x {args.steps} steps, {elapsed:.0f} s (held-out, mean +- std over seeds)"))
    pairs = {}
    if "simclr" in args.methods:
        pairs = {m: paired(summary, m) for m in args.methods if m != "simclr"}
        if pairs:
            print()
            print(_paired_table(pairs, args.seeds))

    cfg = run_config(args.methods[0], 0, taus[0], args)
    report = {m: summary[m] for m in args.methods}
    report["meta"] = {
        "paired": pairs,
        "per_temperature": {m: {f"{tau:g}": v for tau, v in d.items()} for m, d in per_tau.items()},
        "protocol": {"benchmark": "docs/spec.md 6.4 synthetic natural pairs (n=10, keep 0.8, 3-layer invertible MLP "
                                  "mixing with docs/spec.md 6.1's 25,000-matrix conditioning, standardised; one "
                                  "mixing per seed)",
                     "metrics": "held-out, L2-normalised embeddings: linear R^2, MCC (Pearson+Hungarian), DCI-D "
                                "(LassoCV importances)",
                     "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "lr_schedule": args.lr_schedule, "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip,
                     "eval_samples": args.eval_samples, "temperatures": taus, "tune_tau": args.tune_tau,
                     "methods": {m: _method_meta(run_config(m, 0, taus[0], args)) for m in args.methods}},
        "time_s": elapsed,
    }
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if _plot(summary, out / "compare.png"):
        print(f"chart: {out / 'compare.png'}")
    print(json_path)
    return 0


def _method_meta(cfg: train.Config) -> dict:
    meta = {"method": cfg.method}
    if cfg.method.startswith("adassl"):
        meta.update(editor=cfg.editor, beta=cfg.beta, beta_warmup_steps=train.beta_warmup_steps(cfg))
    return meta


if __name__ == "__main__":
    raise SystemExit(main())
