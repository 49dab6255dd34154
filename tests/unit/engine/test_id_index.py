"""IdIndex against a dict: rows dense in insertion order, lookups exact, every shape
of id set (negative, extreme, arithmetic, clustered) and every way the cascade changes
(growth, eviction, clear)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ps_server.engine.id_index import IdIndex

I64 = np.iinfo(np.int64)


def check_against(index: IdIndex, oracle: dict[int, int], probes: np.ndarray) -> None:
    assert index.size == len(oracle)
    assert index.ids.tolist() == sorted(oracle, key=oracle.__getitem__)
    want = [oracle.get(int(x), -1) for x in probes]
    assert index.find(probes).tolist() == want


id_values = st.one_of(
    st.integers(I64.min, I64.max),
    st.integers(-50, 50),
    st.sampled_from([I64.min, I64.max, 0, -1, 1 << 62, -(1 << 62)]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(id_values, max_size=40), max_size=12), st.integers(0, 64))
def test_find_or_insert_matches_a_dict(batches: list[list[int]], hint: int) -> None:
    index = IdIndex(hint)
    oracle: dict[int, int] = {}
    for batch in batches:
        ids = np.array(batch, dtype=np.int64)
        rows, before = index.find_or_insert(ids)
        assert before == len(oracle)
        for x in batch:  # new ids get rows in first-occurrence order
            oracle.setdefault(x, len(oracle))
        assert rows.tolist() == [oracle[x] for x in batch]
        probes = np.array(batch + [x ^ 0x5A5A for x in batch], dtype=np.int64)
        check_against(index, oracle, probes)


def test_a_million_ids_through_many_levels() -> None:
    rng = np.random.default_rng(7)
    ids = rng.choice(I64.max, size=1 << 20, replace=False).astype(np.int64)
    ids[::2] *= -1
    index = IdIndex()
    for start in range(0, ids.size, 50_000):
        index.insert_new(ids[start:start + 50_000])
    assert index.size == ids.size
    np.testing.assert_array_equal(index.find(ids), np.arange(ids.size))
    shuffled = rng.permutation(ids.size)
    np.testing.assert_array_equal(index.find(ids[shuffled]), shuffled)
    absent = rng.integers(I64.min, I64.max, size=100_000, dtype=np.int64)
    absent = absent[~np.isin(absent, ids)]
    assert (index.find(absent) == -1).all()
    # Each level takes about 79% of the ids reaching it: ~log(n)/log(4.7) levels.
    assert index.num_levels <= math.ceil(math.log(ids.size) / math.log(4)) + 2
    # Slots: the first level has 2 per id rounded up to a power of two (2**21 int32
    # here); the deeper ones, 2-4 per id reaching them (~21%), add less than half that.
    first_level = 4 * (1 << 21)
    slot_bytes = index.nbytes() - index.row_capacity * 8
    assert first_level < slot_bytes < 1.5 * first_level


def test_structured_id_sets() -> None:
    """Arithmetic sequences, multiples of large powers of two and one dense cluster:
    the sets that break weak hashes."""
    sets = [
        np.arange(0, 300_000, dtype=np.int64) * 1024,
        np.arange(100_000, dtype=np.int64) << np.int64(32),
        np.arange(-50_000, 50_000, dtype=np.int64),
        (np.arange(100_000, dtype=np.int64) << np.int64(44)) | 7,
    ]
    for ids in sets:
        index = IdIndex()
        rows, before = index.find_or_insert(ids)
        assert before == 0
        np.testing.assert_array_equal(rows, np.arange(ids.size))
        np.testing.assert_array_equal(index.find(ids[::-1]), np.arange(ids.size)[::-1])
        assert (index.find(ids + 1 if ids[1] - ids[0] > 1 else ids + ids.size) == -1).all()
        assert index.num_levels <= 12


def test_keep_rows_renumbers_in_order() -> None:
    ids = np.arange(10_000, dtype=np.int64) * 7919 - 3_000_000
    index = IdIndex()
    index.insert_new(ids)
    keep = (ids % 3) != 0
    index.keep_rows(keep)
    kept = ids[keep]
    assert index.size == kept.size
    np.testing.assert_array_equal(index.ids, kept)
    np.testing.assert_array_equal(index.find(kept), np.arange(kept.size))
    assert (index.find(ids[~keep]) == -1).all()
    rows, before = index.find_or_insert(np.array([ids[0], 5, kept[3], 6], dtype=np.int64))
    assert before == kept.size
    assert rows.tolist() == [kept.size, kept.size + 1, 3, kept.size + 2]


def test_keep_nothing_then_insert() -> None:
    index = IdIndex()
    index.insert_new(np.array([1, 2, 3], dtype=np.int64))
    index.keep_rows(np.zeros(3, dtype=bool))
    assert index.size == 0 and (index.find(np.array([1, 2, 3], dtype=np.int64)) == -1).all()
    assert index.insert_new(np.array([3, 1], dtype=np.int64)).tolist() == [0, 1]
    assert index.find(np.array([1, 2, 3], dtype=np.int64)).tolist() == [1, -1, 0]


def test_clear_keeps_capacity() -> None:
    ids = np.arange(5_000, dtype=np.int64) ** 2
    index = IdIndex()
    index.insert_new(ids)
    held = index.nbytes()
    index.clear()
    assert index.size == 0 and index.nbytes() == held
    assert (index.find(ids) == -1).all()
    assert index.insert_new(ids[::-1]).tolist() == list(range(ids.size))
    np.testing.assert_array_equal(index.find(ids), np.arange(ids.size)[::-1])
    assert index.row_capacity == ids.size


def test_capacity_hint_presizes_every_level() -> None:
    index = IdIndex(100_000)
    held = index.nbytes()
    ids = np.arange(100_000, dtype=np.int64) * 104_729 + 11
    for start in range(0, ids.size, 10_000):
        index.insert_new(ids[start:start + 10_000])
    assert index.nbytes() == held
    np.testing.assert_array_equal(index.find(ids), np.arange(ids.size))


def test_empty_inputs() -> None:
    index = IdIndex()
    none = np.zeros(0, dtype=np.int64)
    assert index.find(none).shape == (0,)
    assert index.find(np.array([4], dtype=np.int64)).tolist() == [-1]
    assert index.insert_new(none).shape == (0,)
    rows, before = index.find_or_insert(none)
    assert rows.shape == (0,) and before == 0


def test_a_bulk_insert_sizes_its_levels_exactly() -> None:
    """One large insert (a restore, a first fill) builds every level for exactly the
    ids that reach it: under 9.5 bytes of slots per id, where rounding level 0 up to
    a power of two took 11 for a million ids. Lookups stay exact."""
    rng = np.random.default_rng(11)
    for n in (65_536, 1_000_000):
        ids = rng.choice(I64.max, size=n, replace=False).astype(np.int64)
        index = IdIndex()
        index.insert_new(ids)
        slot_bytes = index.nbytes() - index.row_capacity * 8
        assert index.row_capacity == n
        assert 4 * 1.875 * n <= slot_bytes < 9.5 * n
        np.testing.assert_array_equal(index.find(ids[::-1]), np.arange(n)[::-1])
        absent = rng.integers(I64.min, I64.max, size=50_000, dtype=np.int64)
        absent = absent[~np.isin(absent, ids)]
        assert (index.find(absent) == -1).all()


def test_growth_after_a_bulk_insert_doubles_to_powers_of_two() -> None:
    """After a bulk insert, small batches grow a level by doubling rounded up to a
    power of two, so two indexes that started differently end on the same sizes."""
    rng = np.random.default_rng(12)
    ids = rng.choice(I64.max, size=600_000, replace=False).astype(np.int64)
    first = IdIndex()
    first.insert_new(ids[:100_000])
    second = IdIndex()
    second.insert_new(ids[:130_000])
    for index, start in ((first, 100_000), (second, 130_000)):
        for s in range(start, ids.size, 20_000):
            index.insert_new(ids[s:s + 20_000])
        np.testing.assert_array_equal(index.find(ids), np.arange(ids.size))
    level0 = [idx._levels[0].shape[0] for idx in (first, second)]
    assert level0[0] == level0[1] == 1 << 21  # 600,000 ids x 1.875 < 2**21
