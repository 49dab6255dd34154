"""EmbeddingHashTable on one shard: Monolith's hash_table_ops tests that apply to one engine.

Expected values are worked out from docs/semantics.md §4 and §5 (float32 arithmetic).
"""

from __future__ import annotations

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_client.learning_rate_functions import PolynomialDecay, evaluate_learning_rates
from ps_server.checkpoint.entry_dump import lookup_entry, save_as_tensor
from ps_server.engine import configs
from ps_server.engine.filters import SlidingHashFilter
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.errors import (
    BadTensorError,
    ConfigError,
    DimMismatchError,
    InvalidArgumentError,
    ServingEntryError,
)

f32 = np.float32


def sgd_table(dim: int = 1, name: str = "t", **kw: object) -> EmbeddingHashTable:
    return EmbeddingHashTable(configs.table_config(dim, **kw), name=name)  # type: ignore[arg-type]


def minus_ones(n: int, dim: int) -> np.ndarray:
    return -np.ones((n, dim), dtype=np.float32)


def test_basic_assign_lookup_size() -> None:
    t = sgd_table(1)
    t.assign([0, 1, 2], [[1.0], [2.0], [3.0]])
    assert t.size() == 3
    np.testing.assert_array_equal(t.lookup([2, 0, 7, 1]), [[3.0], [1.0], [0.0], [2.0]])
    # Looking up a missing id inserts nothing.
    assert t.size() == 3
    assert t.lookup([7]).dtype == np.float32


def test_assign_overwrites_and_last_duplicate_wins() -> None:
    t = sgd_table(2)
    t.assign([5, 6], [[1, 1], [2, 2]])
    t.assign([5, 5, 6], [[3, 3], [4, 4], [5, 5]])
    np.testing.assert_array_equal(t.lookup([5, 6]), [[4, 4], [5, 5]])
    assert t.size() == 2


def test_assign_add_accumulates_duplicates_in_order() -> None:
    t = sgd_table(1)
    t.assign_add([3, 3, 4, 3], [[1.0], [2.0], [10.0], [0.5]])
    np.testing.assert_array_equal(t.lookup([3, 4]), [[3.5], [10.0]])


def test_lookup_entry_bytes_match_monolith_example() -> None:
    t = sgd_table(1)
    t.assign([7], [[0.1]])
    entries = lookup_entry(t, [7, 8])
    # num 0.1f, opt {dump {sgd {}}}, last_update_ts_sec 0; no id field (docs/semantics.md §4.2).
    assert entries[0] == bytes.fromhex("15cdcccc3d1a040a02120020 00".replace(" ", ""))
    assert entries[1] == b""
    dump = eht.EntryDump.FromString(entries[0])
    assert not dump.HasField("id")
    assert dump.num[0] == pytest.approx(0.1)


def test_save_as_tensor_partitions_by_floormod_and_pages() -> None:
    t = sgd_table(1)
    ids = np.array([-3, -2, -1, 0, 1, 2, 3, 4, 5, 6], dtype=np.int64)
    t.assign(ids, ids.astype(np.float32).reshape(-1, 1))
    seen: dict[int, float] = {}
    for part in range(2):
        offset, got = 0, []
        while True:
            offset, batch = save_as_tensor(t, part, 2, 2, offset)
            got.extend(eht.EntryDump.FromString(b) for b in batch)
            if len(batch) < 2:
                break
        for d in got:
            assert d.id % 2 == part  # Python % is floormod
            seen[d.id] = d.num[0]
    assert seen == {int(i): float(i) for i in ids}


def test_gradients_sgd_every_occurrence_is_a_step() -> None:
    t = sgd_table(1)
    t.apply_gradients([0, 0, 1], minus_ones(3, 1), [0.1], global_step=0)
    step = f32(0.1) * f32(1.0)
    np.testing.assert_array_equal(t.lookup([0, 1]), [[step + step], [step]])
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_learning_rate_fn() -> None:
    t = sgd_table(1)
    lrs = evaluate_learning_rates([lambda: 0.1], global_step=0)
    t.apply_gradients([0, 0, 1], minus_ones(3, 1), lrs)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_polynomial_decay() -> None:
    # 0.01 -> 0.11 over 10 steps: at step 1 the rate is 0.02 (docs/semantics.md §9).
    t = sgd_table(1)
    decay = PolynomialDecay(initial_learning_rate=0.01, decay_steps=10, end_learning_rate=0.11)
    lrs = evaluate_learning_rates([decay], global_step=1)
    t.apply_gradients([0, 0, 1], minus_ones(3, 1), lrs, global_step=1)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.04], [0.02]], rtol=1e-6)


