"""Paired data for the trainer: the embedded synthetic benchmark (no download) and the user's own natural pairs.

Every batch is a pure function of (seed, rank, step): the trainer asks for batch `step` and gets the same
tensors on a resumed run, so no loader state needs checkpointing and `--resume` is exact.

Synthetic (docs/spec.md 6.4, a no-download proxy of AdaSSL's 3DIdent pairing): z ~ U[-1, 1]^n; each coordinate of
z+ keeps z's value w.p. `keep` (0.8) and is otherwise resampled from U[-1, 1]; x = g(z), x+ = g(z+) with
cl-ica's invertible MLP mixing (docs/spec.md 6.1): every weight matrix has U(-1, 1) entries and L2-normalised
columns, and is resampled until its condition number is at most the threshold, the minimum over 25,000
such matrices (one threshold per mixing, as cl-ica's `construct_invertible_mlp`). A draw beats that minimum
w.p. ~1 / 25,000, so building a mixing takes ~1 s on a CPU core (seeds 0-9: 0.6-1.7 s, seed 5 12 s: the
waiting time is heavy-tailed). The seed fixes g, the held-out sets and (by default) the training stream:
one mixing per seed.

Observations are standardised: x = (g(z) - mean) / std per coordinate, with mean and std measured once
on 2^17 draws of z from a stream of their own, so the affine is a fixed part of the seed's frozen
mixing (the same for every batch, step and split), as one would standardise an MLP's inputs. Raw,
g(z) has coordinate std ~0.25 and means up to ~0.5, which leaves a fresh encoder's embeddings nearly
collinear.

Real pairs: a folder of video frames (root/<clip>/<frames sorted by name>, pairs k frames apart within a
clip) or a CSV of image-path pairs (`path_a,path_b` per line, relative paths are relative to the CSV).
Images are read with PIL (needed only here), resized to a square, and optionally augmented with the
small tensor augmentations below (torchvision is not required).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LATENT_SD = math.sqrt(4 / 12)  # sd of U[-1, 1]: AdaSSL divides its latents by it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank, stream), independent across all four."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + stream) * 1_000_033 + rank) * 998_244_353 + step & 0x7FFF_FFFF_FFFF_FFFF)
    return g


# ----------------------------------------------------------------------------------------------------
# Synthetic benchmark.


COND_SAMPLES = 25_000  # docs/spec.md 6.1: cl-ica's n_iter_cond_thresh with cond_thresh_ratio 0 (the minimum)
STANDARDISE_SAMPLES = 1 << 17  # the std of each coordinate's estimated mean / std is ~0.3 % of its std


def _unit_column_matrices(k: int, n: int, g: torch.Generator) -> Tensor:
    """k (n, n) float64 matrices with U(-1, 1) entries and L2-normalised columns."""
    w = torch.rand(k, n, n, generator=g, dtype=torch.float64) * 2 - 1
    return w / w.norm(dim=1, keepdim=True)


def condition_threshold(n: int, cond_samples: int, g: torch.Generator) -> float:
    """The minimum condition number over `cond_samples` random unit-column matrices (advances `g`)."""
    return float(torch.linalg.cond(_unit_column_matrices(cond_samples, n, g)).min())


def _well_conditioned(n: int, threshold: float, g: torch.Generator) -> Tensor:
    """The first unit-column matrix drawn from `g` whose condition number is <= `threshold`."""
    while True:
        # Each draw beats the minimum of 25,000 w.p. ~1 / 25,000, so draw in large chunks.
        w = _unit_column_matrices(4096, n, g)
        ok = torch.nonzero(torch.linalg.cond(w) <= threshold)
        if len(ok):
            return w[ok[0, 0]]


def mixing_mlp(n: int = 10, layers: int = 3, seed: int = 0, cond_samples: int = COND_SAMPLES) -> nn.Sequential:
    """cl-ica's invertible mixing g: `layers` x Linear(n, n, no bias) with LeakyReLU(0.2) between, frozen.

    `mix.cond_threshold` records the threshold every weight matrix met.
    """
    g = torch.Generator().manual_seed(seed)
    threshold = condition_threshold(n, cond_samples, g)
    modules: list[nn.Module] = []
    for i in range(layers):
        lin = nn.utils.skip_init(nn.Linear, n, n, bias=False)  # leaves the global RNG (the trainer's) alone
        lin.weight.data = _well_conditioned(n, threshold, g).float()
        modules.append(lin)
        if i < layers - 1:
            modules.append(nn.LeakyReLU(0.2))
    mix = nn.Sequential(*modules)
    mix.requires_grad_(False)
    mix.cond_threshold = threshold
    return mix


class SyntheticPairs:
    """Natural pairs of docs/spec.md 6.4. `batch(step, size)` -> (x, x+) observations; `latents` for evaluation."""

    def __init__(self, n: int = 10, keep: float = 0.8, mixing_layers: int = 3, seed: int = 0, rank: int = 0,
                 cond_samples: int = COND_SAMPLES, batch_seed: int | None = None):
        """`seed` fixes the mixing g, its standardisation and the held-out sets; `batch_seed` (default: seed)
        the training stream."""
        if not 0 <= keep <= 1:
            raise ValueError(f"keep must be a probability in [0, 1], got {keep}")
        self.n, self.keep, self.seed, self.rank = n, keep, seed, rank
        self.batch_seed = seed if batch_seed is None else batch_seed
        self.mixing = mixing_mlp(n, mixing_layers, seed, cond_samples)
        self.mean, self.std = self._standardisation()

    @torch.no_grad()
    def _standardisation(self) -> tuple[Tensor, Tensor]:
        """Per-coordinate mean and std (n,) of g(z) over STANDARDISE_SAMPLES draws of a stream of their own."""
        z, _ = self.latent_pairs(STANDARDISE_SAMPLES, step_generator(self.seed, 0, 0, stream=5))
        x = self.mixing(z).double()
        return x.mean(0).float(), x.std(0).float()

    def latent_pairs(self, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        z = torch.rand(size, self.n, generator=g) * 2 - 1
        keep = torch.rand(size, self.n, generator=g) < self.keep
        fresh = torch.rand(size, self.n, generator=g) * 2 - 1
        return z, torch.where(keep, z, fresh)

    @torch.no_grad()
    def observe(self, z: Tensor) -> Tensor:
        """x = (g(z) - mean) / std: (rows, n) latents -> (rows, n) standardised observations."""
        return (self.mixing(z) - self.mean) / self.std

    def batch(self, step: int, size: int) -> tuple[Tensor, Tensor]:
        z, z_pos = self.latent_pairs(size, step_generator(self.batch_seed, step, self.rank))
        return self.observe(z), self.observe(z_pos)

    def eval_set(self, size: int, split: str) -> tuple[Tensor, Tensor]:
        """Held-out (x, z / sd) drawn from a stream disjoint from training ('train' / 'test' for the probes)."""
        stream = {"train": 1, "test": 2}[split]
        z, _ = self.latent_pairs(size, step_generator(self.seed, 0, 0, stream))
        return self.observe(z), z / LATENT_SD


# ----------------------------------------------------------------------------------------------------
# Tensor augmentations (CHW float images in [0, 1]); `g` makes them reproducible.


def _uniform(g, lo, hi) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_resized_crop(img: Tensor, size: int, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    _, h, w = img.shape
    for _ in range(10):
        area = h * w * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            img = img[:, top:top + ch, left:left + cw]
            break
    return resize(img, size)


def resize(img: Tensor, size: int) -> Tensor:
    return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _gray(img: Tensor) -> Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def color_jitter(img: Tensor, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> Tensor:
    order = torch.randperm(4, generator=g).tolist()
    for op in order:
        if op == 0:
            img = img * _uniform(g, 1 - brightness, 1 + brightness)
        elif op == 1:
            img = (img - _gray(img).mean()) * _uniform(g, 1 - contrast, 1 + contrast) + _gray(img).mean()
        elif op == 2:
            gray = _gray(img)
            img = (img - gray) * _uniform(g, 1 - saturation, 1 + saturation) + gray
        else:  # hue: rotate the chroma around the gray axis (a cheap stand-in for an HSV hue shift)
            angle = _uniform(g, -hue, hue) * 2 * math.pi
            k = torch.full((3,), 1 / math.sqrt(3))
            c, s = math.cos(angle), math.sin(angle)
            cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            rot = c * torch.eye(3) + s * cross + (1 - c) * torch.outer(k, k)
            img = torch.einsum("ij,jhw->ihw", rot, img)
        img = img.clamp(0, 1)
    return img


def gaussian_blur(img: Tensor, g, sigma=(0.1, 2.0)) -> Tensor:
    s = _uniform(g, *sigma)
    radius = max(1, int(3 * s))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-(x**2) / (2 * s * s))
    k = k / k.sum()
    c = img.shape[0]
    img = F.conv2d(F.pad(img[None], (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                   groups=c)
    return img[0]


def augment(img: Tensor, size: int, g: torch.Generator, strength: str = "strong") -> Tensor:
    """docs/spec.md 7's augmentations: 'strong' = RRC(0.08-1) + flip + jitter p0.8 + gray p0.2 + blur p0.5 + solarise
    p0.2; 'weak' = RRC(0.8-1, ratio 0.9-1.1) + flip; 'none' = resize."""
    if strength == "none":
        return resize(img, size)
    if strength not in ("weak", "strong"):
        raise ValueError(f"augmentation strength must be 'none', 'weak' or 'strong', got {strength!r}")
    weak = strength == "weak"
    img = random_resized_crop(img, size, g, (0.8, 1.0) if weak else (0.08, 1.0), (0.9, 1.1) if weak else (3 / 4, 4 / 3))
    if _uniform(g, 0, 1) < 0.5:
        img = img.flip(-1)
    if weak:
        return img
    if _uniform(g, 0, 1) < 0.8:
        img = color_jitter(img, g)
    if _uniform(g, 0, 1) < 0.2:
        img = _gray(img).expand(3, -1, -1)
    if _uniform(g, 0, 1) < 0.5:
        img = gaussian_blur(img, g)
    if _uniform(g, 0, 1) < 0.2:
        img = torch.where(img >= 0.5, 1 - img, img)
    return img.contiguous()


# ----------------------------------------------------------------------------------------------------
# The user's natural pairs.


def _pil_image():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image pairs needs Pillow (pip install pillow); the synthetic benchmark does "
                          "not") from e
    return Image


def load_image(path) -> Tensor:
    """(3, H, W) float in [0, 1]; ValueError naming the file when it does not decode."""
    Image = _pil_image()
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on a bad file
        raise ValueError(f"image {path} cannot be read ({type(e).__name__}: {e})") from None
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255


def image_problem(path: Path) -> str | None:
    """Why `path` is no usable image (missing, unreadable, not an image PIL knows), or None.

    Cheap: PIL reads the header and checks the file's structure (verify) without decoding the pixels.
    """
    Image = _pil_image()
    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # (as in load_image: any failure means the file is unusable)
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def check_pairs(pairs, rows, source) -> None:
    """Every file of every pair must be a readable image: else one ValueError listing the first bad ones.

    rows[i] names where pair i comes from (a CSV line, a clip folder), for the message. Run at startup so a
    bad file stops the run before step 1, not at the step that first draws it.
    """
    problems, seen = [], set()
    for pair, row in zip(pairs, rows, strict=True):
        for path in pair:
            if path in seen:
                continue
            seen.add(path)
            problem = image_problem(path)
            if problem is not None:
                problems.append(f"{row}: {path}: {problem}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{source}: {len(problems)} of {len(seen)} image files are unusable: {shown}{more}")


def frame_pairs(root, gap: int = 1) -> list[tuple[Path, Path]]:
    """Pairs (frame i, frame i + gap) within each clip folder root/<clip>/ (frames sorted by file name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"frame folder {root} does not exist")
    if gap < 1:
        raise ValueError(f"frame gap must be >= 1, got {gap}")
    pairs, rows = [], []
    for clip in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = sorted(p for p in clip.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        clip_pairs = list(zip(frames[:-gap], frames[gap:], strict=True))
        pairs += clip_pairs
        rows += [f"clip {clip.name}"] * len(clip_pairs)
    if not pairs:
        raise ValueError(f"no frame pairs {gap} apart under {root}: expected {root}/<clip>/<frame images>")
    check_pairs(pairs, rows, f"frame folder {root}")
    return pairs


def csv_pairs(csv_path) -> list[tuple[Path, Path]]:
    """Rows `path_a,path_b` (a header row naming non-files is skipped); relative paths are relative to the CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"pairs CSV {csv_path} does not exist")
    pairs, rows = [], []
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_path}:{i + 1}: expected 'path_a,path_b', got {row}")
            a, b = (Path(p.strip()) for p in row[:2])
            a, b = (p if p.is_absolute() else csv_path.parent / p for p in (a, b))
            if i == 0 and not a.exists() and not b.exists():
                continue  # header
            pairs.append((a, b))
            rows.append(f"line {i + 1}")
    if not pairs:
        raise ValueError(f"{csv_path} holds no image pairs")
    check_pairs(pairs, rows, f"pairs CSV {csv_path}")
    return pairs


class ImagePairs:
    """Batches of augmented image pairs from a pair list; batch `step` is a function of (seed, rank, step)."""

    def __init__(self, pairs, image_size: int = 64, augmentation: str = "none", seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.pairs, self.size, self.augmentation = list(pairs), image_size, augmentation
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def indices(self, step: int, size: int) -> list[int]:
        """Rows of a shuffled epoch order (reshuffled every epoch from the seed); ranks take disjoint slices."""
        n = len(self.pairs)
        start = (step * self.world_size + self.rank) * size
        out = []
        while len(out) < size:
            epoch, pos = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=step_generator(self.seed, epoch, 0, 3))
            take = min(size - len(out), n - pos)
            out += perm[pos:pos + take].tolist()
        return out

    def batch(self, step: int, size: int) -> tuple[Tensor, Tensor]:
        g = step_generator(self.seed, step, self.rank, 4)
        xs, ys = [], []
        for i in self.indices(step, size):
            a, b = self.pairs[i]
            xs.append(augment(load_image(a), self.size, g, self.augmentation))
            ys.append(augment(load_image(b), self.size, g, self.augmentation))
        return torch.stack(xs), torch.stack(ys)
