"""The Triton block-configuration table (kernels/configs.py): shipped entries, lookup, and a measured override.

The GPU lookup is exercised here without a GPU by pretending the device is an H200 (`_arch_of`), as
tests/test_dispatch.py does.
"""

import json

import pytest
import torch
from adassl_fast.kernels import configs

CUDA = torch.device("cuda")


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(configs, "_arch_of", lambda device: "sm90")
    monkeypatch.delenv(configs.TUNED_ENV, raising=False)


def test_shipped_configs_are_named_uniquely_and_cover_every_kind():
    shipped = configs.shipped_configs()
    names = [cfg.name for *_, cfg in shipped]
    assert len(names) == len(set(names))
    for arch in ("sm90", "sm80"):
        kinds = {cfg.name.split(f"_{arch}")[0] for a, _, _, cfg in shipped if a == arch}
        assert set(configs.KINDS) <= kinds <= set(configs.KINDS) | set(configs.SYM_KINDS)


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
    assert configs.pick_config("bwd_row", CUDA, torch.bfloat16, 129).name.startswith("bwd_row_sm90_f16_d256_")
    assert configs.pick_config("bwd_col", CUDA, torch.bfloat16, 257).name.startswith("bwd_col_sm90_f16_d512_")
    for dtype, d in ((torch.bfloat16, 513), (torch.float32, 128)):
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