def test_gradients_with_dedup_sgd_matches_sequential() -> None:
    ids = [0, 1, 0, 1, 0]
    for dedup in (False, True):
        t = sgd_table(10)
        t.apply_gradients(ids, minus_ones(5, 10), [0.1], enable_dedup=dedup)
        got = t.lookup([0, 1])
        np.testing.assert_allclose(got[0], np.full(10, 0.3), rtol=1e-6)
        np.testing.assert_allclose(got[1], np.full(10, 0.2), rtol=1e-6)


def test_dedup_differs_for_adagrad() -> None:
    ids = [0, 1, 0, 1, 0]
    lr, init = 0.1, 0.1
    plain = EmbeddingHashTable(configs.table_config(1, optimizer=configs.adagrad(init)))
    plain.apply_gradients(ids, minus_ones(5, 1), [lr])
    dedup = EmbeddingHashTable(configs.table_config(1, optimizer=configs.adagrad(init)))
    dedup.apply_gradients(ids, minus_ones(5, 1), [lr], enable_dedup=True)
    # Sequential: three Adagrad steps with g = -1 for id 0, two for id 1.
    w0 = sum(lr / np.sqrt(init + k) for k in (1, 2, 3))
    w1 = sum(lr / np.sqrt(init + k) for k in (1, 2))
    np.testing.assert_allclose(plain.lookup([0, 1]), [[w0], [w1]], rtol=1e-6)
    # Dedup: one step with the summed gradient -3 (id 0) and -2 (id 1).
    d0 = lr / np.sqrt(init + 9) * 3
    d1 = lr / np.sqrt(init + 4) * 2
    np.testing.assert_allclose(dedup.lookup([0, 1]), [[d0], [d1]], rtol=1e-6)


def test_gradients_with_different_ids() -> None:
    t = sgd_table(1)
    t.apply_gradients([0, 1, 1], minus_ones(3, 1), [0.1])
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.1], [0.2]], rtol=1e-6)


def test_new_entry_starts_from_initializer_but_lookup_of_missing_is_zero() -> None:
    init = eht.InitializerConfig(constants=eht.ConstantsInitializerConfig(constant=0.5))
    t = EmbeddingHashTable(configs.table_config(2, initializer=init))
    np.testing.assert_array_equal(t.lookup([9]), [[0.0, 0.0]])
    t.apply_gradients([9], [[1.0, -1.0]], [0.1])
    expected = [f32(0.5) - f32(0.1) * f32(1.0), f32(0.5) + f32(0.1) * f32(1.0)]
    np.testing.assert_array_equal(t.lookup([9]), [expected])
    t.assign_add([10], [[1.0, 2.0]])
    np.testing.assert_array_equal(t.lookup([10]), [[1.5, 2.5]])


def test_segments_get_their_own_learning_rates() -> None:
    config = configs.table_config(
        segments=[configs.segment(1), configs.segment(2, optimizer=configs.adagrad(1.0))]
    )
    t = EmbeddingHashTable(config)
    assert t.dim == 3 and t.num_segments == 2
    t.apply_gradients([4], [[1.0, 1.0, 2.0]], [0.5, 0.1])
    # Segment 0 SGD lr 0.5; segment 1 Adagrad lr 0.1, norm 1 + g^2.
    expected = [-0.5, -0.1 / np.sqrt(2.0), -0.1 / np.sqrt(5.0) * 2.0]
    np.testing.assert_allclose(t.lookup([4])[0], expected, rtol=1e-6)
    dump = eht.EntryDump.FromString(lookup_entry(t, [4])[0])
    assert [d.WhichOneof("type") for d in dump.opt.dump] == ["sgd", "adagrad"]
    np.testing.assert_allclose(dump.opt.dump[1].adagrad.norm, [2.0, 5.0])


def test_timestamps_follow_every_write_and_clock_keeps_the_max() -> None:
    t = sgd_table(1)
    t.assign([1], [[1.0]], req_time=100)
    t.apply_gradients([1], [[0.0]], [0.1], req_time=50)
    dump = eht.EntryDump.FromString(lookup_entry(t, [1])[0])
    assert dump.last_update_ts_sec == 50
    assert t.max_update_ts == 100
    t.assign_add([2], [[1.0]], req_time=0)
    assert eht.EntryDump.FromString(lookup_entry(t, [2])[0]).last_update_ts_sec == 0
    t.lookup([1, 2])
    assert t.max_update_ts == 100
    t.clear()
    assert t.size() == 0 and t.max_update_ts == 100


