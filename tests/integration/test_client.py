"""PsClient, Table and HashFilters against real shard processes (1 and 3 shards; one
fused-ops test on 2 shards).

One cluster per shard count for the whole module; every test makes its own tables
(fresh names), so tests do not see each other's data. Expected values are worked
out by hand from the formulas of docs/semantics.md.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from ps_client import (
    PolynomialDecay,
    PsClient,
    PsError,
    PsFailedPrecondition,
    PsInvalidArgument,
    PsUnavailable,
    RetryPolicy,
)
from ps_client.graph_meta import HASH_TABLE_METADATA, get_meta
from ps_client.testing import ClusterStartError, local_cluster

pytestmark = pytest.mark.integration

f32 = np.float32


def table_config(dims: tuple[int, ...] = (1,), optimizer: str = "sgd",
                 init_acc: float = 1.0) -> eht.EmbeddingHashTableConfig:
    """Zeros initializer, fp32, one segment per entry of ``dims``."""
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    for dim in dims:
        seg = cfg.entry_config.segments.add()
        seg.dim_size = dim
        seg.init_config.zeros.SetInParent()
        seg.comp_config.fp32.SetInParent()
        if optimizer == "adagrad":
            seg.opt_config.adagrad.initial_accumulator_value = init_acc
        else:
            seg.opt_config.sgd.SetInParent()
    return cfg


def thresholds(default: int) -> eht.SlotOccurrenceThresholdConfig:
    return eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=default)


@pytest.fixture(scope="module", params=[1, 3], ids=["1shard", "3shards"])
def client(request: pytest.FixtureRequest) -> Iterator[PsClient]:
    with local_cluster(request.param) as cluster, PsClient(cluster.addresses, timeout=30) as c:
        yield c


# ---------------------------------------------------------------- routing & naming


def test_shard_of_and_num_shards(client: PsClient) -> None:
    n = client.num_shards
    # floormod: -1 -> n - 1, -4 -> (-4 mod n).
    assert client.shard_of([-1, 0, 4, -4]).tolist() == [n - 1, 0, 4 % n, (-4) % n]


def test_create_table_names(client: PsClient) -> None:
    t = client.create_table(table_config())
    assert t.name.startswith("MonolithHashTable_")
    assert t.dim_size == 1
    u = client.create_table(table_config())
    assert u.name != t.name
    named = client.create_table(table_config((2, 3)), name="names_two_segments",
                                learning_rate_fns=(0.1, 0.2), extra_restore_names=("old",))
    assert named.dim_size == 5 and named.extra_restore_names == ("old",)
    assert {t.name, u.name, "names_two_segments"} <= set(client.tables())
    assert {t.name, u.name, "names_two_segments"} <= client.meta.get_meta(
        HASH_TABLE_METADATA, set)
    with pytest.raises(ValueError, match="names_two_segments"):
        client.create_table(table_config(), name="names_two_segments")


def test_create_table_learning_rate_count(client: PsClient) -> None:
    with pytest.raises(ValueError, match=r"2 segment\(s\).*got 1"):
        client.create_table(table_config((1, 1)), name="lr_count", learning_rate_fns=(1.0,))
    with pytest.raises(ValueError):
        client.create_table(table_config(), name="lr_empty", learning_rate_fns=())
    assert "lr_count" not in client.tables()


def test_attach_to_existing_table(client: PsClient) -> None:
    client.create_table(table_config((2,)), name="attach_me").assign([7], [[1.5, 2.5]])
    other = PsClient(client.addresses)
    try:
        t = other.table("attach_me")
        assert t.dim_size == 2
        assert t.lookup([7]).tolist() == [[1.5, 2.5]]
        # Attached tables default to learning rate 1.0: w = 1.5 - 1.0 * 0.5 = 1.0.
        t.apply_gradients([7], [[0.5, 0.5]], global_step=0)
        assert t.lookup([7]).tolist() == [[1.0, 2.0]]
        with pytest.raises(KeyError, match="nope"):
            other.table("nope")
        # The names of another client do not clash with this one's registry.
        assert "attach_me" not in client.meta.get_meta("other", set)
    finally:
        other.close()


def test_graph_meta_is_per_client_context(client: PsClient) -> None:
    with PsClient(client.addresses) as inner:
        inner.create_table(table_config(), name="meta_inner")
        assert "meta_inner" in get_meta(HASH_TABLE_METADATA, set)
    assert "meta_inner" not in get_meta(HASH_TABLE_METADATA, set)
    assert "meta_inner" not in client.meta.get_meta(HASH_TABLE_METADATA, set)


def test_closed_client_refuses_calls(client: PsClient) -> None:
    c = PsClient(client.addresses)
    c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.tables()


# ---------------------------------------------------------------- data plane


def test_assign_lookup_with_duplicates_and_negative_ids(client: PsClient) -> None:
    t = client.create_table(table_config((2,)))
    ids = [-1, 4, -7, 10]
    t.assign(ids, [[1, 2], [3, 4], [5, 6], [7, 8]])
    got = t.lookup([10, -1, 99, -1, 4, -7, 10])
    assert got.dtype == np.float32 and got.shape == (7, 2)
    assert got.tolist() == [[7, 8], [1, 2], [0, 0], [1, 2], [3, 4], [5, 6], [7, 8]]
    assert t.size() == 4
    assert t.lookup([]).shape == (0, 2)


def test_lookups_are_writable_and_independent(client: PsClient) -> None:
    # A big lookup of distinct ids from one shard is handed out in place over the
    # answer's bytes: it must be writable, survive later calls, and share nothing.
    t = client.create_table(table_config((4,)))
    ids = np.arange(20_000, dtype=np.int64) * 3 - 7
    vals = np.arange(ids.size * 4, dtype=f32).reshape(-1, 4)
    t.assign(ids, vals)
    first = t.lookup(ids)
    second = t.lookup(ids)
    assert first.flags.writeable and second.flags.writeable
    first[:] = -1
    for _ in range(3):
        np.testing.assert_array_equal(t.lookup(ids[::-1]), vals[::-1])
    np.testing.assert_array_equal(second, vals)
    assert (first == -1).all()


def test_fan_out_hands_over_each_answer_and_raises_after_all(client: PsClient) -> None:
    """each(on_answer=...) sees every shard's answer (what lookups place rows with);
    a failing hand-over counts as that shard's failure, raised once all calls ended."""
    core = client._core.transport  # the calls of the async core every sync method runs on
    seen: list[int] = []

    def record(shard: int, answer: object) -> None:
        seen.append(shard)
        if shard == client.num_shards - 1:
            raise PsInvalidArgument(f"shard {shard}'s answer refused")

    async def fan_out() -> list[object]:
        return await core.each("ListTables", pb.ListTablesRequest(), on_answer=record)

    with pytest.raises(PsInvalidArgument, match=f"shard {client.num_shards - 1}'s answer"):
        client._run(fan_out())
    assert sorted(seen) == list(range(client.num_shards))
    seen.clear()
    answers = client._run(core.each("ListTables", pb.ListTablesRequest(),
                                    on_answer=lambda s, a: seen.append(s)))
    assert len(answers) == client.num_shards and sorted(seen) == list(range(client.num_shards))


