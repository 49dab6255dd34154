"""Routing, dedup, reassembly and fused layout math (pure numpy, no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from ps_client import routing
from ps_client.errors import PsInvalidArgument
from ps_client.routing import (
    FusedRoute,
    RowAssembly,
    as_ids,
    as_rows,
    dedup,
    fused_layout,
    partition,
    scatter_objects,
    shard_of,
    to_int32,
)

# ---------------------------------------------------------------- shard_of


def test_shard_of_is_floormod_for_negative_ids() -> None:
    # floormod(x, 3) = x - 3 * floor(x / 3): -1 -> -1 + 3 = 2, -3 -> 0, -4 -> -4 + 6 = 2,
    # -5 -> -5 + 6 = 1; C's truncating % would give -1, 0, -1, -2.
    got = shard_of([-1, -3, -4, -5, 0, 4, 5], 3)
    assert got.dtype == np.int64
    assert got.tolist() == [2, 0, 2, 1, 0, 1, 2]


def test_shard_of_power_of_two_counts_match_floormod() -> None:
    # A power-of-two count takes the bit-mask path: -1 -> 3, -4 -> 0, -5 -> 3 for 4 shards
    # (floormod(-5, 4) = -5 + 8 = 3), the same as np.mod on every id, extremes included.
    assert shard_of([-1, -4, -5, 0, 7, 8], 4).tolist() == [3, 0, 3, 0, 3, 0]
    ids = np.array([np.iinfo(np.int64).min, -(2**40) - 3, -1, 0, 1, 2**62 + 5,
                    np.iinfo(np.int64).max], dtype=np.int64)
    for n in (1, 2, 8, 64, 1 << 16):
        assert shard_of(ids, n).tolist() == np.mod(ids, n).tolist()


def test_shard_of_int64_extremes() -> None:
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    # -2**63 is even -> 0 mod 2; 2**63 - 1 is odd -> 1.
    # mod 3: 2 ≡ -1, so 2**63 ≡ (-1)**63 ≡ 2; hence -2**63 ≡ -2 ≡ 1 and 2**63 - 1 ≡ 1.
    assert shard_of([lo, hi], 2).tolist() == [0, 1]
    assert shard_of([lo, hi], 3).tolist() == [1, 1]


def test_shard_of_rejects_bad_counts_and_ids() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        shard_of([1], 0)
    with pytest.raises(PsInvalidArgument, match="whole numbers"):
        shard_of([1.5], 2)
    with pytest.raises(PsInvalidArgument, match="1-D"):
        shard_of([[1, 2]], 2)


def test_as_ids_accepts_int_like_and_rejects_bools() -> None:
    assert as_ids(np.array([1, 2], dtype=np.uint8)).dtype == np.int64
    assert as_ids(7).tolist() == [7]
    assert as_ids([3.0, -2.0]).tolist() == [3, -2]
    with pytest.raises(PsInvalidArgument, match="integers"):
        as_ids([True, False])
    with pytest.raises(PsInvalidArgument, match="int64 range"):
        as_ids(np.array([2**63], dtype=np.uint64))


def test_as_rows_checks_shape() -> None:
    assert as_rows([1, 2, 3, 4], 2, 2).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(PsInvalidArgument, match=r"\[2, 3\].*\(2, 2\)"):
        as_rows([[1, 2], [3, 4]], 2, 3)


# ---------------------------------------------------------------- dedup / partition


def test_dedup_sorts_a_batch_with_duplicates() -> None:
    ids = np.array([5, -1, 5, 7, -1, 2], dtype=np.int64)
    uniq, inverse = dedup(ids)
    assert uniq.tolist() == [-1, 2, 5, 7]
    assert inverse.tolist() == [2, 0, 2, 3, 0, 1]
    assert np.array_equal(uniq[inverse], ids)


def test_dedup_keeps_a_batch_without_duplicates_as_it_is() -> None:
    ids = np.array([9, -3, 4, 2**62, -(2**63)], dtype=np.int64)
    uniq, inverse = dedup(ids)
    assert uniq is ids and inverse is None


def test_dedup_empty() -> None:
    uniq, inverse = dedup(np.zeros(0, dtype=np.int64))
    assert uniq.shape == (0,) and inverse is None


def test_partition_keeps_order_per_shard() -> None:
    ids = np.array([4, -1, 3, 2, 7, 0, -4], dtype=np.int64)
    # owners mod 3: 4->1, -1->2, 3->0, 2->2, 7->1, 0->0, -4->2
    pos = partition(ids, 3)
    assert [p.tolist() for p in pos] == [[2, 5], [0, 4], [1, 3, 6]]
    assert partition(ids, 1)[0].tolist() == list(range(7))


@pytest.mark.parametrize("num_shards", [2, 3, 4, 5, 8])
def test_partition_is_floormod_at_int64_extremes(num_shards: int) -> None:
    # 2 and 4 shards route by the low byte; the others through shard_of.
    rng = np.random.default_rng(num_shards)
    ids = np.concatenate([
        np.array([-(2**63), -(2**63) + 1, -257, -256, -255, -1, 0, 1, 255, 256, 2**63 - 1],
                 dtype=np.int64),
        rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64),
    ])
    pos = partition(ids, num_shards)
    assert len(pos) == num_shards
    want = np.array([int(i) % num_shards for i in ids.tolist()])  # Python's % is floormod
    for s, p in enumerate(pos):
        assert p.dtype == np.int64
        assert p.tolist() == np.flatnonzero(want == s).tolist()


def shard_answers(uniq: np.ndarray, positions: list[np.ndarray]) -> list[np.ndarray]:
    """What each shard answers for its unique ids, in the order sent: row [id, 2 id]."""
    return [np.stack([uniq[p], 2 * uniq[p]], axis=1).astype(np.float32) for p in positions]


@pytest.mark.parametrize("num_shards", [1, 3, 4])
@pytest.mark.parametrize("arrival", ["in order", "reversed"])
def test_lookup_round_trip_dedup_partition_assemble(num_shards: int, arrival: str) -> None:
    rng = np.random.default_rng(num_shards)
    for ids in (rng.integers(-50, 50, size=200).astype(np.int64),  # many duplicates
                rng.permutation(np.arange(-100, 100, dtype=np.int64))):  # none
        uniq, inverse = dedup(ids)
        positions = partition(uniq, num_shards)
        for s, p in enumerate(positions):
            assert (np.mod(uniq[p], num_shards) == s).all()
        rows = RowAssembly(positions, inverse, 2)
        answers = list(enumerate(shard_answers(uniq, positions)))
        for s, part in answers if arrival == "in order" else answers[::-1]:
            rows.add(s, part)
        assert rows.out.tolist() == [[float(i), 2.0 * i] for i in ids]
        assert rows.out.flags.writeable and rows.out.dtype == np.float32


@pytest.mark.parametrize("block_bytes", [8, 24, 1 << 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_assembly_scatters_unique_rows_block_by_block(
    monkeypatch: pytest.MonkeyPatch, block_bytes: int, dtype: type
) -> None:
    # Blocks of 1, 3 and all rows (dim 2 of 4 or 2 bytes); answers owned, read-only
    # or strided, in any arrival order, some shards empty.
    monkeypatch.setattr(routing, "_SCATTER_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(block_bytes)
    uniq = rng.permutation(np.arange(-300, 300, 3, dtype=np.int64))
    for num_shards in (2, 4, 6):
        positions = partition(uniq, num_shards)
        rows = RowAssembly(positions, None, 2, dtype=dtype)
        answers = [a.astype(dtype) for a in shard_answers(uniq, positions)]
        for s in rng.permutation(num_shards).tolist():
            a = answers[s]
            if s % 3 == 0:
                rows.add(s, a, owned=True)
            elif s % 3 == 1:
                a.flags.writeable = False
                rows.add(s, a)
            else:
                rows.add(s, np.asfortranarray(a))
        assert rows.out.dtype == dtype and rows.out.flags.writeable
        np.testing.assert_array_equal(
            rows.out, np.stack([uniq, 2 * uniq], axis=1).astype(dtype))


def test_assembly_refuses_an_answer_of_the_wrong_shape() -> None:
    rows = RowAssembly(partition(np.arange(6, dtype=np.int64), 2), None, 3)
    with pytest.raises(ValueError, match="rows for 3 ids of dim 3"):
        rows.add(0, np.zeros((2, 3), dtype=np.float32))


def test_assembly_of_read_only_answers_and_empty_shards() -> None:
    uniq = np.array([4, 8, 5], dtype=np.int64)  # mod 4: 0, 0, 1; shards 2 and 3 get none
    positions = partition(uniq, 4)
    assert [p.tolist() for p in positions] == [[0, 1], [2], [], []]
    inverse = np.array([2, 0, 0, 1, 2], dtype=np.int64)  # ids 5, 4, 4, 8, 5
    rows = RowAssembly(positions, inverse, 3)
    answer = np.array([[4, 4, 4], [8, 8, 8]], dtype=np.float32)
    answer.flags.writeable = False  # as viewed in the received bytes
    rows.add(0, answer)
    rows.add(1, np.full((1, 3), 5, dtype=np.float32))
    assert rows.out[:, 0].tolist() == [5, 4, 4, 8, 5]
    none = RowAssembly([np.zeros(0, dtype=np.int64)], None, 3)
    assert none.out.shape == (0, 3)


def test_scatter_objects_places_bytes() -> None:
    positions = [np.array([1], dtype=np.int64), np.array([0, 2], dtype=np.int64)]
    out = scatter_objects([[b"b"], [b"a", b""]], positions, 3)
    assert out.tolist() == [b"a", b"b", b""]


# ---------------------------------------------------------------- fused layout


def test_fused_layout_docstring_example() -> None:
    # docs/semantics.md §7: K=2 tables of dims [1, 2], N=2, sizes [1, 1, 1, 1].
    # key_off: 0, 1, 2, 3, 4.  emb_off: 0, +1*1=1, +2*1=3, +1*1=4, +2*1=6.
    # recv_splits: shard 0 = 1*1 + 2*1 = 3, shard 1 = 3.
    lay = fused_layout([1, 1, 1, 1], [1, 2], 2)
    assert lay.key_off.tolist() == [0, 1, 2, 3, 4]
    assert lay.emb_off.tolist() == [0, 1, 3, 4, 6]
    assert lay.recv_splits.tolist() == [3, 3]
    assert lay.block_tables.tolist() == [0, 1, 0, 1]


def test_fused_layout_uneven_sizes() -> None:
    # K=2 (dims 3, 1), N=3, sizes [s0t0=2, s0t1=0, s1t0=1, s1t1=4, s2t0=0, s2t1=1].
    # emb per block: 6, 0, 3, 4, 0, 1 -> emb_off 0, 6, 6, 9, 13, 13, 14.
    # recv_splits: 6+0, 3+4, 0+1.
    lay = fused_layout([2, 0, 1, 4, 0, 1], [3, 1], 3)
    assert lay.key_off.tolist() == [0, 2, 2, 3, 7, 7, 8]
    assert lay.emb_off.tolist() == [0, 6, 6, 9, 13, 13, 14]
    assert lay.recv_splits.tolist() == [6, 7, 1]
    assert lay.block_of.tolist() == [0, 0, 2, 3, 3, 3, 3, 5]
    assert lay.within.tolist() == [0, 1, 0, 0, 1, 2, 3, 0]
    assert lay.row_dim.tolist() == [3, 3, 3, 1, 1, 1, 1, 1]


def test_fused_layout_validation() -> None:
    with pytest.raises(PsInvalidArgument, match=r"K\*N = 2\*2 = 4"):
        fused_layout([1, 1, 1], [1, 2], 2)
    with pytest.raises(PsInvalidArgument, match=">= 0"):
        fused_layout([1, -1], [1], 2)
    with pytest.raises(PsInvalidArgument, match="num_of_shards"):
        fused_layout([], [1], 0)


def test_fused_route_rejects_id_count_mismatch() -> None:
    lay = fused_layout([1, 1, 1, 1], [1, 2], 2)
    with pytest.raises(PsInvalidArgument, match="3 ids but fused_slot_size adds up to 4"):
        FusedRoute(lay, np.array([1, 2, 3], dtype=np.int64), 2)


def test_fused_route_docstring_example_on_three_real_shards() -> None:
    # ids [1, 3, 2, 4] in blocks 0..3 (tables 0, 1, 0, 1); owners mod 3: 1, 0, 2, 1.
    lay = fused_layout([1, 1, 1, 1], [1, 2], 2)
    ids = np.array([1, 3, 2, 4], dtype=np.int64)
    route = FusedRoute(lay, ids, 3)
    assert [o.positions.tolist() for o in route.owners] == [[1], [0, 3], [2]]
    # Shard 0: block 1 (table 1) with one id; shard 1: block 0 (table 0), block 3 (table 1).
    assert [o.blocks for o in route.owners] == [[(1, 1)], [(0, 1), (1, 1)], [(0, 1)]]
    assert [o.floats for o in route.owners] == [2, 3, 1]
    # Each shard answers its rows in its block order: shard 0 -> id 3 = [3, 3];
    # shard 1 -> id 1 = [1], id 4 = [4, 4]; shard 2 -> id 2 = [2].
    answers = [np.array(a, dtype=np.float32) for a in ([3, 3], [1, 4, 4], [2])]
    assert route.scatter_floats(answers).tolist() == [1, 3, 3, 2, 4, 4]


def test_fused_route_gathers_grads_by_given_offsets() -> None:
    lay = fused_layout([1, 1, 1, 1], [1, 2], 2)
    route = FusedRoute(lay, np.array([1, 3, 2, 4], dtype=np.int64), 2)
    grads = np.array([10, 20, 21, 30, 40, 41], dtype=np.float32)
    # Owners mod 2: ids 1, 3 -> shard 1; ids 2, 4 -> shard 0. Shard 0 gets id 2's grad [30]
    # then id 4's [40, 41]; shard 1 gets id 1's [10] then id 3's [20, 21].
    idx0 = route.float_index(route.owners[0].positions, lay.emb_off)
    idx1 = route.float_index(route.owners[1].positions, lay.emb_off)
    assert grads[idx0].tolist() == [30, 40, 41]
    assert grads[idx1].tolist() == [10, 20, 21]


def test_check_offsets() -> None:
    lay = fused_layout([1, 1, 1, 1], [1, 2], 2)
    ok = lay.check_offsets([0, 1, 3, 4, 6], lay.dims[lay.block_tables], 6, "grad_offsets")
    assert ok.tolist() == [0, 1, 3, 4, 6]
    with pytest.raises(PsInvalidArgument, match=r"block 1 a span of 1.*make it 2"):
        lay.check_offsets([0, 1, 2, 3, 4], lay.dims[lay.block_tables], 6, "grad_offsets")
    with pytest.raises(PsInvalidArgument, match=r"K\*N\+1 = 5"):
        lay.check_offsets([0, 1, 2, 3], np.ones(4, dtype=np.int64), 4, "id_offsets")
    with pytest.raises(PsInvalidArgument, match="outside the buffer"):
        lay.check_offsets([1, 2, 3, 4, 5], np.ones(4, dtype=np.int64), 4, "id_offsets")


def test_to_int32_overflow() -> None:
    assert to_int32(np.array([0, 5], dtype=np.int64), "x").dtype == np.int32
    with pytest.raises(PsInvalidArgument, match="int32"):
        to_int32(np.array([2**31], dtype=np.int64), "emb_offsets")


@pytest.mark.parametrize("n", [1023, 1024, 5000, 65536])
def test_dedup_of_large_batches_finds_every_duplicate(n: int) -> None:
    # Batches of 1,024 ids and more are first checked bucket by bucket (a hash of the
    # ids); the answer must be the sort's: none when distinct, each one when not.
    rng = np.random.default_rng(n)
    distinct = rng.choice(np.arange(-(2**40), 2**40, 7919, dtype=np.int64), n, replace=False)
    uniq, inverse = dedup(distinct)
    assert inverse is None and uniq is distinct
    for dup_at in (0, n // 2, n - 1):
        ids = distinct.copy()
        ids[dup_at] = ids[(dup_at + 1) % n]
        uniq, inverse = dedup(ids)
        assert inverse is not None and uniq.size == n - 1
        np.testing.assert_array_equal(uniq[inverse], ids)


@pytest.mark.parametrize("reuse", [True, False], ids=["reused", "fresh"])
def test_dedup_agrees_with_unique_on_random_batches(
    reuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bucket check reuses its tables between calls (up to a size; past it, fresh
    # ones), so batches of growing and shrinking sizes follow each other; small id
    # ranges crowd the buckets (repeats between ids that lost their bucket, and with
    # its survivor), wide ones do not.
    if not reuse:
        monkeypatch.setattr(routing, "_REUSE_MAX", 0)
    rng = np.random.default_rng(15)
    for trial in range(200):
        n = int(rng.integers(900, 9000))
        span = int(rng.choice([2 * n, 50 * n, 2**62]))
        ids = rng.integers(-span, span, n, dtype=np.int64)
        if trial % 2:
            ids = rng.permutation(np.unique(ids))
        if trial % 3 == 0:
            ids[rng.integers(ids.size)] = ids[rng.integers(ids.size)]
        uniq, inverse = dedup(ids)
        expected = np.unique(ids)
        if expected.size == ids.size:
            assert inverse is None and uniq is ids
        else:
            assert inverse is not None
            np.testing.assert_array_equal(uniq, expected)
            np.testing.assert_array_equal(uniq[inverse], ids)


def test_assembly_takes_an_owned_lone_answer_as_it_is() -> None:
    answer = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows = RowAssembly([np.arange(4, dtype=np.int64)], None, 3)
    rows.add(0, answer, owned=True)
    assert rows.out is answer
    copied = RowAssembly([np.arange(4, dtype=np.int64)], None, 3)
    copied.add(0, answer)
    assert copied.out is not answer
    np.testing.assert_array_equal(copied.out, answer)
