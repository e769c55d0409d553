"""The block shapes the GPU table ships, for interpreter tests that run each of them."""

from adassl_fast.kernels import configs


def shipped_block_shapes() -> list[tuple[str, "configs.Config"]]:
    """(kernel kind, Config) for each distinct (kind, BLOCK_M, BLOCK_N) of the GPU table, mode kinds folded into
    the kernel they run, so the interpreter runs every shape the GPUs will, not only its own 64 x 64."""
    shapes = {}
    for arch, _, _, cfg in configs.shipped_configs():
        kind = cfg.name.split(f"_{arch}")[0]
        kind = configs.MODE_KINDS.get(kind, kind)
        shapes.setdefault((kind, cfg.block_m, cfg.block_n), cfg)
    return [(key[0], cfg) for key, cfg in sorted(shapes.items())]