def test_assign_later_duplicate_wins(client: PsClient) -> None:
    t = client.create_table(table_config())
    t.assign([3, 5, 3], [[1], [2], [9]])
    assert t.lookup([3, 5]).tolist() == [[9], [2]]


def test_assign_add_duplicates_accumulate(client: PsClient) -> None:
    t = client.create_table(table_config())
    # id 2: 0 + 1 + 2 + 4 = 7; id -2: 0 + 8 = 8; then + 0.5 -> 8.5.
    t.assign_add([2, -2, 2, 2], [[1], [8], [2], [4]]).assign_add([-2], [[0.5]])
    assert t.lookup([2, -2]).tolist() == [[7], [8.5]]


def test_assign_shape_error(client: PsClient) -> None:
    t = client.create_table(table_config((3,)))
    with pytest.raises(PsInvalidArgument, match=r"\[2, 3\].*\(2, 2\)"):
        t.assign([1, 2], [[1, 2], [3, 4]])
    assert t.size() == 0


def test_lookup_entry_bytes(client: PsClient) -> None:
    t = client.create_table(table_config())
    t.assign([11], [[0.1]])
    # docs/semantics.md §4.2: SGD, value 0.1, timestamp 0 -> num (field 2, packed float 0x3dcccccd),
    # opt = OptimizerDump{dump {sgd {}}}, last_update_ts_sec 0.
    want = bytes.fromhex("15cdcccc3d1a040a0212002000")
    assert t.lookup_entry([11, 12, 11]) == [want, b"", want]


