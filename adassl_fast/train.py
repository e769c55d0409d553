"""`adassl-fast train` / `python -m adassl_fast.train`: a thin trainer for AdaSSL, SimCLR, InfoNCE and BYOL.

One file, read top to bottom: the config (a dataclass; presets; every field is a CLI flag), the encoders,
the model (encoder + loss head, one forward per step so DDP sees one call), checkpoints, the loop.

    adassl-fast train --method adassl-v --steps 2000 --out runs/v          # embedded synthetic benchmark
    adassl-fast train --method adassl-s --data frames --data-path clips/ --frame-gap 2 --augment weak
    torchrun --nproc-per-node 2 -m adassl_fast.train --method simclr --out runs/ddp

Runs on CPU or GPU (bf16 autocast on CUDA), in one process or under torchrun (DDP; with
adassl_fast.distributed present the loss takes the negatives of every rank). A run directory holds
config.json (the resolved config), metrics.jsonl (one line per logged step) and checkpoint.pt (written to
a temp file then renamed, so a crash never leaves a half-written checkpoint). `--resume` reloads it with
the RNG states: the continued run reproduces the uninterrupted one step for step (every batch is a
function of (seed, rank, step), so no loader state is needed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adassl_fast import data as data_mod
from adassl_fast import metrics as metrics_mod
from adassl_fast.cached import cached_backward
from adassl_fast.nn import AdaSSL, InfoNCELoss, NTXentLoss, build_mlp, byol_tau, ema_update

METHODS = ("simclr", "infonce", "byol", "adassl-v", "adassl-s")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class Config:
    # what to train
    method: str = "adassl-v"  # simclr | infonce | byol | adassl-v | adassl-s
    objective: str = "simclr"  # AdaSSL's SSL loss: simclr | byol
    editor: str = ""  # AdaSSL editor: add | mlp | modular ("" = add for v, modular for s)
    emb_dim: int = 16
    latent_dim: int = 16
    latent_hidden: tuple = (128, 128)
    editor_hidden: tuple = ()
    beta: float = 0.5
    beta_warmup_steps: int = -1  # -1: SPEC 7's share, steps / 15 for adassl-v (10k of 150k), 0 for adassl-s
    temperature: float = 0.05
    learnable_scale: bool = False
    ema_tau: float = 0.996  # BYOL target network base tau
    # data
    data: str = "synthetic"  # synthetic | frames | csv
    data_path: str = ""
    frame_gap: int = 1
    image_size: int = 64
    augment: str = "none"  # none | weak | strong
    n_latents: int = 10
    keep_prob: float = 0.8
    mixing_layers: int = 3
    data_seed: int = -1  # the synthetic mixing g and its held-out sets; -1: --seed (one mixing per seed)
    # encoder
    encoder: str = "auto"  # mlp | resnet (auto: mlp for synthetic, resnet for images)
    encoder_hidden: tuple = (256, 256, 256)
    # optimisation
    steps: int = 5000  # where the slowest method, AdaSSL-V, levels off (bench/results/2026-12-03-compare-convergence)
    batch_size: int = 256  # pairs per step per rank
    lr: float = 1e-3
    # constant | cosine (lr * (1 + cos(pi (k - 1) / steps)) / 2 at step k). Constant: at 5000 steps cosine leaves
    # AdaSSL-V well short of its plateau (held-out R^2 0.845 against 0.916; 2026-12-03-compare-convergence).
    lr_schedule: str = "constant"
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 123
    chunk_size: int = 0  # > 0: cached (GradCache) backward through the encoder, chunk_size rows at a time
    # evaluation and bookkeeping
    eval_samples: int = 4096
    eval_every: int = 0  # 0: only at the end
    log_every: int = 50
    ckpt_every: int = 500
    out: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    stop_after: int = 0  # stop this invocation after this many steps (simulates a preemption; 0 = never)
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = 1 for the synthetic MLP on CPU (tiny ops), torch's default otherwise
    impl: str = "auto"
    progress: bool = True


PRESETS = {
    # the benchmark protocol of `adassl-fast compare` (SPEC 7's 3DIdent settings scaled to the synthetic task)
    "synthetic": {},
    "tiny": dict(steps=30, batch_size=32, latent_hidden=(32,), encoder_hidden=(64,), eval_samples=512,
                 log_every=5, ckpt_every=10, progress=False),
}

# Fields that may differ between a run and its resumption.
RESUMABLE = {"threads", "steps", "resume", "stop_after", "progress", "log_every", "ckpt_every", "eval_every",
             "overwrite", "device", "impl", "out"}


# ----------------------------------------------------------------------------------------------------
# Config from the command line.


def _parse_value(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    if kind is tuple:
        return tuple(int(s) for s in text.replace(",", "-").split("-") if s)
    return kind(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adassl-fast train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    p.add_argument("--config", help="a JSON file of config fields (flags override it)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        kind = type(getattr(defaults, f.name))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, nargs="?", const=True, default=None, type=lambda t: _parse_value(bool, t),
                           metavar="BOOL")
        else:
            p.add_argument(flag, default=None, type=lambda t, k=kind: _parse_value(k, t),
                           help="sizes as 128-128" if kind is tuple else None)
    return p


def config_from_args(argv) -> Config:
    args = build_parser().parse_args(argv)
    values = dict(PRESETS[args.preset])
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "config")})
    return make_config(**values)


def make_config(**values) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.data not in ("synthetic", "frames", "csv"):
        raise ValueError(f"data must be synthetic, frames or csv, got {cfg.data!r}")
    if cfg.data != "synthetic" and not cfg.data_path:
        raise ValueError(f"--data {cfg.data} needs --data-path")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError("steps must be >= 1 and batch_size >= 2")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Encoders.


def mlp_encoder(n_in: int, hidden, n_out: int) -> nn.Sequential:
    """cl-ica-style encoder: Linear + LeakyReLU(0.01) hidden layers, linear output (no normalisation)."""
    layers: list[nn.Module] = []
    for a, b in zip((n_in, *hidden), hidden, strict=False):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.01)]
    layers.append(nn.Linear(([n_in, *hidden])[-1], n_out))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # zero_init_residual, as the reference's ResNet-18
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet-10-ish backbone (3x3 stem, no max-pool, 4 stages) + the SimCLR projector (no BN)."""

    def __init__(self, emb_dim: int, widths=(32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c = widths[0]
        for i, w in enumerate(widths):
            layers.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projector = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, emb_dim, bias=False))

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------------------------------
# The model: encoder + loss head; one call per step (DDP needs a single forward per iteration).