def test_same_operations_give_same_results_whatever_the_name() -> None:
    a, b = sgd_table(3, name="alpha"), sgd_table(3, name="MonolithHashTable_beta")
    rng = np.random.default_rng(3)
    for t in (a, b):
        r = np.random.default_rng(3)
        ids = r.integers(-50, 50, size=200)
        t.assign_add(ids, r.normal(size=(200, 3)))
        t.apply_gradients(ids[::2], r.normal(size=(100, 3)), [0.05])
    probe = rng.integers(-60, 60, size=50)
    np.testing.assert_array_equal(a.lookup(probe), b.lookup(probe))


def test_many_random_ids_round_trip() -> None:
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 50_000))
    rng.shuffle(ids)
    vals = rng.normal(size=(ids.size, 4)).astype(np.float32)
    t = sgd_table(4)
    t.assign(ids, vals)
    assert t.size() == ids.size
    perm = rng.permutation(ids.size)
    np.testing.assert_array_equal(t.lookup(ids[perm]), vals[perm])


def test_keep_rows_compacts_without_losing_entries() -> None:
    t = sgd_table(2)
    ids = np.arange(1000, dtype=np.int64) * 7
    t.assign(ids, np.stack([ids, -ids], axis=1).astype(np.float32))
    keep = ids % 3 != 0
    assert t.keep_rows(keep) == int((~keep).sum())
    np.testing.assert_array_equal(t.lookup(ids[keep])[:, 0], ids[keep].astype(np.float32))
    np.testing.assert_array_equal(t.lookup(ids[~keep]), np.zeros((int((~keep).sum()), 2)))
    t.assign([1], [[5.0, 5.0]])
    np.testing.assert_array_equal(t.lookup([1]), [[5.0, 5.0]])



def test_reserve_sizes_storage_once_and_keeps_everything() -> None:
    t = EmbeddingHashTable(configs.table_config(2, optimizer=configs.adagrad(0.5)))
    t.apply_gradients([4, -9], [[1.0, 0.0], [0.0, 2.0]], [1.0], req_time=7)
    entries = lookup_entry(t, [4, -9])
    t.reserve(1000)
    grown = t.nbytes()
    assert t.size() == 2 and t.max_update_ts == 7
    assert t.export_columns().ids.tolist() == [4, -9]  # rows unchanged
    assert lookup_entry(t, [4, -9]) == entries
    # adagrad, init 0.5, lr 1: norm = 0.5 + g^2, w = -g / sqrt(norm)
    np.testing.assert_allclose(
        t.lookup([4, -9]), [[-1 / np.sqrt(1.5), 0.0], [0.0, -2 / np.sqrt(4.5)]], rtol=1e-6
    )
    # Growing to 1000 entries allocates nothing more; a smaller reserve never shrinks.
    t.assign(np.arange(100, 1098), np.ones((998, 2), dtype=f32))
    assert t.size() == 1000 and t.nbytes() == grown
    np.testing.assert_array_equal(t.lookup([100, 1097, 5]), [[1, 1], [1, 1], [0, 0]])
    t.reserve(10)
    assert t.nbytes() == grown
    with pytest.raises(InvalidArgumentError):
        t.reserve(-1)

def test_serving_table_stores_compressed_values_and_refuses_training_ops() -> None:
    comp = eht.FloatCompressorConfig(fp16=eht.FloatCompressorConfig.Fp16())
    t = EmbeddingHashTable(configs.table_config(2, compressor=comp, serving=True))
    t.assign([1], [[1.0 / 3.0, 70000.0]])
    np.testing.assert_array_equal(
        t.lookup([1]), [[np.float32(np.float16(1.0 / 3.0)), np.float32(np.inf)]]
    )
    with pytest.raises(ServingEntryError, match="SERVING"):
        t.apply_gradients([1], [[1.0, 1.0]], [0.1])
    with pytest.raises(ServingEntryError):
        lookup_entry(t, [1])


def test_skip_zero_embedding_requires_serving() -> None:
    config = configs.table_config(1)
    config.skip_zero_embedding = True
    with pytest.raises(ConfigError, match="SERVING"):
        EmbeddingHashTable(config)