def test_apply_gradients_sgd_with_and_without_dedup(client: PsClient) -> None:
    # docs/semantics.md §4.2: ids [0,1,0,1,0], grad -1, lr 0.1, dim 10 -> id0 0.3, id1 0.2.
    for dedup in (False, True):
        t = client.create_table(table_config((10,)), learning_rate_fns=(0.1,))
        ids = [0, 1, 0, 1, 0]
        t.apply_gradients(ids, -np.ones((5, 10)), global_step=0, enable_dedup=dedup)
        lr = f32(0.1)
        if dedup:  # one step per id with the summed grad
            id0, id1 = f32(0) - lr * f32(-3), f32(0) - lr * f32(-2)
        else:
            id0 = ((f32(0) - lr * f32(-1)) - lr * f32(-1)) - lr * f32(-1)
            id1 = (f32(0) - lr * f32(-1)) - lr * f32(-1)
        got = t.lookup([0, 1])
        assert got[0].tolist() == [float(id0)] * 10
        assert got[1].tolist() == [float(id1)] * 10


def test_apply_gradients_adagrad_dedup_passes_through(client: PsClient) -> None:
    # Adagrad init_acc 1, lr 0.1, grads 1 and 1 on the same id:
    #   without dedup: norm 2, w = -0.1/sqrt(2); norm 3, w -= 0.1/sqrt(3)
    #   with dedup:    one step with g = 2: norm 5, w = -0.1/sqrt(5) * 2
    lr = f32(0.1)
    two_steps = f32(0) - lr / np.sqrt(f32(2)) * f32(1)
    two_steps = two_steps - lr / np.sqrt(f32(3)) * f32(1)
    one_step = f32(0) - lr / np.sqrt(f32(5)) * f32(2)
    for dedup, want in ((False, two_steps), (True, one_step)):
        t = client.create_table(table_config(optimizer="adagrad"), learning_rate_fns=(0.1,))
        t.apply_gradients([-5, -5], [[1], [1]], global_step=0, enable_dedup=dedup)
        np.testing.assert_allclose(t.lookup([-5])[0, 0], want, rtol=1e-6)


def test_learning_rate_functions_use_global_step(client: PsClient) -> None:
    # Segment 0: PolynomialDecay 0.01 -> 0.11 over 10 steps: step 2 -> 0.03.
    # Segment 1: lambda: 0.5 (no argument). Segment 2: lambda step: step / 8 -> 0.25.
    t = client.create_table(
        table_config((1, 1, 1)),
        learning_rate_fns=(PolynomialDecay(0.01, 10, 0.11), lambda: 0.5, lambda s: s / 8),
    )
    t.apply_gradients([3], [[-1, -1, -1]], global_step=2)
    got = t.lookup([3])[0]
    np.testing.assert_allclose(got, [0.03, 0.5, 0.25], rtol=1e-6)


def test_size_counts_all_shards(client: PsClient) -> None:
    t = client.create_table(table_config())
    ids = np.arange(-20, 21, dtype=np.int64)
    t.assign(ids, np.ones((ids.size, 1)))
    assert t.size() == 41


