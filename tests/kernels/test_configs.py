"""The Triton block-configuration table (kernels/configs.py): shipped entries, lookup, and a measured override.

The GPU lookup is exercised here without a GPU by pretending the device is an H200 (`arch_of`), as
tests/test_dispatch.py does.
"""

import json

import pytest
import torch

from adassl_fast.kernels import configs

CUDA = torch.device("cuda")


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm90")
    monkeypatch.delenv(configs.TUNED_ENV, raising=False)


def test_shipped_configs_are_named_uniquely_and_cover_every_kind():
    shipped = configs.shipped_configs()
    names = [cfg.name for *_, cfg in shipped]
    assert len(names) == len(set(names))
    for arch in configs.SMEM_BUDGET:
        kinds = {cfg.name.split(f"_{arch}")[0] for a, _, _, cfg in shipped if a == arch}
        assert set(configs.KINDS) <= kinds <= set(configs.KINDS) | set(configs.MODE_KINDS)


def test_every_gpu_class_covers_the_same_widths():
    # so that impl="auto" takes Triton for the same inputs on every supported GPU
    covered = {arch: sorted((dt, bd) for a, dt, bd in configs._TABLE if a == arch) for arch in configs.SMEM_BUDGET}
    assert len({tuple(v) for v in covered.values()}) == 1, covered


@pytest.mark.parametrize("cc, smem, expected", [
    ((9, 0), 232448, "sm90"),  # H100 / H200
    ((8, 0), 166912, "sm80"),  # A100
    ((8, 7), 166912, "sm80"),  # Jetson Orin
    ((10, 0), 232448, "sm80"),  # B200: Hopper's wgmma shapes do not apply
    ((8, 6), 101376, "sm86"),  # RTX 3090, A10
    ((8, 9), 101376, "sm86"),  # RTX 4090, L4, L40
    ((12, 0), 101376, "sm86"),  # RTX 5090
])
def test_arch_class_follows_the_shared_memory_a_block_may_use(cc, smem, expected):
    assert configs.arch_class(*cc, smem) == expected


def test_arch_class_refuses_gpus_no_class_covers():
    with pytest.raises(ValueError, match=r"compute capability >= 8.0 .* this GPU is 7.5"):
        configs.arch_class(7, 5, 65536)  # T4: no bf16 tensor cores
    with pytest.raises(ValueError, match="offers 65536 bytes of shared memory a block"):
        configs.arch_class(8, 6, 65536)


def test_a_99_kb_gpu_gets_configs_that_fit_it(monkeypatch):
    # an RTX 4090 as torch describes it; the shipped A100 shapes at d = 512 need up to 132 KB
    class Props:
        major, minor, shared_memory_per_block_optin = 8, 9, 101376

    configs._cuda_class.cache_clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.delenv(configs.TUNED_ENV, raising=False)
    try:
        assert configs.pick_config("fwd", CUDA, torch.bfloat16, 512).name == "fwd_sm86_f16_d512_m64n32w8s2"
        assert configs.pick_config("bwd_row", CUDA, torch.bfloat16, 128).name.startswith("bwd_row_sm86_f16_d128_")
        Props.major, Props.minor = 7, 5  # a T4: Triton is not offered, and says why
        configs._cuda_class.cache_clear()
        assert "this GPU is 7.5" in configs.unsupported_reason(CUDA, torch.bfloat16, 128)
    finally:
        configs._cuda_class.cache_clear()


def test_sym_kinds_take_their_own_entry_or_the_plain_kinds(h200, monkeypatch, tmp_path):
    own = configs.pick_config("bwd_col_sym", CUDA, torch.bfloat16, 128)  # the sm90 d128 entry names one
    assert own.name.startswith("bwd_col_sym_sm90_f16_d128_")
    assert own != configs.pick_config("bwd_col", CUDA, torch.bfloat16, 128)
    assert configs.pick_config("bwd_row_sym", CUDA, torch.bfloat16, 128) == configs.pick_config(
        "bwd_row", CUDA, torch.bfloat16, 128)
    # a tuned plain kind reaches a SYM kind without an entry of its own, never one with
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"table": {"sm90/16/128": {"bwd_row": [32, 64, 4, 2], "bwd_col": [32, 64, 4, 2]}}}))
    monkeypatch.setenv(configs.TUNED_ENV, str(path))
    assert configs.pick_config("bwd_row_sym", CUDA, torch.bfloat16, 128).name.startswith("tuned_bwd_row_sm90")
    assert configs.pick_config("bwd_col_sym", CUDA, torch.bfloat16, 128) == own


def test_lookup_takes_the_smallest_covering_block_d_and_refuses_the_rest(h200):
    cfg = configs.pick_config("fwd", CUDA, torch.bfloat16, 37)  # d = 37 pads to 64, served by the d = 128 entry
    assert cfg.name.startswith("fwd_sm90_f16_d128_")
    assert configs.unsupported_reason(CUDA, torch.float16, 128) is None
    assert configs.unsupported_reason(CUDA, torch.float32, 128) is None  # fp16 operands (operand_dtype)
    assert configs.pick_config("bwd_row", CUDA, torch.bfloat16, 129).name.startswith("bwd_row_sm90_f16_d256_")
    assert configs.pick_config("bwd_col", CUDA, torch.bfloat16, 257).name.startswith("bwd_col_sm90_f16_d512_")
    for dtype, d in ((torch.bfloat16, 513), (torch.float64, 128)):
        assert "no vetted Triton config" in configs.unsupported_reason(CUDA, dtype, d)


def test_atomic_schedule_only_where_an_entry_ships_one(h200):
    assert configs.atomic_schedule(CUDA, torch.bfloat16, 256)
    assert not configs.atomic_schedule(CUDA, torch.bfloat16, 300)  # d > 256: the d = 512 entries have none
    assert configs.atomic_shipped("sm80", "16", 128) and not configs.atomic_shipped("sm80", "16", 512)
    assert configs.atomic_shipped("interp", "64", 512)  # the interpreter runs every schedule


def test_a_tuned_table_overrides_matching_entries_only(h200, monkeypatch, tmp_path):
    # the form bench/tune_triton.py writes (tune.json), with one kind measured
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"table": {"sm90/16/128": {"bwd_col": [32, 128, 4, 5]}}, "rows": []}))
    monkeypatch.setenv(configs.TUNED_ENV, str(path))
    tuned = configs.pick_config("bwd_col", CUDA, torch.bfloat16, 128)
    assert (tuned.block_m, tuned.block_n, tuned.num_warps, tuned.num_stages) == (32, 128, 4, 5)
    assert tuned.name.startswith("tuned_bwd_col_sm90")
    shipped = configs.pick_config("fwd", CUDA, torch.bfloat16, 128)  # not in the tuned table
    assert shipped.name.startswith("fwd_sm90_f16_d128_")
    monkeypatch.delenv(configs.TUNED_ENV)
    assert configs.pick_config("bwd_col", CUDA, torch.bfloat16, 128).name.startswith("bwd_col_sm90")