def test_skip_zero_embedding_erases_on_zero_assign() -> None:
    config = configs.table_config(2, serving=True)
    config.skip_zero_embedding = True
    t = EmbeddingHashTable(config)
    t.assign([1, 2], [[1.0, 0.0], [2.0, 2.0]])
    t.assign([1], [[0.0, 0.0]])
    assert t.size() == 1
    np.testing.assert_array_equal(t.lookup([1, 2]), [[0.0, 0.0], [2.0, 2.0]])


# ---------------------------------------------------------------- bad input


@pytest.fixture
def filled() -> EmbeddingHashTable:
    t = sgd_table(2)
    t.assign([1, 2], [[1.0, 1.0], [2.0, 2.0]], req_time=10)
    return t


def _unchanged(t: EmbeddingHashTable) -> None:
    assert t.size() == 2
    np.testing.assert_array_equal(t.lookup([1, 2]), [[1.0, 1.0], [2.0, 2.0]])
    assert t.max_update_ts == 10


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: t.assign([1, 2], [[1.0, 1.0]]), DimMismatchError, r"\[2, 2\]"),
        (lambda t: t.assign([3], [[1.0, 1.0, 1.0]]), DimMismatchError, "dim 2"),
        (lambda t: t.assign_add([3], [[1.0]]), DimMismatchError, "shape"),
        (lambda t: t.apply_gradients([1], [[1.0]], [0.1]), DimMismatchError, "grads"),
        (lambda t: t.apply_gradients([1], [[1.0, 1.0]], [0.1, 0.2]), DimMismatchError,
         "1 learning rate"),
        (lambda t: t.lookup([["a"]]), DimMismatchError, "1-D"),
        (lambda t: t.assign(["x"], [[1.0, 1.0]]), BadTensorError, "int64"),
        (lambda t: t.assign([1.5], [[1.0, 1.0]]), BadTensorError, "whole numbers"),
        (lambda t: t.apply_gradients([1], [[1.0, 1.0]], [0.1], req_time=-1),
         InvalidArgumentError, "req_time"),
    ],
)
def test_bad_input_raises_before_any_change(
    filled: EmbeddingHashTable, call: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        call(filled)  # type: ignore[operator]
    _unchanged(filled)


def test_unknown_optimizer_and_missing_parts_are_config_errors() -> None:
    no_type = configs.table_config(1, optimizer=eht.OptimizerConfig())
    with pytest.raises(ConfigError, match="opt_config"):
        EmbeddingHashTable(no_type)
    not_built = configs.table_config(1, optimizer=eht.OptimizerConfig(dc=eht.DcOptimizerConfig()))
    with pytest.raises(ConfigError, match="not implemented"):
        EmbeddingHashTable(not_built)
    no_init = configs.table_config(1, initializer=eht.InitializerConfig())
    with pytest.raises(ConfigError, match="init_config"):
        EmbeddingHashTable(no_init)
    with pytest.raises(ConfigError, match="entry_config"):
        EmbeddingHashTable(eht.EmbeddingHashTableConfig())
    empty = eht.EmbeddingHashTableConfig(entry_config=eht.EntryConfig())
    with pytest.raises(ConfigError, match="no segments"):
        EmbeddingHashTable(empty)


# ------------------------------------------------------------ filter gating


def _filtered_table(threshold: int, dim: int = 1) -> EmbeddingHashTable:
    thresholds = eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=threshold)
    flt = SlidingHashFilter(capacity=100, split_num=7, thresholds=thresholds)
    return EmbeddingHashTable(configs.table_config(dim), hash_filter=flt)


def test_gradients_with_hash_filter_threshold_3() -> None:
    # ids [0, 0, 1], grad -1, SGD lr 0.1, threshold 3 (docs/semantics.md §3.7): every
    # occurrence of a missing id is counted against the table as it was before the
    # batch; an occurrence passes once the count before it is >= 3.
    t = _filtered_table(3)
    expected = [[[0.0], [0.0]], [[0.1], [0.0]], [[0.3], [0.0]], [[0.5], [0.1]]]
    for want in expected:
        t.apply_gradients([0, 0, 1], minus_ones(3, 1), [0.1])
        np.testing.assert_allclose(t.lookup([0, 1]), want, rtol=1e-6)