def test_save_as_tensor_walks_one_logical_part(client: PsClient) -> None:
    t = client.create_table(table_config())
    ids = np.arange(-10, 30, dtype=np.int64)
    t.assign(ids, ids.astype(np.float32).reshape(-1, 1))
    for part in range(2):
        seen: list[int] = []
        offset, batches = 0, 0
        while True:
            offset, entries = t.save_as_tensor(part, 2, 3, offset)
            batches += 1
            dumps = [eht.EntryDump.FromString(e) for e in entries]
            seen += [d.id for d in dumps]
            assert all(d.num[0] == d.id for d in dumps)
            if len(entries) < 3:
                break
            assert batches < 20
        # Ids -10..29 with floormod(id, 2) == part: 20 of each parity.
        assert sorted(seen) == [i for i in range(-10, 30) if i % 2 == part]


def test_save_as_tensor_rejects_bad_part(client: PsClient) -> None:
    t = client.create_table(table_config())
    with pytest.raises(ValueError, match="shard_idx"):
        t.save_as_tensor(2, 2, 10, 0)


def test_save_and_restore(client: PsClient, tmp_path: Path) -> None:
    t = client.create_table(table_config((2,)))
    t.assign([1, -2, 3], [[1, 1], [2, 2], [3, 3]])
    base = str(tmp_path / "emb")
    t.save(base)
    files = sorted(os.path.basename(f) for f in glob.glob(base + "_*"))
    assert {f.split("-")[0] for f in files} == {f"emb_{i}" for i in range(client.num_shards)}
    t.assign([1, 4], [[9, 9], [4, 4]])
    t.restore(base)
    assert t.size() == 3
    assert t.lookup([1, -2, 3, 4]).tolist() == [[1, 1], [2, 2], [3, 3], [0, 0]]


def test_restore_missing_files_changes_nothing(client: PsClient, tmp_path: Path) -> None:
    t = client.create_table(table_config())
    t.assign([5], [[5]])
    with pytest.raises(PsError):
        t.restore(str(tmp_path / "absent"))
    assert t.lookup([5]).tolist() == [[5]]


def test_restore_is_all_or_nothing(client: PsClient, tmp_path: Path) -> None:
    t = client.create_table(table_config())
    ids = np.arange(12)
    t.assign(ids, np.full((12, 1), 7.0))
    base = str(tmp_path / "corrupt")
    t.save(base)
    t.assign(ids, np.full((12, 1), 1.0))
    victim = sorted(glob.glob(base + "_*"))[-1]  # the last shard's file
    data = bytearray(Path(victim).read_bytes())
    data[-3] ^= 0xFF  # inside the last record's payload: its CRC no longer matches
    Path(victim).write_bytes(bytes(data))
    with pytest.raises(PsError):
        t.restore(base)
    assert t.lookup(ids).tolist() == [[1.0]] * 12


# ---------------------------------------------------------------- hash filters


def test_create_hash_filters_rejects_unknown_type(client: PsClient) -> None:
    with pytest.raises(ValueError, match="bloom"):
        client.create_hash_filters(True, filter_type="bloom")


def test_intercept_gradient_worked_example(client: PsClient) -> None:
    # docs/semantics.md §3.3: threshold 3, capacity 100, split 7, ids [1, 3<<17, 1], count 1 each.
    filters = client.create_hash_filters(True, thresholds(3), capacity=100, split_num=7,
                                         name_suffix="_worked")
    ids = [1, 3 << 17, 1]
    ones = np.ones((3, 2), dtype=np.float32)
    runs = [filters.intercept_gradient(ids, ones).tolist() for _ in range(4)]
    assert runs == [
        [[0, 0], [0, 0], [0, 0]],
        [[0, 0], [0, 0], [1, 1]],
        [[1, 1], [0, 0], [1, 1]],
        [[1, 1], [1, 1], [1, 1]],
    ]


def test_dummy_filters_pass_everything(client: PsClient, tmp_path: Path) -> None:
    for filters in (client.create_hash_filters(False, thresholds(3), name_suffix="_off"),
                    client.create_hash_filters(True, thresholds(3), filter_type="no_filter",
                                               name_suffix="_none")):
        assert not filters.enabled
        g = np.arange(6, dtype=np.float32).reshape(3, 2)
        assert filters.intercept_gradient([1, 2, 1], g).tolist() == g.tolist()
        filters.save(str(tmp_path / filters.name))
        assert glob.glob(str(tmp_path / filters.name / "*")) == []
        filters.restore(str(tmp_path / filters.name))  # a no-op