def _distributed_group(world_size: int):
    if world_size <= 1:
        return None
    if importlib.util.find_spec("adassl_fast.distributed") is None:
        return None  # each rank contrasts its own rows only
    return dist.group.WORLD


class SSLModel(nn.Module):
    def __init__(self, cfg: Config, encoder: nn.Module, process_group=None):
        super().__init__()
        self.method = cfg.method
        self.encoder = encoder
        d = cfg.emb_dim
        if cfg.method == "simclr":
            self.head = NTXentLoss(cfg.temperature, cfg.learnable_scale, impl=cfg.impl, process_group=process_group)
        elif cfg.method == "infonce":
            self.head = InfoNCELoss(cfg.temperature, cfg.learnable_scale, impl=cfg.impl, process_group=process_group)
        elif cfg.method == "byol":
            self.head = build_mlp([d, 4 * d, d], bias=False, xavier=False)  # the predictor
        else:
            self.head = AdaSSL(
                d, cfg.latent_dim, variant=cfg.method[-1], editor=cfg.editor or None, hidden=cfg.latent_hidden,
                editor_hidden=cfg.editor_hidden, objective=cfg.objective, beta=cfg.beta,
                beta_warmup_steps=beta_warmup_steps(cfg), temperature=cfg.temperature,
                learnable_scale=cfg.learnable_scale, impl=cfg.impl, process_group=process_group,
            )
        self.needs_target = cfg.method == "byol" or (cfg.method.startswith("adassl") and cfg.objective == "byol")

    def loss(self, e_x, e_y, t_x=None, t_y=None) -> dict:
        if self.method == "simclr":
            loss = self.head(torch.cat([e_y, e_x]), torch.cat([e_x, e_y]))
            return {"loss": loss, "l_ssl": loss}
        if self.method == "infonce":
            loss = self.head(e_x, e_y)
            return {"loss": loss, "l_ssl": loss}
        if self.method == "byol":
            loss = (-F.cosine_similarity(self.head(e_x), t_y, dim=1).mean()
                    - F.cosine_similarity(self.head(e_y), t_x, dim=1).mean())
            return {"loss": loss, "l_ssl": loss}
        return self.head(e_x, e_y, t_x, t_y)

    def forward(self, x, y, t_x=None, t_y=None) -> dict:
        return self.loss(self.encoder(x), self.encoder(y), t_x, t_y)


# ----------------------------------------------------------------------------------------------------
# Checkpoints.


