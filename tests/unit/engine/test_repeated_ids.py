"""Repeated ids in one apply (docs/semantics.md §4.2): the fast paths against the old ones.

Every occurrence of an id is its own optimizer step, in order. The run forms (SGD,
Adagrad without weight decay) and the one-sort waves must give exactly the bits of the
implementation they replaced, kept here as the reference (``_old_*``): waves found by a
pass per occurrence rank, one ``apply`` per wave, and SGD's ``np.subtract.at``.
Optimizers without a run form are capped per request (RESOURCE_EXHAUSTED, nothing
changed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import configs
from ps_server.engine.hash_table import REPEAT_FLOOR, EmbeddingHashTable
from ps_server.engine.optimizers import Optimizer, optimizer_from_config
from ps_server.engine.optimizers.base import State, occurrence_waves
from ps_server.errors import ResourceExhaustedError

CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {}),
    ("adagrad", {"initial_accumulator_value": 0.1}),
    ("adagrad", {"initial_accumulator_value": 0.0}),  # first step divides by sqrt(g^2)
    ("adagrad", {"initial_accumulator_value": 0.1, "weight_decay_factor": 0.01}),
    ("ftrl", {"initial_accumulator_value": 0.1, "beta": 1.0}),
    ("ftrl", {"initial_accumulator_value": 0.1, "l1_regularization_strength": 0.1,
              "l2_regularization_strength": 0.2}),
    ("adam", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    ("adam", {"beta1": 0.9, "beta2": 0.99, "epsilon": 1e-6, "weight_decay_factor": 0.01,
              "use_nesterov": True}),
    ("amsgrad", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    ("adadelta", {"averaging_ratio": 0.9, "epsilon": 1e-6}),
    ("momentum", {"momentum": 0.9, "use_nesterov": True}),
    ("moving_average", {"momentum": 0.9}),
    ("rmsprop", {"learning_rate": 0.01, "momentum": 0.9}),
    ("rmspropv2", {"momentum": 0.9}),
    ("group_adagrad", {"initial_accumulator_value": 0.1, "l2_regularization_strength": 0.1}),
    ("adagrad", {"initial_accumulator_value": 0.1, "stochastic_rounding_float16": True}),
    ("adam", {"beta1": 0.9, "beta2": 0.999, "stochastic_rounding_float16": True}),
]


def _optimizer(kind: str, fields: dict[str, Any], dim: int) -> Optimizer:
    fields = dict(fields)
    cfg = eht.OptimizerConfig(stochastic_rounding_float16=fields.pop(
        "stochastic_rounding_float16", False))
    getattr(cfg, kind).SetInParent()
    for k, v in fields.items():
        setattr(getattr(cfg, kind), k, v)
    return optimizer_from_config(cfg, dim)


def _old_occurrence_waves(rows: npt.NDArray[np.int64]) -> list[npt.NDArray[np.intp]]:
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    lengths = np.diff(np.r_[starts, sorted_rows.size])
    rank = np.arange(sorted_rows.size) - np.repeat(starts, lengths)
    return [np.sort(order[rank == k]) for k in range(int(lengths.max()))]


def _old_apply_sequential(opt: Optimizer, values: Any, state: State, rows: Any, grads: Any,
                          lr: float, step: int) -> None:
    # SGD used to have a single-pass np.subtract.at path here (w - lr*g rounded twice);
    # Monolith's vectors (test_monolith_vectors) show one fused multiply-add per step,
    # so the reference for SGD is now the plain wave-by-wave application too.
    for wave in _old_occurrence_waves(rows):
        opt._apply_rows(values, state, rows[wave], grads[wave], lr, step)


def _batch(seed: int, capacity: int, n: int, dim: int) -> tuple[Any, Any, Any]:
    """Rows with heavy repeats: one row ~n/3 times, a few dozens of times, the rest rare."""
    rng = np.random.default_rng(seed)
    heavy = np.full(n // 3, 5, np.int64)
    mid = rng.integers(0, 8, size=n // 3)
    rare = rng.integers(0, capacity, size=n - heavy.size - mid.size)
    rows = rng.permutation(np.concatenate([heavy, mid, rare])).astype(np.int64)
    grads = rng.normal(scale=2.0, size=(n, dim)).astype(np.float32)
    grads[rng.random(n) < 0.05] = 0  # zero gradients, as padding is
    values = rng.normal(size=(capacity, dim)).astype(np.float32)
    return rows, grads, values


def _bits(a: Any) -> Any:
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize(("kind", "fields"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_sequential_bit_identical_to_old_path(kind: str, fields: dict[str, Any],
                                                     seed: int) -> None:
    dim, capacity, n = 1 if kind == "batch_softmax" else 5, 40, 600
    opt = _optimizer(kind, fields, dim)
    rows, grads, values = _batch(seed, capacity, n, dim)
    state = opt.init_state(capacity)
    old_values, old_state = values.copy(), {k: v.copy() for k, v in state.items()}
    lr = 0.05
    twin = _optimizer(kind, fields, dim)  # its own random stream, if it rounds
    _old_apply_sequential(twin, old_values, old_state, rows, grads, lr, 3)
    opt.apply_sequential(values, state, rows, grads, lr, 3)
    np.testing.assert_array_equal(_bits(values), _bits(old_values))
    for k in state:
        np.testing.assert_array_equal(_bits(state[k]), _bits(old_state[k]))


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_run_form_exact_on_extreme_values(kind: str) -> None:
    """Huge, tiny, zero and non-finite gradients: still the old bits (NaN included)."""
    dim, capacity = 4, 6
    opt = _optimizer(kind, {"initial_accumulator_value": 0.0} if kind == "adagrad" else {}, dim)
    rng = np.random.default_rng(11)
    rows = rng.integers(0, 3, size=300).astype(np.int64)
    grads = (rng.normal(size=(300, dim)) * 10.0 ** rng.integers(-40, 30, size=(300, 1))
             ).astype(np.float32)
    grads[17, 0], grads[40, 1], grads[90] = np.inf, np.nan, 0
    values = rng.normal(size=(capacity, dim)).astype(np.float32)
    state = opt.init_state(capacity)
    old_values, old_state = values.copy(), {k: v.copy() for k, v in state.items()}
    with np.errstate(all="ignore"):
        _old_apply_sequential(opt, old_values, old_state, rows, grads, 1e-3, 0)
        opt.apply_sequential(values, state, rows, grads, 1e-3, 0)
    np.testing.assert_array_equal(_bits(values), _bits(old_values))
    for k in state:
        np.testing.assert_array_equal(_bits(state[k]), _bits(old_state[k]))


def test_occurrence_waves_unchanged() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        rows = rng.integers(0, rng.integers(1, 30), size=rng.integers(1, 200)).astype(np.int64)
        new, old = occurrence_waves(rows), _old_occurrence_waves(rows)
        assert len(new) == len(old)
        for a, b in zip(new, old, strict=True):
            np.testing.assert_array_equal(a, b)


def _table(opt: eht.OptimizerConfig) -> EmbeddingHashTable:
    return EmbeddingHashTable(configs.table_config(4, optimizer=opt), name="t")


ADAM = eht.OptimizerConfig(adam=eht.AdamOptimizerConfig(beta1=0.9, beta2=0.999, epsilon=1e-8))


def test_limit_refuses_before_any_change() -> None:
    table = _table(ADAM)
    table.apply_gradients([1, 2], np.ones((2, 4), np.float32), [0.1], req_time=5)
    before = table.lookup([1, 2, 9])
    n = REPEAT_FLOOR + 1
    ids = np.r_[np.full(n, 9, np.int64), [1, 3]]
    with pytest.raises(ResourceExhaustedError) as err:
        table.apply_gradients(ids, np.ones((ids.size, 4), np.float32), [0.1], req_time=99)
    msg = str(err.value)
    assert "id 9" in msg and f"{n} times" in msg and str(REPEAT_FLOOR) in msg
    assert table.size() == 2 and table.max_update_ts == 5
    np.testing.assert_array_equal(table.lookup([1, 2, 9]), before)


def test_limit_allows_its_own_count_and_dedup() -> None:
    table = _table(ADAM)
    ids = np.full(REPEAT_FLOOR, 9, np.int64)
    table.apply_gradients(ids, np.ones((ids.size, 4), np.float32), [0.1])
    ids = np.full(REPEAT_FLOOR + 1, 9, np.int64)
    table.apply_gradients(ids, np.ones((ids.size, 4), np.float32), [0.1], enable_dedup=True)
    assert table.size() == 1


@pytest.mark.parametrize(("opt", "cost"), [
    (configs.sgd(0.1), 96),
    (configs.adagrad(0.1), 128),
    (configs.adagrad(0.1, weight_decay_factor=0.01), 512),  # no run form with decay
    (ADAM, 512),
])
def test_limit_grows_with_the_request(opt: eht.OptimizerConfig, cost: int) -> None:
    """A request of n ids may repeat an id max(REPEAT_FLOOR, n // cost) times."""
    table = _table(opt)
    hot = REPEAT_FLOOR + 44
    n = cost * hot
    assert table.repeat_limit(n) == hot and table.repeat_limit(n - 1) == hot - 1
    assert table.repeat_limit(10) == REPEAT_FLOOR
    ids = np.concatenate([np.full(hot, 9, np.int64), np.arange(100, 100 + n - hot)])
    grads = np.ones((n, 4), np.float32)
    table.apply_gradients(ids, grads, [0.1])
    ids[-1] = 9  # hot + 1 occurrences in a request of the same size
    with pytest.raises(ResourceExhaustedError, match=f"id 9 occurs {hot + 1} times"):
        table.apply_gradients(ids, grads, [0.1])


def test_limit_applies_when_any_segment_lacks_a_run_form() -> None:
    segs = [configs.segment(2, configs.sgd(0.1)), configs.segment(2, ADAM)]
    table = EmbeddingHashTable(configs.table_config(segments=segs), name="t")
    n = REPEAT_FLOOR + 1
    with pytest.raises(ResourceExhaustedError, match="AdamOptimizer"):
        table.apply_gradients(np.full(n, 4, np.int64), np.ones((n, 4), np.float32), [0.1, 0.1])
    assert table.size() == 0


def test_fused_optimize_checks_every_block_before_the_first_is_applied() -> None:
    from ps_server.engine import Shard

    shard = Shard(0, 1)
    shard.create_table("sgd", configs.table_config(2, optimizer=configs.sgd()))
    shard.create_table("adam", configs.table_config(2, optimizer=ADAM))
    shard.assign("sgd", [1], np.ones((1, 2), np.float32))
    hot = REPEAT_FLOOR + 1
    ids = np.concatenate([[1], np.full(hot, 3)])
    grads = np.ones((1 + hot) * 2, np.float32)
    with pytest.raises(ResourceExhaustedError, match=f"id 3 occurs {hot} times"):
        # Block 0 (SGD, one id) would be applied before block 1 (Adam) refused.
        shard.fused_optimize(["sgd", "adam"], [(0, 1), (1, hot)], ids, grads,
                             [1.0, 1.0], 1)
    assert shard.lookup("sgd", [1]).tolist() == [[1.0, 1.0]]
    assert shard.size("adam") == 0
    # Summed per block (grad accumulation): no limit.
    shard.fused_optimize(["sgd", "adam"], [(0, 1), (1, hot)], ids, grads, [1.0, 1.0], 1,
                         enable_grad_accumulation=True)
    assert shard.lookup("sgd", [1]).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_more_than_finds_exactly_the_ids_past_a_limit(seed: int) -> None:
    from ps_server.engine.optimizers.base import repeated_more_than

    rng = np.random.default_rng(seed)
    distinct = rng.permutation(200_000).astype(np.int64) * 7919 - 10**12
    assert repeated_more_than(distinct, 1) is None
    # Ids drawn from a small range: every count known by np.unique.
    ids = rng.integers(-50, 50, 30_000)
    values, counts = np.unique(ids, return_counts=True)
    top = int(counts.max())
    assert repeated_more_than(ids, top) is None
    count, value = repeated_more_than(ids, top - 1) or (0, 0)
    assert count == top and counts[values == value][0] == top
    # One hot id among distinct ones, at and just past the limit.
    hot = distinct.copy()
    hot[rng.choice(hot.size, 300, replace=False)] = -3
    assert repeated_more_than(hot, 300) is None
    assert repeated_more_than(hot, 299) == (300, -3)


@pytest.mark.parametrize("n", [0, 1, 2, 1023, 1024, 100_000])
def test_has_duplicates_is_exact(n: int) -> None:
    from ps_server.engine.optimizers.base import has_duplicates

    rng = np.random.default_rng(n)
    rows = rng.permutation(3 * n)[:n].astype(np.int64)  # distinct rows
    assert not has_duplicates(rows)
    assert not has_duplicates(np.arange(n, dtype=np.int64))  # consecutive rows
    if n >= 2:
        for a, b in ((0, n - 1), (n // 2 - 1, n // 2)):
            twice = rows.copy()
            twice[b] = twice[a]
            assert has_duplicates(twice)


def test_present_ids_found_distinct_or_repeated_by_marking_rows() -> None:
    """When every id is present, apply_gradients settles duplicates from the found rows
    (the timestamp column as scratch): distinct batches, repeated ones and refused ones
    give the sequential bits and leave no trace in the timestamps."""
    table = EmbeddingHashTable(configs.table_config(2, optimizer=ADAM), name="t")
    base = np.arange(3000, dtype=np.int64) * 7
    table.assign(base, np.ones((3000, 2), np.float32), req_time=5)
    ref = EmbeddingHashTable(configs.table_config(2, optimizer=ADAM), name="ref")
    ref.assign(base, np.ones((3000, 2), np.float32), req_time=5)
    rng = np.random.default_rng(3)
    for ids in (rng.permutation(base)[:2000], np.r_[base[:1500], base[:1500]]):
        grads = rng.standard_normal((ids.size, 2)).astype(np.float32)
        table.apply_gradients(ids, grads, [0.1], 1, req_time=9)
        # The reference steps each occurrence alone, in order.
        for k in range(ids.size):
            ref.apply_gradients(ids[k : k + 1], grads[k : k + 1], [0.1], 1, req_time=9)
        assert table.lookup(base).tobytes() == ref.lookup(base).tobytes()
        assert table._timestamps[:3000].tolist() == ref._timestamps[:3000].tolist()
    before = table._timestamps.copy(), table.lookup(base)
    hot = np.r_[np.full(REPEAT_FLOOR + 1, base[5]), base[10:20]]
    with pytest.raises(ResourceExhaustedError,
                       match=f"id {base[5]} occurs {REPEAT_FLOOR + 1} times"):
        table.apply_gradients(hot, np.ones((hot.size, 2), np.float32), [0.1], 1, req_time=11)
    assert table._timestamps.tolist() == before[0].tolist()
    assert table.lookup(base).tobytes() == before[1].tobytes()


def test_marking_finds_exactly_the_occurrences_of_repeated_rows() -> None:
    table = EmbeddingHashTable(configs.table_config(2, optimizer=ADAM), name="t")
    table.assign(np.arange(500, dtype=np.int64), np.ones((500, 2), np.float32), req_time=4)
    ts = table._timestamps.copy()
    rng = np.random.default_rng(5)
    for n, high in ((1, 500), (2, 1), (300, 500), (400, 20), (500, 500)):
        rows = rng.integers(0, high, n).astype(np.int64)
        old, got = table._mark_rows(rows)
        assert old.tolist() == ts[rows].tolist()
        table._timestamps[rows] = old
        _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
        want = counts[inverse] > 1
        if not want.any():
            assert got is None
        else:
            assert got is not None and got.tolist() == want.tolist()
        assert table._timestamps.tolist() == ts.tolist()
    assert table._mark_rows(np.arange(500, dtype=np.int64))[1] is None


def test_present_ids_apply_that_fails_midway_restores_the_timestamps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    table = EmbeddingHashTable(configs.table_config(2, optimizer=configs.sgd()), name="t")
    ids = np.arange(100, dtype=np.int64)
    table.assign(ids, np.ones((100, 2), np.float32), req_time=7)
    ts = table._timestamps.copy()
    opt = table.layout.segments[0].optimizer
    assert opt is not None

    def boom(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("no room")

    monkeypatch.setattr(opt, "apply_sequential", boom)
    with pytest.raises(MemoryError):
        table.apply_gradients(np.r_[ids, ids[:3]], np.ones((103, 2), np.float32), [0.1],
                              req_time=9)
    assert table._timestamps.tolist() == ts.tolist()