def test_table_behind_filter_counts_per_owner_shard(client: PsClient) -> None:
    filters = client.create_hash_filters(True, thresholds(3), capacity=1000,
                                         name_suffix="_gate")
    t = client.create_table(table_config(), hash_filters=filters)
    d = client.create_table(table_config(), hash_filters=filters)
    # Without dedup every occurrence of a new id is counted: old counts 0, 1, 2, 3, so
    # only the 4th occurrence passes and is applied: w = 0 - 1.0 * (-1) = 1.
    t.apply_gradients([40, 40, 40, 40], -np.ones((4, 1)), global_step=0)
    assert t.lookup([40]).tolist() == [[1.0]]
    # With dedup one filter call with count 4 returns the old count 0 < 3: filtered.
    d.apply_gradients([41, 41, 41, 41], -np.ones((4, 1)), global_step=0, enable_dedup=True)
    assert d.size() == 0


def test_hash_filters_save_restore(client: PsClient, tmp_path: Path) -> None:
    filters = client.create_hash_filters(True, thresholds(3), capacity=300, split_num=5,
                                         name_suffix="_files")
    g = np.ones((1, 1), dtype=np.float32)
    assert filters.intercept_gradient([8], g).tolist() == [[0]]  # old count 0
    assert filters.intercept_gradient([8], g).tolist() == [[0]]  # 1
    asset_dir = str(tmp_path / "assets")
    filters.save(asset_dir)
    for i in range(client.num_shards):
        # split_num 5 -> five split files per shard.
        assert len(glob.glob(f"{asset_dir}/hash_filter_{i}-*-of-00005")) == 5
    assert filters.intercept_gradient([8], g).tolist() == [[0]]  # 2
    assert filters.intercept_gradient([8], g).tolist() == [[1]]  # 3 >= 3: passes
    filters.restore(asset_dir)  # back to count 2
    assert filters.intercept_gradient([8], g).tolist() == [[0]]  # 2
    assert filters.intercept_gradient([8], g).tolist() == [[1]]  # 3
    with pytest.raises(PsError):
        filters.restore(str(tmp_path / "nothing_here"))


# ---------------------------------------------------------------- fused ops


def test_fused_lookup_docstring_example(client: PsClient) -> None:
    t0 = client.create_table(table_config((1,)))
    t1 = client.create_table(table_config((2,)))
    t0.assign([1, 2], [[1], [2]])
    t1.assign([3, 4], [[3, 3], [4, 4]])
    result = client.fused_lookup([t0, t1], [1, 3, 2, 4], [1, 1, 1, 1], 2)
    assert len(result) == 5
    emb, recv_splits, id_offsets, emb_offsets, indices = result
    assert emb.dtype == np.float32 and emb.tolist() == [1, 3, 3, 2, 4, 4]
    assert recv_splits.dtype == np.int32 and recv_splits.tolist() == [3, 3]
    assert id_offsets.dtype == np.int32 and id_offsets.tolist() == [0, 1, 2, 3, 4]
    assert emb_offsets.dtype == np.int32 and emb_offsets.tolist() == [0, 1, 3, 4, 6]
    assert indices.dtype == np.int64 and indices.tolist() == [1, 3, 2, 4]


def test_fused_lookup_uneven_blocks_and_missing_ids(client: PsClient) -> None:
    t0 = client.create_table(table_config((1,)))
    t1 = client.create_table(table_config((2,)))
    t0.assign([5, -6], [[5], [-6]])
    t1.assign([7], [[7, 70]])
    # N=2: blocks (s0,t0)=[5,-6,5], (s0,t1)=[], (s1,t0)=[99], (s1,t1)=[7, 8].
    emb, splits, ioff, eoff, indices = client.fused_lookup(
        [t0, t1], [5, -6, 5, 99, 7, 8], [3, 0, 1, 2], 2
    )
    assert emb.tolist() == [5, -6, 5, 0, 7, 70, 0, 0]
    assert splits.tolist() == [3, 5]  # 3*1 + 0*2, 1*1 + 2*2
    assert ioff.tolist() == [0, 3, 3, 4, 6]
    assert eoff.tolist() == [0, 3, 3, 4, 8]
    assert indices.dtype == np.int64 and indices.tolist() == [5, -6, 5, 99, 7, 8]
    with pytest.raises(ValueError, match="adds up to 6"):
        client.fused_lookup([t0, t1], [5, -6, 5], [3, 0, 1, 2], 2)


