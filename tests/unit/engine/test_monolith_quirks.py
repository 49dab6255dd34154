"""Monolith's bugs we do not copy by default, and the table option that copies them.

Each test is named for one of Monolith's C++ behaviours we deliberately differ from
(docs/semantics.md §12): the default (``monolith_quirks=False``) must NOT copy it, and
``monolith_quirks=True`` must. Expected values come from the formulas of
docs/semantics.md §5.1, never from our own output. Monolith's own bits for these
cases are checked in test_monolith_vectors.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from protos import embedding_hash_table_pb2 as eht
from protos import initializer_config_pb2 as icfg
from protos import optimizer_pb2 as opt_pb
from ps_server.checkpoint.table_files import restore_table
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.shard import Shard
from ps_server.errors import AlreadyExistsError

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "monolith_samples"


def _segment(dim: int, opt: opt_pb.OptimizerConfig) -> eht.EntryConfig.Segment:
    return eht.EntryConfig.Segment(
        dim_size=dim,
        init_config=icfg.InitializerConfig(zeros=icfg.ZerosInitializerConfig()),
        opt_config=opt,
    )


def _table(*segments: eht.EntryConfig.Segment, quirks: bool) -> EmbeddingHashTable:
    entry = eht.EntryConfig(segments=list(segments))
    return EmbeddingHashTable(eht.EmbeddingHashTableConfig(entry_config=entry),
                              monolith_quirks=quirks)


# --------------------------------------------------------------------- Group AdaGrad


@pytest.mark.parametrize("quirks", [False, True])
def test_group_adagrad_zero_grad_stores_zero_not_monolith_nan(quirks: bool) -> None:
    """w = 0 and g = 0: G = 0, eta = lr / beta... z = 0, Z = 0 and the update is
    ``-eta * (Z - l2) / Z * z`` = 0/0. Monolith stores NaN; we store 0 (the limit)
    unless the table copies Monolith."""
    opt = opt_pb.OptimizerConfig(group_adagrad=opt_pb.GroupAdaGradOptimizerConfig())
    table = _table(_segment(4, opt), quirks=quirks)
    table.apply_gradients([7], np.zeros((1, 4), np.float32), [0.05], 1)
    got = table.select_entries([7]).values[0]
    if quirks:
        assert np.isnan(got).all()
    else:
        assert got.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_adagrad_zero_norm_with_l2_is_zero_either_way() -> None:
    """With l2 > 0 a zero norm is below l2, so the group is zeroed: no 0/0 anywhere."""
    opt = opt_pb.OptimizerConfig(group_adagrad=opt_pb.GroupAdaGradOptimizerConfig(
        l2_regularization_strength=0.5))
    for quirks in (False, True):
        table = _table(_segment(3, opt), quirks=quirks)
        table.apply_gradients([7], np.zeros((1, 3), np.float32), [0.05], 1)
        assert table.select_entries([7]).values[0].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------- stochastic rounding


def _mwc_draws(k: int) -> list[np.float32]:
    """The first ``k`` draws of Monolith's generator from ``(s0, s1) = (0, 1)``, by its
    recurrence (docs/semantics.md §5.1), not by our vectorized form."""
    s0, s1, out = 0, 1, []
    for _ in range(k):
        s0 = 36969 * (s0 & 0xFFFF) + (s0 >> 16)
        s1 = 18000 * (s1 & 0xFFFF) + (s1 >> 16)
        x = (((s0 & 0xFFFF) << 16) + s1) & 0xFFFFFFFF
        out.append(np.float32(x) / np.float32(2.0**32))
    return out


def _round_in_1_2(w: float, p: np.float32) -> float:
    """Stochastic rounding of ``w`` in [1, 2), where float16 steps are 2^-10:
    up iff ``p <= (w - down) / 2^-10``."""
    down = np.floor(w * 1024) / 1024
    frac = np.float32((w - down) * 1024)
    return float(down + 1 / 1024) if p <= frac else float(down)


SR_SGD = opt_pb.OptimizerConfig(sgd=opt_pb.SgdOptimizerConfig(), stochastic_rounding_float16=True)
SGD = opt_pb.OptimizerConfig(sgd=opt_pb.SgdOptimizerConfig())
# In [1, 2): 1 + k * 2^-20 has rounding fraction k / 1024. The generator's first draws
# are 4.19e-6, 0.0754, 0.2328, 0.2439, 0.2385, 0.1837, 0.1936, 0.1020, 0.1299, 0.2087:
# the fractions (0.200, 0.078, 0.215, 0.234, 0.098) fall between them so that the
# shared and the per-segment generators round some columns differently.
W0 = [1 + 205 * 2**-20, 1 + 80 * 2**-20, 1 + 220 * 2**-20, 1 + 240 * 2**-20, 1 + 100 * 2**-20]


@pytest.mark.parametrize("quirks", [False, True])
def test_stochastic_rounding_of_segment_0_rounds_only_its_segment_not_to_entry_end(
        quirks: bool) -> None:
    """SR on segment 0 (dim 3) of a 3 + 2 entry, zero gradients (SGD leaves w as is).
    Ours rounds columns 0..2 with draws 1..3; Monolith's decorator rounds columns 0..4
    (to the END of the entry) with draws 1..5."""
    table = _table(_segment(3, SR_SGD), _segment(2, SGD), quirks=quirks)
    table.assign([7], np.array([W0], np.float32))
    table.apply_gradients([7], np.zeros((1, 5), np.float32), [0.1, 0.1], 1)
    p = _mwc_draws(5)
    rounded = 5 if quirks else 3
    want = [_round_in_1_2(w, p[i]) if i < rounded else w for i, w in enumerate(W0)]
    assert table.select_entries([7]).values[0].tolist() == want


@pytest.mark.parametrize("quirks", [False, True])
def test_stochastic_rounding_generators_one_per_segment_not_one_shared(quirks: bool) -> None:
    """SR on both segments (3 + 2), zero gradients. Ours: each segment's generator
    starts at (0, 1), so segment 1 rounds with draws 1..2. Monolith: one generator;
    segment 0 rounds columns 0..4 with draws 1..5, then segment 1 rounds columns 3..4
    (already float16, so unchanged) with draws 6..7; the next occurrence starts at
    draw 8."""
    table = _table(_segment(3, SR_SGD), _segment(2, SR_SGD), quirks=quirks)
    table.assign([7, 8], np.array([W0, W0], np.float32))
    table.apply_gradients([7, 8], np.zeros((2, 5), np.float32), [0.1, 0.1], 1)
    got = table.select_entries([7, 8]).values.tolist()
    if quirks:
        p = _mwc_draws(14)
        want = [[_round_in_1_2(w, p[base + i]) for i, w in enumerate(W0)] for base in (0, 7)]
    else:
        # One row after the other: segment 0 draws 3 per row, segment 1 draws 2 per row.
        p = _mwc_draws(6)
        want = [
            [_round_in_1_2(w, p[3 * r + i] if i < 3 else p[2 * r + i - 3])
             for i, w in enumerate(W0)]
            for r in (0, 1)
        ]
    assert got == want


def test_monolith_stochastic_rounding_follows_request_order_with_repeats() -> None:
    """With the option, occurrence i of a request draws before occurrence i+1 (one
    Monolith thread), repeats included: ids [7, 7, 8] use draws 1..5, 6..10, 11..15."""
    table = _table(_segment(3, SR_SGD), _segment(2, SGD), quirks=True)
    table.assign([7, 8], np.array([W0, W0], np.float32))
    table.apply_gradients([7, 7, 8], np.zeros((3, 5), np.float32), [0.1, 0.1], 1)
    p = _mwc_draws(15)
    once = [_round_in_1_2(w, p[i]) for i, w in enumerate(W0)]
    twice = [_round_in_1_2(w, p[5 + i]) for i, w in enumerate(once)]
    eight = [_round_in_1_2(w, p[10 + i]) for i, w in enumerate(W0)]
    assert table.select_entries([7, 8]).values.tolist() == [twice, eight]


# ------------------------------------------------------------------- Adam's restore


def _sample_user_entries() -> list[dict]:
    with open(SAMPLES / "expected.json", encoding="utf-8") as f:
        data = json.load(f)
    ckpt = data["samples"]["multi_table_local"]["checkpoints"]["model.ckpt-200"]
    return [e for e in ckpt["tables"]["user"]["entries"]]


def _f32(x: dict) -> np.float32:
    return np.array([int(x["bits"], 16)], np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("quirks", [False, True])
def test_adam_restore_keeps_both_powers_unless_monolith_quirks(quirks: bool) -> None:
    """Restoring Monolith's multi-table checkpoint (the ``user`` table: Adam, dim 8).
    Ours: ``beta1_power`` and ``beta2_power`` as dumped. With the option, Monolith's
    restore: ``beta1_power`` = the dumped ``beta2_power`` and ``beta2_power`` = its
    initial value, ``beta2`` (0.99, the proto default); ``m`` and ``v`` as dumped either way."""
    with open(SAMPLES / "expected.json", encoding="utf-8") as f:
        config_text = json.load(f)["table_configs"]["user"]
    config = text_format.Parse(config_text, eht.EmbeddingHashTableConfig())
    table = EmbeddingHashTable(config, name="user", monolith_quirks=quirks)
    basename = SAMPLES / "multi_table_local" / "model.ckpt-200.assets" / "MonolithMultiHashTable_"
    restore_table(table, str(basename), shard_index=0, num_shards=1)
    entries = _sample_user_entries()
    assert entries and table.size() == len(entries)
    sel = table.select_entries([e["id"] for e in entries])
    (_, state), = sel.segments
    for i, e in enumerate(entries):
        (dump,) = e["opt"]
        b1, b2 = _f32(dump["beta1_power"]), _f32(dump["beta2_power"])
        assert b1 != b2, "the sample must tell the powers apart"
        got1, got2 = state["beta1_power"][i, 0], state["beta2_power"][i, 0]
        if quirks:
            assert (got1, got2) == (b2, np.float32(0.99))
        else:
            assert (got1, got2) == (b1, b2)
        assert state["m"][i].tolist() == [float(_f32(x)) for x in dump["m"]]
        assert state["v"][i].tolist() == [float(_f32(x)) for x in dump["v"]]


def test_amsgrad_restore_is_correct_with_monolith_quirks() -> None:
    """Monolith restores AMSGrad's powers correctly: the option leaves them alone."""
    opt = opt_pb.OptimizerConfig(amsgrad=opt_pb.AmsgradOptimizerConfig())
    table = _table(_segment(2, opt), quirks=True)
    table.apply_gradients([7], np.ones((1, 2), np.float32), [0.05], 1)
    cols = table.export_columns()
    copy = type(cols)(cols.ids.copy(), cols.values.copy(),
                      [{k: a.copy() for k, a in st.items()} for st in cols.states],
                      cols.timestamps.copy())
    fresh = _table(_segment(2, opt), quirks=True)
    fresh.upsert_columns(copy)
    (_, got), = fresh.select_entries([7]).segments
    (_, want), = table.select_entries([7]).segments
    assert {k: a.tolist() for k, a in got.items()} == {k: a.tolist() for k, a in want.items()}


# ------------------------------------------------------------------------- the shard


def test_shard_create_table_keeps_the_option_and_allow_existing_compares_it() -> None:
    shard = Shard()
    config = eht.EmbeddingHashTableConfig(entry_config=eht.EntryConfig(
        segments=[_segment(2, SGD)]))
    assert shard.create_table("t", config, monolith_quirks=True)
    assert shard.table("t").monolith_quirks
    assert not shard.create_table("t", config, allow_existing=True, monolith_quirks=True)
    with pytest.raises(AlreadyExistsError, match="monolith_quirks"):
        shard.create_table("t", config, allow_existing=True)
    assert shard.create_table("u", config)
    assert not shard.table("u").monolith_quirks
