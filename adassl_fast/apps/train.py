"""`adassl-fast train` / `python -m adassl_fast.apps.train`: a thin trainer for AdaSSL, SimCLR, InfoNCE and BYOL.

One file, read top to bottom: the config (a dataclass; presets; every field is a CLI flag), the encoders,
the model (encoder + loss head, one forward per step so DDP sees one call), checkpoints, the loop.

    adassl-fast train --method adassl-v --steps 2000 --out runs/v          # embedded synthetic benchmark
    adassl-fast train --method adassl-s --data frames --data-path clips/ --frame-gap 2 --augment weak
    torchrun --nproc-per-node 2 -m adassl_fast.apps.train --method simclr --out runs/ddp

Runs on CPU or GPU (bf16 autocast on CUDA), in one process or under torchrun (DDP; with
adassl_fast.distributed present the loss takes the negatives of every rank). A run directory holds
config.json (the resolved config), metrics.jsonl (one line per logged step) and checkpoint.pt (a SHA-256
digest line, then the torch.save bytes; written to a temp file, verified, then renamed, the checkpoint it
replaces kept as checkpoint.prev.pt). `--resume` reloads it (or, when it is missing or fails its digest,
the previous one, saying so) with the RNG states: the continued run reproduces the uninterrupted one step
for step (every batch is a function of (seed, rank, step), so no loader state is needed). It refuses a
changed config, world size, or `--steps` below the checkpoint's step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
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

from adassl_fast._dispatch import IMPLS, BackendUnavailable, resolve_impl
from adassl_fast.apps import data as data_mod
from adassl_fast.apps import metrics as metrics_mod
from adassl_fast.apps.cli import Option, Parser, check_device
from adassl_fast.cached import cached_backward
from adassl_fast.nn import AdaSSL, InfoNCELoss, NTXentLoss, build_mlp, byol_tau, ema_update

METHODS = ("simclr", "infonce", "byol", "adassl-v", "adassl-s")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: a digest header before the torch.save bytes
WSD_DECAY_FRACTION = 0.2  # lr_schedule wsd: the share of the steps over which the learning rate decays to 0


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
    beta_warmup_steps: int = -1  # -1: docs/spec.md 7's share, steps / 15 for adassl-v (10k of 150k), 0 for adassl-s
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
    # Past every method's level-off on every metric: the slowest, AdaSSL-V's linear R^2, levels off at 5000 steps and
    # peaks at 5500; at this constant rate every method then declines (bench/results/2026-12-03-compare-convergence).
    steps: int = 6000
    batch_size: int = 256  # pairs per step per rank
    lr: float = 1e-3  # 2e-3: AdaSSL-V levels off earlier but lower, and every method declines faster (same results)
    # constant | cosine (lr * (1 + cos(pi (k - 1) / steps)) / 2 at step k) | wsd (constant, then linear to 0 over
    # the last WSD_DECAY_FRACTION of the steps; see lr_at). Constant: at 5000 steps cosine leaves AdaSSL-V short of
    # its plateau (held-out R^2 0.845 from lr 1e-3, 0.904 from 2e-3, against 0.922 constant); under wsd AdaSSL-V
    # still gains up to the 5000-step budget (0.858 at 3500, 0.920) while SimCLR falls (0.892 at 2000, 0.874).
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
    # the benchmark protocol of `adassl-fast compare` (docs/spec.md 7's 3DIdent settings scaled to the synthetic task)
    "synthetic": {},
    "tiny": dict(steps=30, batch_size=32, latent_hidden=(32,), encoder_hidden=(64,), eval_samples=512,
                 log_every=5, ckpt_every=10, progress=False),
}

# Fields that may differ between a run and its resumption.
RESUMABLE = {"threads", "steps", "resume", "stop_after", "progress", "log_every", "ckpt_every", "eval_every",
             "overwrite", "device", "impl", "out"}

_SIZES = dict(kind=tuple, minimum=1)
# Every Config field's type, range or choices and help: the one place a value is accepted or refused,
# whether it comes from a flag, a --config file or make_config's keyword arguments.
OPTIONS = {
    "method": Option("what to train", choices=METHODS),
    "objective": Option("AdaSSL's SSL loss", choices=("simclr", "byol")),
    "editor": Option("AdaSSL editor ('' = add for adassl-v, modular for adassl-s)",
                     choices=("", "add", "mlp", "modular")),
    "emb_dim": Option("embedding width d", int, minimum=1),
    "latent_dim": Option("latent width d_r (== emb_dim for the add editor)", int, minimum=1),
    "latent_hidden": Option("hidden sizes of the posterior / prior networks, as 128-128", **_SIZES),
    "editor_hidden": Option("hidden sizes of the mlp editor, as 128-128 (empty: none)", **_SIZES),
    "beta": Option("weight of the latent regulariser", float, minimum=0),
    "beta_warmup_steps": Option("steps over which beta ramps up from 0 (-1: steps / 15 for adassl-v, 0 for adassl-s)",
                                int, minimum=-1),
    "temperature": Option("contrastive temperature tau", float, above=0),
    "learnable_scale": Option("learn the logit scale lambda", bool),
    "ema_tau": Option("BYOL target network base EMA rate", float, minimum=0, maximum=1),
    "data": Option("training pairs", choices=("synthetic", "frames", "csv")),
    "data_path": Option("frames: a folder of clip folders; csv: a file of path_a,path_b rows"),
    "frame_gap": Option("frames: pair frame i with frame i + gap", int, minimum=1),
    "image_size": Option("images are resized / cropped to this square size", int, minimum=8),
    "augment": Option("image augmentation strength", choices=("none", "weak", "strong")),
    "n_latents": Option("synthetic: number of latent factors", int, minimum=1),
    "keep_prob": Option("synthetic: probability a latent is shared by the pair", float, minimum=0, maximum=1),
    "mixing_layers": Option("synthetic: layers of the mixing MLP", int, minimum=1),
    "data_seed": Option("synthetic: seed of the mixing function (-1: --seed, one mixing per seed)", int, minimum=-1),
    "encoder": Option("mlp (vectors) or resnet (images); auto picks by --data", choices=("auto", "mlp", "resnet")),
    "encoder_hidden": Option("hidden sizes of the mlp encoder, as 256-256", **_SIZES),
    "steps": Option("total optimisation steps of the run", int, minimum=1),
    "batch_size": Option("pairs per step per rank", int, minimum=2),
    "lr": Option("AdamW learning rate", float, above=0),
    "lr_schedule": Option("learning-rate schedule over the run (wsd: constant, then linear to 0 over the last fifth)",
                          choices=("constant", "cosine", "wsd")),
    "weight_decay": Option("AdamW weight decay (not on 1-D parameters)", float, minimum=0),
    "grad_clip": Option("clip the gradient norm to this (0: off)", float, minimum=0),
    "seed": Option("seed of initialisation and batches", int, minimum=0),
    "chunk_size": Option("> 0: cached (GradCache) backward through the encoder, this many rows at a time", int,
                         minimum=0),
    "eval_samples": Option("synthetic: samples per split for R^2 / MCC / DCI, >= max(100, 10 x n_latents)", int,
                           minimum=1),
    "eval_every": Option("evaluate every this many steps (0: only at the end)", int, minimum=0),
    "log_every": Option("write metrics.jsonl every this many steps", int, minimum=1),
    "ckpt_every": Option("write the checkpoint every this many steps", int, minimum=1),
    "out": Option("run directory (config.json, metrics.jsonl, checkpoint.pt)"),
    "resume": Option("continue the run in --out from its checkpoint", bool),
    "overwrite": Option("start over in an --out that holds a run", bool),
    "stop_after": Option("stop this invocation after this many steps (0: never; simulates a preemption)", int,
                         minimum=0),
    "device": Option("auto (cuda if available), cpu, cuda or cuda:N"),
    "threads": Option("torch CPU threads (0: 1 for the synthetic MLP on CPU, torch's default otherwise)", int,
                      minimum=0),
    "impl": Option("loss backend", choices=("auto",) + IMPLS),
    "progress": Option("show a progress bar", bool),
}


# ----------------------------------------------------------------------------------------------------
# Config from the command line.


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="adassl-fast train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic",
                   help="starting values of the fields (default: synthetic)")
    p.add_argument("--config", metavar="JSON", help="a JSON file of config fields (flags override it)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        option = OPTIONS[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = "-".join(map(str, default)) if option.kind is tuple else default
        allowed = f"; {option.allowed()}" if option.allowed() else ""
        help_text = f"{option.help}{allowed} (default: {shown!r})".replace("%", "%%")
        # default=None: only the flags given override the preset and the config file
        extra = dict(nargs="?", const=True, metavar="BOOL") if option.kind is bool else {}
        p.add_argument(flag, default=None, type=option.parse, help=help_text, **extra)
    return p


def config_from_args(argv) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset])
    if args.config:
        try:
            values.update(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError) as e:
            parser.error(f"--config {args.config}: {e}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "config")})
    return make_config(**values)


def make_config(**values) -> Config:
    """A checked Config: every field per OPTIONS, then the rules that tie fields together (ValueError)."""
    unknown = set(values) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = Config(**{k: OPTIONS[k].check(k, v) for k, v in values.items()})
    if cfg.data != "synthetic" and not cfg.data_path:
        raise ValueError(f"--data {cfg.data} needs --data-path")
    encoder = _encoder_kind(cfg)
    if (encoder == "mlp") != (cfg.data == "synthetic"):
        raise ValueError(f"--encoder {encoder} cannot take --data {cfg.data}: the mlp encoder takes the synthetic "
                         "benchmark's vectors, the resnet encoder takes images")
    # With a handful of samples MCC and R^2 come out near 1 whatever the encoder (2 samples: MCC 1.0).
    least = max(100, 10 * cfg.n_latents)
    if cfg.data == "synthetic" and cfg.eval_samples < least:
        raise ValueError(f"eval_samples must be >= max(100, 10 x n_latents) = {least} for R^2 / MCC / DCI to mean "
                         f"anything, got {cfg.eval_samples}")
    check_device(cfg.device)
    if cfg.impl != "auto":  # ("auto" always finds a backend)
        try:
            resolve_impl(cfg.impl, _device(cfg.device, 0))
        except BackendUnavailable as e:
            raise ValueError(f"--impl {cfg.impl} cannot run with --device {cfg.device}: {e}") from None
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


def uses_target_network(cfg: Config) -> bool:
    """BYOL, alone or as AdaSSL's objective, trains against an EMA target network."""
    return cfg.method == "byol" or (cfg.method.startswith("adassl") and cfg.objective == "byol")


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
        self.needs_target = uses_target_network(cfg)

    def loss(self, e_x, e_y, t_x=None, t_y=None) -> dict:
        if self.method == "simclr":
            loss = self.head(e_x, e_y)  # SimCLR: nt_xent([e_y; e_x], [e_x; e_y])
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