@pytest.fixture(scope="module")
def client2() -> Iterator[PsClient]:
    """A 2-shard cluster: each id's owner (floormod(id, 2)) differs from its logical
    fused shard block, so the client must route and put the answers back."""
    with local_cluster(2) as cluster, PsClient(cluster.addresses, timeout=30) as c:
        yield c


def test_fused_lookup_five_outputs_feed_fused_apply_gradient(client2: PsClient) -> None:
    # Monolith's usage: lookup, then apply the gradients with the lookup's outputs
    # (its indices and offsets). Tables dims 1 and 2, N = 2 logical shards; ids of
    # both parities and a negative one, so both real shards own ids of every block.
    t0 = client2.create_table(table_config((1,)))
    t1 = client2.create_table(table_config((2,)))
    t0.assign([1, 2, -3], [[1], [2], [-3]])
    t1.assign([4, 5], [[4, 40], [5, 50]])
    ids = np.array([1, -3, 4, 2, 5, 4, 7], dtype=np.int64)
    sizes = [2, 1, 1, 3]  # (s0,t0)=[1,-3] (s0,t1)=[4] (s1,t0)=[2] (s1,t1)=[5,4,7]
    result = client2.fused_lookup([t0, t1], ids, sizes, 2)
    assert len(result) == 5
    emb, recv_splits, id_offsets, emb_offsets, indices = result
    assert emb.dtype == np.float32
    assert emb.tolist() == [1, -3, 4, 40, 2, 5, 50, 4, 40, 0, 0]
    assert recv_splits.dtype == np.int32 and recv_splits.tolist() == [4, 7]
    assert id_offsets.dtype == np.int32 and id_offsets.tolist() == [0, 2, 3, 4, 7]
    assert emb_offsets.dtype == np.int32 and emb_offsets.tolist() == [0, 2, 4, 5, 11]
    assert indices.dtype == np.int64 and indices.shape == ids.shape
    assert np.array_equal(indices, ids)
    ids[0] = 100  # indices is not the caller's array
    assert indices[0] == 1
    ids[0] = 1
    # Ids given as a list of Python ints come back as int64 too.
    listed = client2.fused_lookup([t0, t1], ids.tolist(), sizes, 2)[4]
    assert listed.dtype == np.int64 and listed.tolist() == ids.tolist()

    # SGD, lr [1, 1], each id's gradient = its looked-up row, so one step takes a row
    # to zeros (7 is created at 0 - 0). 4 is in two blocks, (s0,t1) and (s1,t1): two
    # separate steps, [4, 40] -> [0, 0] -> [-4, -40].
    client2.fused_apply_gradient(
        [t0, t1], ids, indices, sizes, emb, id_offsets, emb_offsets, [1, 1], 0, 1, 2,
    )
    assert t0.lookup([1, 2, -3]).tolist() == [[0], [0], [0]]
    assert t1.lookup([4, 5, 7]).tolist() == [[-4, -40], [0, 0], [0, 0]]