class CheckpointError(RuntimeError):
    pass


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace: the old file stays until the new
    one is complete."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --out at the "
                              "run directory)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / garbage files raise many different errors
        raise CheckpointError(f"--resume: checkpoint {path} is corrupted or unreadable ({type(e).__name__}: {e}); "
                              "it was left untouched") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume: {path} is not an adassl-fast checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


# ----------------------------------------------------------------------------------------------------
# Setup.


def setup_distributed(cfg: Config):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def beta_warmup_steps(cfg: Config) -> int:
    """The beta warm-up W in steps: the configured one, or for -1 SPEC 7's share of training (AdaSSL-V warms
    up over 10k of 150k steps, AdaSSL-S not at all). `adassl-fast compare` uses the same."""
    if cfg.beta_warmup_steps >= 0:
        return cfg.beta_warmup_steps
    if cfg.beta_warmup_steps != -1:
        raise ValueError(f"beta_warmup_steps must be >= 0, or -1 for SPEC 7's share, got {cfg.beta_warmup_steps}")
    return round(cfg.steps / 15) if cfg.method == "adassl-v" else 0


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate of 1-indexed step `step`: constant, or cosine from lr at step 1 towards 0."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * (1 + math.cos(math.pi * (step - 1) / cfg.steps)) / 2
    raise ValueError(f"lr_schedule must be constant or cosine, got {cfg.lr_schedule!r}")


def make_data(cfg: Config, rank: int, world_size: int):
    if cfg.data == "synthetic":
        data_seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
        return data_mod.SyntheticPairs(cfg.n_latents, cfg.keep_prob, cfg.mixing_layers, data_seed, rank=rank,
                                       batch_seed=cfg.seed)
    pairs = (data_mod.frame_pairs(cfg.data_path, cfg.frame_gap) if cfg.data == "frames"
             else data_mod.csv_pairs(cfg.data_path))
    return data_mod.ImagePairs(pairs, cfg.image_size, cfg.augment, cfg.seed, rank, world_size)