def test_present_ids_bypass_the_filter() -> None:
    t = _filtered_table(3)
    t.hash_filter = None
    t.assign([5], [[1.0]])
    flt = SlidingHashFilter(capacity=100, split_num=7, thresholds=eht.SlotOccurrenceThresholdConfig(
        default_occurrence_threshold=3))
    t.hash_filter = flt
    t.apply_gradients([5, 5], minus_ones(2, 1), [0.1])
    np.testing.assert_allclose(t.lookup([5]), [[1.2]], rtol=1e-6)
    assert flt.peek(np.array([5]))[0] == 0  # never counted


def test_dedup_counts_occurrences_in_one_filter_call() -> None:
    # Five occurrences in one deduped batch are one call with count 5: the count
    # before it is 0 < 3, so the whole batch is filtered; the next batch passes.
    t = _filtered_table(3)
    t.apply_gradients([9] * 5, minus_ones(5, 1), [0.1], enable_dedup=True)
    assert t.size() == 0
    t.apply_gradients([9] * 5, minus_ones(5, 1), [0.1], enable_dedup=True)
    np.testing.assert_allclose(t.lookup([9]), [[0.5]], rtol=1e-6)


def test_assign_add_stops_counting_once_admitted() -> None:
    # threshold 1: the first occurrence is filtered (count before 0), the second
    # passes and creates the entry, the third finds it present and is not counted.
    t = _filtered_table(1)
    t.assign_add([7, 7, 7], [[1.0], [2.0], [4.0]])
    np.testing.assert_array_equal(t.lookup([7]), [[6.0]])
    assert t.hash_filter is not None
    assert isinstance(t.hash_filter, SlidingHashFilter)
    assert t.hash_filter.peek(np.array([7]))[0] == 2


def test_assign_counts_every_missing_occurrence() -> None:
    t = _filtered_table(1)
    t.assign([4, 4, 4], [[1.0], [2.0], [3.0]])
    # Counts before: 0 (filtered), 1 (pass), 2 (pass): the last admitted write wins.
    np.testing.assert_array_equal(t.lookup([4]), [[3.0]])
    assert isinstance(t.hash_filter, SlidingHashFilter)
    assert t.hash_filter.peek(np.array([4]))[0] == 3


def test_upsert_columns_refuses_repeated_ids_and_changes_nothing() -> None:
    from ps_server.engine.hash_table import EntryColumns

    t = sgd_table(1)
    t.assign([1], [[1.0]])
    cols = EntryColumns(
        ids=np.array([2, 2], dtype=np.int64),
        values=np.array([[5.0], [6.0]], dtype=np.float32),
        states=[{}],
        timestamps=np.array([3, 4], dtype=np.int64),
    )
    with pytest.raises(InvalidArgumentError, match="distinct ids"):
        t.upsert_columns(cols)
    assert t.size() == 1
    cols.ids = np.array([2, 3], dtype=np.int64)
    t.upsert_columns(cols)
    np.testing.assert_array_equal(t.lookup([1, 2, 3]), [[1.0], [5.0], [6.0]])
    assert t.max_update_ts == 4


def test_refused_global_step_changes_nothing() -> None:
    # batch_softmax cannot use a negative step; the refusal must come before the
    # clock moves or any entry is created.
    opt = eht.OptimizerConfig(batch_softmax=eht.BatchSoftmaxOptimizerConfig())
    t = EmbeddingHashTable(configs.table_config(1, optimizer=opt))
    with pytest.raises(InvalidArgumentError, match="non-negative global_step"):
        t.apply_gradients([1, 2], [[0.0], [0.0]], [0.1], global_step=-1, req_time=5)
    assert t.size() == 0
    assert t.max_update_ts == 0


def test_fused_optimize_checks_every_tables_step_before_the_first_block() -> None:
    from ps_server.engine.shard import Shard

    shard = Shard()
    shard.create_table("sgd", configs.table_config(1))
    opt = eht.OptimizerConfig(batch_softmax=eht.BatchSoftmaxOptimizerConfig())
    shard.create_table("bs", configs.table_config(1, optimizer=opt))
    with pytest.raises(InvalidArgumentError, match="non-negative global_step"):
        shard.fused_optimize(["sgd", "bs"], [(0, 1), (1, 1)], [7, 8], [1.0, 1.0],
                             [0.1, 0.1], global_step=-1)
    assert shard.table("sgd").size() == 0 and shard.table("bs").size() == 0