def test_fused_apply_gradient_docstring_example(client: PsClient) -> None:
    t0 = client.create_table(table_config((1,)))
    t1 = client.create_table(table_config((2,)))
    t0.assign([1, 2], [[1], [2]])
    t1.assign([3, 4], [[3, 3], [4, 4]])
    # docs/semantics.md §7, SGD, lr [1, 1]; grads [1, 2, 2, 1, 2, 2] laid out as
    # id1 [1] | id3 [2, 2] | id2 [1] | id4 [2, 2]:
    # id1 1 - 1 = 0; id3 3 - 2 = 1; id2 2 - 1 = 1; id4 4 - 2 = 2.
    client.fused_apply_gradient(
        [t0, t1], [1, 3, 2, 4], None, [1, 1, 1, 1], [1, 2, 2, 1, 2, 2],
        [0, 1, 2, 3, 4], [0, 1, 3, 4, 6], [1, 1], 0, 0, 2,
    )
    assert t0.lookup([1, 2]).tolist() == [[0], [1]]
    assert t1.lookup([3, 4]).tolist() == [[1, 1], [2, 2]]


def test_fused_apply_gradient_accumulation_per_block(client: PsClient) -> None:
    # Adagrad (init 1, lr 0.1) on one id that appears twice in block (s0,t0) and once in
    # block (s1,t0), grads 1 each. With accumulation: block 0 is one step with g = 2
    # (norm 5), then block 2 one step with g = 1 (norm 6). Without: three steps (2, 3, 4).
    lr = f32(0.1)
    acc = f32(0) - lr / np.sqrt(f32(5)) * f32(2)
    acc = acc - lr / np.sqrt(f32(6)) * f32(1)
    sep = f32(0)
    for norm in (2, 3, 4):
        sep = sep - lr / np.sqrt(f32(norm)) * f32(1)
    for accumulate, want in ((True, acc), (False, sep)):
        t = client.create_table(table_config(optimizer="adagrad"), learning_rate_fns=(0.1,))
        client.fused_apply_gradient(
            [t], [9, 9, 9], None, [2, 1], [1, 1, 1], [0, 2, 3], [0, 2, 3], [0.1], 0, 0, 2,
            enable_grad_accumulation=accumulate,
        )
        np.testing.assert_allclose(t.lookup([9])[0, 0], want, rtol=1e-6)


def test_fused_apply_gradient_moves_every_table_clock(client: PsClient) -> None:
    # Monolith calls apply_gradients on every (shard, table) block, so with req_time 50
    # both tables' clocks reach 50 on every real shard, even where a table got no ids.
    t0 = client.create_table(table_config((1,)))
    t1 = client.create_table(table_config((2,)))
    client.fused_apply_gradient(
        [t0, t1], [4], None, [1, 0], [1], [0, 1, 1], [0, 1, 1], [1, 1], 50, 0, 1,
    )
    clocks = [
        [t.max_update_ts for t in info.tables if t.name in (t0.name, t1.name)]
        for info in client.shard_infos()
    ]
    assert clocks == [[50, 50]] * client.num_shards
    assert t0.lookup([4]).tolist() == [[-1.0]]  # 0 - 1.0 * 1