def make_encoder(cfg: Config) -> nn.Module:
    kind = cfg.encoder if cfg.encoder != "auto" else ("mlp" if cfg.data == "synthetic" else "resnet")
    if kind == "mlp":
        if cfg.data != "synthetic":
            raise ValueError("the mlp encoder takes the synthetic benchmark's vectors; use --encoder resnet for images")
        return mlp_encoder(cfg.n_latents, cfg.encoder_hidden, cfg.emb_dim)
    if kind == "resnet":
        return SmallResNet(cfg.emb_dim)
    raise ValueError(f"encoder must be mlp, resnet or auto, got {cfg.encoder!r}")


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW as the reference: 1-D parameters without weight decay, everything else (0-dim lambda too) with it."""
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = [p for p in params if p.ndim == 1]
    decay = [p for p in params if p.ndim != 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


@torch.no_grad()
def embed(encoder: nn.Module, x: torch.Tensor, device, batch: int = 4096) -> torch.Tensor:
    was = encoder.training
    encoder.eval()
    out = torch.cat([encoder(x[i:i + batch].to(device)).float() for i in range(0, len(x), batch)])
    encoder.train(was)
    return F.normalize(out, dim=1).cpu()  # metrics on L2-normalised embeddings (SPEC 5.1)


def evaluate(encoder: nn.Module, dataset, cfg: Config, device) -> dict:
    if not isinstance(dataset, data_mod.SyntheticPairs):
        return {}
    x_tr, z_tr = dataset.eval_set(cfg.eval_samples, "train")
    x_te, z_te = dataset.eval_set(cfg.eval_samples, "test")
    return metrics_mod.evaluate(embed(encoder, x_tr, device), z_tr, embed(encoder, x_te, device), z_te)


# ----------------------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config) -> dict:
    """Train per `cfg`; returns {"step", "losses" (per logged step), "eval" (final metrics), "out"}."""
    rank, world_size, device = setup_distributed(cfg)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    resume_payload = None
    if cfg.resume:
        resume_payload = load_checkpoint(ckpt_path)
        saved = resume_payload["config"]
        changed = {k for k in saved if k not in RESUMABLE and saved[k] != _jsonable(getattr(cfg, k, None))}
        if changed:
            raise CheckpointError(f"--resume: config differs from the checkpoint's in {', '.join(sorted(changed))}")
    elif ckpt_path.exists() and not cfg.overwrite:
        raise CheckpointError(f"{ckpt_path} exists: pass --resume to continue that run or --overwrite to start over")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_jsonable(dataclasses.asdict(cfg)), indent=2) + "\n")

    threads = cfg.threads or (1 if device.type == "cpu" and cfg.data == "synthetic" else 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed + rank)
    dataset = make_data(cfg, rank, world_size)
    encoder = make_encoder(cfg).to(device)
    model = SSLModel(cfg, encoder, _distributed_group(world_size)).to(device)
    target = copy.deepcopy(encoder).requires_grad_(False) if model.needs_target else None
    optimizer = make_optimizer(model, cfg)
    start = 0
    if resume_payload is not None:
        model.load_state_dict(resume_payload["model"])
        optimizer.load_state_dict(resume_payload["optimizer"])
        if target is not None:
            target.load_state_dict(resume_payload["target"])
        torch.set_rng_state(resume_payload["rng"][rank]["torch"])
        if device.type == "cuda" and "cuda" in resume_payload["rng"][rank]:
            torch.cuda.set_rng_state(resume_payload["rng"][rank]["cuda"], device)
        start = resume_payload["step"]
    ddp = model
    if world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    if cfg.chunk_size > 0 and world_size > 1:
        raise RuntimeError("--chunk-size under torchrun is not supported by this trainer yet; run one process")

    metrics_file = out / "metrics.jsonl"
    if rank == 0:
        _truncate_metrics(metrics_file, start)
    end = cfg.steps if cfg.stop_after <= 0 else min(cfg.steps, start + cfg.stop_after)
    bar = None
    if rank == 0 and cfg.progress and end > start:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.method, dynamic_ncols=True)
    losses, t0 = [], time.perf_counter()
    for step in range(start + 1, end + 1):
        x, y = (t.to(device, non_blocking=True) for t in dataset.batch(step, cfg.batch_size))
        t_x = t_y = None
        if target is not None:
            with torch.no_grad(), autocast:
                t_x, t_y = target(x).float(), target(y).float()
        with autocast:
            if cfg.chunk_size > 0:
                out_step = _chunked_step(model, x, y, t_x, t_y, cfg.chunk_size)
            else:
                out_step = ddp(x, y, t_x, t_y)
        if cfg.chunk_size <= 0:
            out_step["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if target is not None:
            ema_update(target, encoder, byol_tau(step, cfg.steps, cfg.ema_tau))

        loss = float(out_step["loss"].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.log_every == 0 or step == end:
            record = {"step": step, "loss": loss, "time": time.perf_counter() - t0}
            for k in ("l_ssl", "l_reg", "beta"):
                if k in out_step:
                    record[k] = float(out_step[k].detach())
            head_scale = getattr(model.head, "scale", None)
            if head_scale is not None:
                record["lambda"] = float(head_scale.detach())
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps and rank == 0:
                record.update(_scalars(evaluate(encoder, dataset, cfg, device)))
            losses.append(record)
            if rank == 0:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if step % cfg.ckpt_every == 0 or step == end:
            rng = _rng_state(device)
            if world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, rng)
                rng = gathered
            else:
                rng = [rng]
            if rank == 0:
                save_checkpoint(ckpt_path, {
                    "format": CHECKPOINT_FORMAT, "step": step, "config": _jsonable(dataclasses.asdict(cfg)),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "target": None if target is None else target.state_dict(), "rng": rng,
                })
    if bar is not None:
        bar.close()
    result = {"step": end, "losses": losses, "out": str(out), "time": time.perf_counter() - t0}
    if end == cfg.steps and rank == 0:
        result["eval"] = evaluate(encoder, dataset, cfg, device)
        if result["eval"]:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": end, "eval": True, **_scalars(result["eval"])}) + "\n")
    return result


def _chunked_step(model: SSLModel, x, y, t_x, t_y, chunk_size: int) -> dict:
    """GradCache step: the encoder runs chunk by chunk, the loss head on the whole batch (exact gradients;
    BatchNorm layers of an image encoder then normalise per chunk)."""
    parts: dict = {}

    def loss_fn(e_x, e_y):
        parts.update(model.loss(e_x, e_y, t_x, t_y))
        return parts["loss"]

    cached_backward(model.encoder, [x, y], loss_fn, chunk_size=chunk_size, allow_batch_dependent=True)
    return parts


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a crash between checkpoint and log)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
            and not json.loads(line).get("eval")]
    path.write_text("".join(line + "\n" for line in keep))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"adassl-fast train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"step": result["step"], "out": result["out"], "time_s": round(result["time"], 2)}
        if result["losses"]:
            summary["loss"] = result["losses"][-1]["loss"]
        summary.update(_scalars(result.get("eval", {})))
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