# A checkpoint file: one header line with the SHA-256 of the torch.save bytes that follow it. A file torn by
# a crash, truncated or with flipped bytes fails the digest instead of resuming from garbage.
_MAGIC = b"adassl-fast checkpoint"


def previous_checkpoint(path: Path) -> Path:
    """Where the last verified checkpoint stays while the next one is written (and after, as a fallback)."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def _serialize(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    return b"%s %d sha256=%s\n" % (_MAGIC, CHECKPOINT_FORMAT, hashlib.sha256(body).hexdigest().encode()) + body


def _verified_body(path: Path) -> bytes:
    """The torch.save bytes of a checkpoint file whose digest matches, else CheckpointError saying why."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from e
    header, _, body = data.partition(b"\n")
    fields = header.split(b" ")
    if not header.startswith(_MAGIC) or len(fields) != 4 or not fields[3].startswith(b"sha256="):
        raise CheckpointError(f"{path} is not an adassl-fast checkpoint of format {CHECKPOINT_FORMAT} "
                              "(or its header is damaged)")
    if fields[2] != str(CHECKPOINT_FORMAT).encode():
        raise CheckpointError(f"{path} has checkpoint format {fields[2].decode(errors='replace')}, this adassl-fast "
                              f"reads format {CHECKPOINT_FORMAT}")
    if hashlib.sha256(body).hexdigest().encode() != fields[3][len(b"sha256="):]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 does not match the digest written with it "
                              "(truncated, or bytes changed on disk)")
    return body


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` with its digest to a temp file, read it back and verify it, then make it `path`.

    The checkpoint it replaces becomes previous_checkpoint(path) (when it verifies: a damaged one never
    displaces a good previous one), so a crash at any point leaves a verified checkpoint to resume from.
    """
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    _write_file(tmp, _serialize(payload))
    _verified_body(tmp)  # what the disk gives back is what was written
    try:
        _verified_body(path)
        os.replace(path, previous_checkpoint(path))
    except CheckpointError:
        pass  # nothing (or nothing good) to keep
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the renames durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict:
    """The payload of `path`, or of the previous checkpoint (with a message on stderr) when `path` is missing
    or fails its digest; CheckpointError naming both files when neither verifies."""
    previous = previous_checkpoint(path)
    if not path.exists() and not previous.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --out at the "
                              "run directory)")
    try:
        body = _verified_body(path)
    except CheckpointError as problem:
        if not previous.exists():
            raise CheckpointError(f"--resume: {problem}; it was left untouched") from None
        try:
            body = _verified_body(previous)
        except CheckpointError as second:
            raise CheckpointError(f"--resume: {problem}; the previous checkpoint is no good either: {second}; both "
                                  "were left untouched") from None
        print(f"adassl-fast train: warning: {problem}; resuming from the previous checkpoint {previous}",
              file=sys.stderr)
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)


def _check_resumable(payload: dict, cfg: Config, world_size: int, path: Path) -> None:
    """Refuse a resumption that would silently change the run: its config, its world size (the global batch
    and every rank's data), or a --steps below the step the checkpoint already reached."""
    saved = payload["config"]
    changed = {k for k in saved if k not in RESUMABLE and saved[k] != _jsonable(getattr(cfg, k, None))}
    if changed:
        raise CheckpointError(f"--resume: config differs from the checkpoint's in {', '.join(sorted(changed))}")
    saved_world = len(payload["rng"])
    if saved_world != world_size:
        raise CheckpointError(
            f"--resume: {path} was written by {saved_world} rank(s) but this run has {world_size}: the global batch "
            f"would change from {saved_world} x {cfg.batch_size} to {world_size} x {cfg.batch_size} pairs and every "
            f"rank's data would differ; resume with {saved_world} rank(s)"
        )
    if cfg.steps < payload["step"]:
        raise CheckpointError(f"--resume: {path} is at step {payload['step']} but --steps is {cfg.steps}; pass "
                              f"--steps {payload['step']} or more")
    stretched = _step_schedules(cfg)
    if cfg.steps != saved["steps"] and stretched:
        raise CheckpointError(f"--resume: --steps {cfg.steps} differs from the run's {saved['steps']}, and the "
                              f"{' and '.join(stretched)} scale with --steps, so the continued run would not be the "
                              f"one checkpointed; resume with --steps {saved['steps']}")


def _step_schedules(cfg: Config) -> list[str]:
    """The schedules of this config that are functions of the run's length (--steps)."""
    schedules = []
    if cfg.lr_schedule != "constant":
        schedules.append(f"{cfg.lr_schedule} learning rate")
    if cfg.beta_warmup_steps == -1 and cfg.method == "adassl-v":
        schedules.append("beta warm-up (steps / 15)")
    if uses_target_network(cfg):
        schedules.append("BYOL target EMA rate")
    return schedules


def _restore(payload: dict, path: Path, modules: dict) -> None:
    """load_state_dict of each named module (model, optimizer, target); a mismatch is a CheckpointError."""
    for name, module in modules.items():
        try:
            module.load_state_dict(payload[name])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--resume: the {name} state in {path} does not fit this {name}: {first}") from None


# ----------------------------------------------------------------------------------------------------
# Setup.


def setup_distributed(cfg: Config):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def beta_warmup_steps(cfg: Config) -> int:
    """The beta warm-up W in steps: the configured one, or for -1 docs/spec.md 7's share of training (AdaSSL-V warms
    up over 10k of 150k steps, AdaSSL-S not at all). `adassl-fast compare` uses the same."""
    if cfg.beta_warmup_steps >= 0:
        return cfg.beta_warmup_steps
    return round(cfg.steps / 15) if cfg.method == "adassl-v" else 0


def wsd_decay_steps(steps: int) -> int:
    """The steps of the wsd schedule's final linear decay: the last WSD_DECAY_FRACTION of the run, at least one."""
    return max(1, round(WSD_DECAY_FRACTION * steps))


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate of 1-indexed step `step` of a run of cfg.steps steps.

    constant: lr. cosine: from lr at step 1 towards 0. wsd (stable, then decay): lr up to and including step
    steps - D + 1, then down by lr / D a step to lr / D at the last step, D = wsd_decay_steps(steps) (a linear
    decay to 0 that spends no step at 0).
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay = wsd_decay_steps(cfg.steps)
        return cfg.lr * min(1.0, (cfg.steps - step + 1) / decay)
    return cfg.lr * (1 + math.cos(math.pi * (step - 1) / cfg.steps)) / 2  # cosine


def make_data(cfg: Config, rank: int, world_size: int):
    if cfg.data == "synthetic":
        data_seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
        return data_mod.SyntheticPairs(cfg.n_latents, cfg.keep_prob, cfg.mixing_layers, data_seed, rank=rank,
                                       batch_seed=cfg.seed)
    pairs = (data_mod.frame_pairs(cfg.data_path, cfg.frame_gap) if cfg.data == "frames"
             else data_mod.csv_pairs(cfg.data_path))
    return data_mod.ImagePairs(pairs, cfg.image_size, cfg.augment, cfg.seed, rank, world_size)


def _encoder_kind(cfg: Config) -> str:
    return cfg.encoder if cfg.encoder != "auto" else ("mlp" if cfg.data == "synthetic" else "resnet")


def make_encoder(cfg: Config) -> nn.Module:
    """The encoder of a checked config: the mlp for the synthetic vectors, the small ResNet for images."""
    if _encoder_kind(cfg) == "mlp":
        return mlp_encoder(cfg.n_latents, cfg.encoder_hidden, cfg.emb_dim)
    return SmallResNet(cfg.emb_dim)


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
    return F.normalize(out, dim=1).cpu()  # metrics on L2-normalised embeddings (docs/spec.md 5.1)


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
        _check_resumable(resume_payload, cfg, world_size, ckpt_path)
    else:
        existing = [p for p in (ckpt_path, previous_checkpoint(ckpt_path)) if p.exists()]
        if existing and not cfg.overwrite:
            raise CheckpointError(f"{existing[0]} exists: pass --resume to continue that run or --overwrite to start "
                                  "over")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(CHECKPOINT + ".tmp*"):  # left by a process killed mid-write
            stale.unlink()
        if not cfg.resume:  # --overwrite: no checkpoint of the old run may be resumed (or fallen back to) later
            for old in (ckpt_path, previous_checkpoint(ckpt_path)):
                old.unlink(missing_ok=True)
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
        restored = {"model": model, "optimizer": optimizer}
        if target is not None:
            restored["target"] = target
        _restore(resume_payload, ckpt_path, restored)
        torch.set_rng_state(resume_payload["rng"][rank]["torch"])
        if device.type == "cuda" and "cuda" in resume_payload["rng"][rank]:
            torch.cuda.set_rng_state(resume_payload["rng"][rank]["cuda"], device)
        start = resume_payload["step"]
    ddp = model
    if world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    if cfg.chunk_size > 0 and world_size > 1:
        raise ValueError("--chunk-size under torchrun is not supported by this trainer yet; run one process")

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
                    "step": step, "config": _jsonable(dataclasses.asdict(cfg)),
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
    """Drop lines logged after the checkpoint we resume from (a crash between checkpoint and log), and a last
    line torn by a crash mid-write; an unreadable line elsewhere is a CheckpointError naming it."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((json.loads(line), line))
        except ValueError as e:
            if i < len(lines) - 1:
                raise CheckpointError(f"{path}:{i + 1} is not a JSON record ({e}); fix or remove that line") from None
    keep = [line for record, line in records if record["step"] <= step and not record.get("eval")]
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