def test_fused_apply_gradient_validates(client: PsClient) -> None:
    t = client.create_table(table_config((2,)))
    with pytest.raises(ValueError, match="grad_offsets"):
        client.fused_apply_gradient([t], [1], None, [1], [1, 1], [0, 1], [0, 1], [1.0], 0, 0, 1)
    with pytest.raises(ValueError, match="learning_rate_tensors"):
        client.fused_apply_gradient([t], [1], None, [1], [1, 1], [0, 1], [0, 2], [1, 1], 0, 0, 1)
    with pytest.raises(ValueError, match="2 ids but fused_slot_size adds up to 1"):
        client.fused_apply_gradient([t], [1, 2], None, [1], [1, 1], [0, 1], [0, 2], [1], 0, 0, 1)
    assert t.size() == 0


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(client: PsClient, tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    assert client.restore_checkpoint(model_dir) is None
    t = client.create_table(table_config((2,)), name=f"ckpt_{client.num_shards}")
    t.assign([1, -1], [[1, 2], [3, 4]])
    prefix = client.save_checkpoint(model_dir, 10)
    assert prefix == os.path.join(model_dir, "model.ckpt-10")
    assert os.path.exists(os.path.join(model_dir, "checkpoint"))
    t.assign([1, 5], [[0, 0], [5, 5]])
    assert client.restore_checkpoint(model_dir) == prefix
    assert t.lookup([1, -1, 5]).tolist() == [[1, 2], [3, 4], [0, 0]]


def test_checkpoint_into_fresh_cluster_creates_tables(client: PsClient, tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    name = f"ckpt_fresh_{client.num_shards}"
    suffix = f"_fresh{client.num_shards}"
    gate = client.create_hash_filters(True, thresholds(1), capacity=1000, split_num=5,
                                      name_suffix=suffix)
    t = client.create_table(table_config((1,)), name=name, hash_filters=gate)
    ids = np.arange(-6, 6)
    for _ in range(2):  # the first occurrences are counted, the second admitted
        t.assign(ids, ids.reshape(-1, 1).astype(np.float32))
    prefix = client.save_checkpoint(model_dir, 3)
    with local_cluster(2) as fresh, PsClient(fresh.addresses) as other:
        # The sliding filter saved state per shard: refused into 2 shards unless its
        # reset is asked for.
        with pytest.raises(PsFailedPrecondition,
                           match=f"'MonolithHashFilter{suffix}' .*saved by {client.num_shards}"):
            other.restore_checkpoint(model_dir)
        assert other.tables() == []
        restored = other.restore_checkpoint(model_dir, reset_filters=True)
        assert restored == prefix
        assert f"MonolithHashFilter{suffix}" in getattr(restored, "reset_filters", ())
        assert name in other.tables()
        got = other.table(name).lookup(ids)
        assert got[:, 0].tolist() == ids.astype(float).tolist()


def test_live_table_missing_from_checkpoint_is_value_error(client: PsClient,
                                                           tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    client.save_checkpoint(model_dir, 1)
    late = client.create_table(table_config(), name=f"late_{client.num_shards}")
    late.assign([1], [[1.0]])
    with pytest.raises(ValueError, match=late.name):
        client.restore_checkpoint(model_dir)
    assert late.lookup([1]).tolist() == [[1.0]]


# ---------------------------------------------------------------- faults


def test_reads_wait_for_a_restarted_shard_and_writes_give_up() -> None:
    with local_cluster(2) as cluster, PsClient(cluster.addresses, timeout=10) as c:
        t = c.create_table(table_config(), name="faulty")
        t.assign([0, 1], [[1.0], [2.0]])
        cluster.kill(1)
        # A write to the dead shard is retried with its request tag (so a shard that had
        # applied it would answer from its ledger), then fails once the retries run out.
        with pytest.raises(PsUnavailable) as info:
            t.assign([1], [[3.0]])
        assert isinstance(info.value, ConnectionError)
        assert info.value.address == cluster.addresses[1]
        # A read started while shard 1 is down keeps retrying (with backoff) until the
        # shard is back on its port; the new shard 1 is empty. Its client counts the
        # failed attempts, so "still waiting" is seen after attempts really failed; its
        # deadline and attempts leave the restart all the time a slow machine needs.
        failed: queue.Queue[int] = queue.Queue()

        class CountedRetry(RetryPolicy):
            def delay(self, attempt: int) -> float:
                failed.put(attempt)
                return super().delay(attempt)

        # check_cluster=False: the reader is built while shard 1 is down (its cluster
        # check would wait at construction); the retries of its first read are tested.
        with PsClient(cluster.addresses, timeout=120, check_cluster=False,
                      retry=CountedRetry(max_attempts=1000, max_backoff=0.5)) as reader, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(reader.shard_infos)
            assert failed.get(timeout=60) == 1
            assert failed.get(timeout=60) == 2  # a retry failed too: it keeps trying
            assert not pending.done()
            cluster.restart(1)
            assert [len(i.tables) for i in pending.result(timeout=120)] == [1, 0]
        assert t.lookup([0]).tolist() == [[1.0]]
        with pytest.raises(KeyError, match="faulty"):
            t.lookup([1])


def test_local_cluster_reports_a_shard_that_cannot_start() -> None:
    with pytest.raises(ClusterStartError, match="no_such_flag"), \
            local_cluster(1, no_such_flag=1, start_timeout=20):
        pass  # pragma: no cover - never reached
