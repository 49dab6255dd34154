"""Monolith's ``hash_table_ops_test.py`` and ``hash_filter_ops_test.py`` on the drop-in
module :mod:`ps_client.monolith`, against real shard servers.

Each test is named after its Monolith test and keeps its calls, inputs and expected
values; what changed is only what a graph needed: ``sess.run(x)`` is gone (calls run
at once), ``tf.constant`` / ``tf.ones`` became lists and numpy, ``tf.gradients`` of
``loss = -embeddings`` (or of the filter's identity output) became the constant
gradient it evaluates to, ``TEST_TMPDIR`` became pytest's ``tmp_path``, and the
import is ``from ps_client.monolith import …``. Re-running a graph ("each
``sess.run`` evaluates the gradient again") is a repeated call. The table tests run
on a 1-shard and a 2-shard cluster (same answers: routing is invisible); the filter
tests on one shard, because they check a single filter's splits, as Monolith's
single-process filter is.

Two changes follow the Monolith snapshot our semantics are written from
(``docs/semantics.md``, commit ``135c491``): ``fused_lookup`` returns five values
(``indices`` last) and ``fused_apply_gradient`` takes ``indices`` third. And
``intercept_gradient``'s third argument is the gradient reaching the embeddings
(forward and registered backward pass in one call).

Not ported (TensorFlow-graph-only):

* ``test_meta_graph_export``: exports a TF meta graph; there is no graph.
* The module helper ``test_hash_table`` round-trips a table through
  ``to_proto`` / ``from_proto`` (meta-graph serialization); here it is
  ``hash_table_ops.test_hash_table`` directly.
* ``test_save_restore_hook``, ``test_restore_after_save``,
  ``test_save_restore_hook_with_feature_eviction_*`` (four tests),
  ``test_delete_save_path``, ``test_save_restore_with_hash_table_clear_logic`` and
  ``test_hash_table_and_hash_filter_save_restore_hook_together``: they drive TF
  ``CheckpointSaverHook`` / ``Saver`` / restorer listeners, which the drop-in module does
  not provide (checkpoints are ``PsClient.save_checkpoint`` / ``restore_checkpoint``;
  docs/monolith-migration.md lists where each of these tests went).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import ps_client.monolith
from protos import embedding_hash_table_pb2
from ps_client import PolynomialDecay, PsClient
from ps_client.monolith import entry, hash_filter_ops
from ps_client.monolith import hash_table_ops as ops
from ps_server.checkpoint.tfrecord import read_records

from .conftest import start_inprocess_server


@contextlib.contextmanager
def _cluster(num_shards: int) -> Iterator[PsClient]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(start_inprocess_server(shard_index=i, num_shards=num_shards))
            for i in range(num_shards)
        ]
        client = stack.enter_context(PsClient([s.address for s in servers], timeout=30))
        stack.enter_context(ps_client.monolith.use_client(client))
        yield client


@pytest.fixture(params=[1, 2], ids=["1shard", "2shards"])
def cluster(request: pytest.FixtureRequest) -> Iterator[PsClient]:
    """A fresh cluster whose client is the drop-in ops' default."""
    with _cluster(request.param) as client:
        yield client


@pytest.fixture
def one_shard() -> Iterator[PsClient]:
    with _cluster(1) as client:
        yield client


def _get_id_tensor(x: object) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def test_hash_table_with_hash_filters(
    dim_size: int, hash_filters: list[hash_filter_ops.HashFilter], name_suffix: str = "0",
    learning_rate: float = 1.0,
) -> ops.HashTable:
    """Monolith's module helper: an SGD table of ``dim_size`` behind ``hash_filters[0]``."""
    table_config = embedding_hash_table_pb2.EmbeddingHashTableConfig()
    table_config.cuckoo.SetInParent()
    segment = table_config.entry_config.segments.add()
    segment.dim_size = dim_size
    segment.opt_config.sgd.SetInParent()
    segment.init_config.zeros.SetInParent()
    config = entry.HashTableConfigInstance(table_config, [learning_rate])
    return ops.hash_table_from_config(config=config, hash_filter=hash_filters[0],
                                      name_suffix=name_suffix)


test_hash_table_with_hash_filters.__test__ = False  # type: ignore[attr-defined]
test_hash_table = ops.test_hash_table


# ------------------------------------------------------------ hash_table_ops_test.py


def test_basic(cluster: PsClient) -> None:
    dim_size = 1
    hash_table = ops.vocab_hash_table(3, dim_size)
    hash_table = hash_table.assign_add(_get_id_tensor([0, 1]), np.ones([2, dim_size]))
    embeddings = hash_table.lookup(_get_id_tensor([0, 1, 2]))
    size = hash_table.size()
    np.testing.assert_array_equal(embeddings, [[1], [1], [0]])
    assert size == 2
    assert hash_table.name != "MonolithHashTable"


def test_assign(cluster: PsClient) -> None:
    dim_size = 1
    hash_table = ops.vocab_hash_table(3, dim_size)
    hash_table = hash_table.assign(_get_id_tensor([0, 1]), np.ones([2, dim_size]))
    embeddings1 = hash_table.lookup(_get_id_tensor([0, 1, 2]))
    hash_table = hash_table.assign(_get_id_tensor([1]),
                                   np.array([[5 for _ in range(dim_size)]], dtype=np.float32))
    embeddings2 = hash_table.lookup(_get_id_tensor([0, 1, 2]))
    np.testing.assert_array_equal(embeddings1, [[1], [1], [0]])
    np.testing.assert_array_equal(embeddings2, [[1], [5], [0]])
    assert hash_table.name != "MonolithHashTable"


def test_lookup_entry(cluster: PsClient) -> None:
    table = test_hash_table(1)
    updated_table = table.assign(_get_id_tensor([0, 1, 2]), [[0.1], [0.2], [0.3]])
    updated_table.as_op()
    entry_strs = table.lookup_entry(_get_id_tensor([0, 1, 2, 3]))
    nums = []
    for i in range(3):
        dump = embedding_hash_table_pb2.EntryDump()
        dump.ParseFromString(entry_strs[i])
        nums.append(dump.num)
    np.testing.assert_allclose(nums, [[0.1], [0.2], [0.3]], rtol=1e-6)
    assert entry_strs[3] == b""


def test_save_as_tensor(cluster: PsClient) -> None:
    table = test_hash_table(1)
    updated_table = table.assign(_get_id_tensor([0, 1, 2]), [[0.1], [0.2], [0.3]])
    updated_table.as_op()
    _, dump_str = table.save_as_tensor(0, 1, 1000, 0)
    for i in range(len(dump_str)):
        dump = embedding_hash_table_pb2.EntryDump()
        dump.ParseFromString(dump_str[i])
    assert len(dump_str) == 3  # ours: every entry of the one part came back


def testNameConflict(cluster: PsClient) -> None:
    test_hash_table(1, name_suffix="same_suffix")
    with pytest.raises(ValueError):
        test_hash_table(1, name_suffix="same_suffix")


def test_gradients(cluster: PsClient) -> None:
    hash_table = test_hash_table(1, learning_rate=0.1)
    id_tensor = _get_id_tensor([0, 0, 1])
    embeddings = hash_table.lookup(id_tensor)
    grads = -np.ones_like(embeddings)  # d(-embeddings)/d(embeddings)
    global_step = _get_id_tensor(0)
    hash_table = hash_table.apply_gradients(id_tensor, grads, global_step=global_step)
    new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
    np.testing.assert_allclose(new_embeddings, [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_learning_rate_fn(cluster: PsClient) -> None:
    hash_table = test_hash_table(1, learning_rate=lambda: 0.1)
    id_tensor = _get_id_tensor([0, 0, 1])
    embeddings = hash_table.lookup(id_tensor)
    grads = -np.ones_like(embeddings)
    global_step = _get_id_tensor(0)
    hash_table = hash_table.apply_gradients(id_tensor, grads, global_step=global_step)
    new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
    np.testing.assert_allclose(new_embeddings, [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_learning_rate_decay(cluster: PsClient) -> None:
    global_step = 0
    global_step += 1  # Monolith: assign_add(global_step, 1)
    hash_table = test_hash_table(
        1,
        learning_rate=PolynomialDecay(initial_learning_rate=0.01, decay_steps=10,
                                      end_learning_rate=0.11))
    id_tensor = _get_id_tensor([0, 0, 1])
    embeddings = hash_table.lookup(id_tensor)
    grads = -np.ones_like(embeddings)
    hash_table = hash_table.apply_gradients(id_tensor, grads, global_step=global_step)
    new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
    np.testing.assert_allclose(new_embeddings, [[0.04], [0.02]], rtol=1e-5)


def test_gradients_with_dedup(cluster: PsClient) -> None:
    vec_dim = 10
    hash_table = test_hash_table(vec_dim, learning_rate=0.1)
    id_tensor = _get_id_tensor([0, 1, 0, 1, 0])
    embeddings = hash_table.lookup(id_tensor)
    grads = -np.ones_like(embeddings)
    global_step = _get_id_tensor(0)
    hash_table = hash_table.apply_gradients(id_tensor, grads, global_step=global_step,
                                            enable_dedup=True)
    new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
    expected_output = [[0.3 for _ in range(vec_dim)], [0.2 for _ in range(vec_dim)]]
    np.testing.assert_allclose(new_embeddings, expected_output, rtol=1e-6)


def test_gradients_with_different_ids(cluster: PsClient) -> None:
    hash_table = test_hash_table(1, learning_rate=0.1)
    embeddings = hash_table.lookup(_get_id_tensor([0, 0, 1]))
    grads = -np.ones_like(embeddings)
    global_step = _get_id_tensor(0)
    hash_table = hash_table.apply_gradients(_get_id_tensor([1, 0, 1]), grads,
                                            global_step=global_step)
    new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
    np.testing.assert_allclose(new_embeddings, [[0.1], [0.2]], rtol=1e-6)


def test_gradients_with_hash_filter(cluster: PsClient) -> None:
    hash_table = test_hash_table(1, enable_hash_filter=True, learning_rate=0.1,
                                 occurrence_threshold=3)
    id_tensor = _get_id_tensor([0, 0, 1])
    embeddings = hash_table.lookup(id_tensor)
    grads = -np.ones_like(embeddings)
    global_step = _get_id_tensor(0)
    expected_results = [
        # id 0 counts 1, 2 and id 1 counts 1: all <= 3, no update.
        [[0], [0]],
        # id 0 counts 3, 4 (the second updates); id 1 counts 2.
        [[0.1], [0]],
        # id 0 counts 5, 6 (both update); id 1 counts 3.
        [[0.3], [0.0]],
        # id 0 counts 7, 8 (both update); id 1 counts 4 (updates).
        [[0.5], [0.1]],
    ]
    for i in range(0, 4):
        # Each of Monolith's sess.run of the lookup ran apply_gradients once first.
        hash_table = hash_table.apply_gradients(id_tensor, grads, global_step=global_step)
        new_embeddings = hash_table.lookup(_get_id_tensor([0, 1]))
        np.testing.assert_allclose(new_embeddings, expected_results[i], rtol=1e-6)


def test_save_restore(cluster: PsClient, tmp_path: Path) -> None:
    hash_table = test_hash_table(1)
    hash_table = hash_table.assign_add(_get_id_tensor([-1, 1]),
                                       np.array([[1], [2]], dtype=np.float32))
    base_name = os.path.join(tmp_path, "test_save_restore", "table")
    hash_table = hash_table.save(base_name)
    hash_table.as_op()

    hash_table2 = test_hash_table(1, False)
    hash_table2 = hash_table2.restore(base_name)
    embedding = hash_table2.lookup(_get_id_tensor([-1, 1]))
    np.testing.assert_array_equal(embedding, [[1], [2]])


def test_restore_from_another_table(cluster: PsClient, tmp_path: Path) -> None:
    hash_table1 = test_hash_table(1)
    hash_table1 = hash_table1.assign(_get_id_tensor([1]), np.array([[1]], dtype=np.float32))
    base_name = os.path.join(tmp_path, "test_restore_from_another_table", "table")
    hash_table1 = hash_table1.save(base_name)
    hash_table1.as_op()
    hash_table2 = test_hash_table(1, extra_restore_names=[hash_table1.name])
    hash_table2 = hash_table2.restore(base_name)
    embedding = hash_table2.lookup(_get_id_tensor([1]))
    np.testing.assert_array_equal(embedding, [[1]])


def test_save_restore_with_feature_eviction_assign_add(
    cluster: PsClient, tmp_path: Path
) -> None:
    expire_time = 1
    hash_table = test_hash_table(dim_size=1, expire_time=expire_time)
    max_ts = 10000000
    expire_time_in_sec = expire_time * 24 * 3600
    evict_ts = max_ts - expire_time_in_sec - 1
    hash_table = hash_table.assign_add(_get_id_tensor([1]), np.array([[1]], dtype=np.float32),
                                       np.int64(evict_ts))
    keep_ts = max_ts - expire_time_in_sec + 1
    hash_table = hash_table.assign_add(_get_id_tensor([2]), np.array([[2]], dtype=np.float32),
                                       np.int64(keep_ts))
    hash_table = hash_table.assign_add(_get_id_tensor([3]), np.array([[3]], dtype=np.float32),
                                       np.int64(max_ts))
    base_name = os.path.join(
        tmp_path, "test_save_restore_with_feature_eviction_assign_add", "table")
    hash_table = hash_table.save(base_name)
    hash_table.as_op()

    hash_table2 = test_hash_table(1, False)
    hash_table2 = hash_table2.restore(base_name)
    embedding = hash_table2.lookup(_get_id_tensor([1, 2, 3]))
    # With 2 shards the clock is per shard (docs/api.md): ids 1 and 3 share shard 1,
    # whose clock is max_ts, and id 2 is shard 0's newest, so the answer is the same.
    np.testing.assert_array_equal(embedding, [[0], [2], [3]])


def test_save_restore_with_feature_eviction_apply_gradients(
    cluster: PsClient, tmp_path: Path
) -> None:
    expire_time = 1
    hash_table = test_hash_table(dim_size=1, expire_time=expire_time)
    max_ts = 10000000
    expire_time_in_sec = expire_time * 24 * 3600
    evict_ts = max_ts - expire_time_in_sec - 1
    global_step = _get_id_tensor(0)
    hash_table = hash_table.apply_gradients(_get_id_tensor([1]),
                                            np.array([[1]], dtype=np.float32), global_step,
                                            req_time=np.int64(evict_ts))
    keep_ts = max_ts - expire_time_in_sec + 1
    hash_table = hash_table.apply_gradients(_get_id_tensor([2]),
                                            np.array([[2]], dtype=np.float32), global_step,
                                            req_time=np.int64(keep_ts))
    hash_table = hash_table.apply_gradients(_get_id_tensor([3]),
                                            np.array([[3]], dtype=np.float32), global_step,
                                            req_time=np.int64(max_ts))
    base_name = os.path.join(
        tmp_path, "test_save_restore_with_feature_eviction_apply_gradients", "table")
    hash_table = hash_table.save(base_name)
    hash_table.as_op()

    hash_table2 = test_hash_table(1, False)
    hash_table2 = hash_table2.restore(base_name)
    embedding = hash_table2.lookup(_get_id_tensor([1, 2, 3]))
    np.testing.assert_array_equal(embedding, [[0], [-2], [-3]])


def test_entry_ttl_zero(cluster: PsClient, tmp_path: Path) -> None:
    basename = os.path.join(tmp_path, "test_entry_ttl", "table")
    hash_table = test_hash_table(1, expire_time=0)
    hash_table = hash_table.assign_add(_get_id_tensor([-1, 1]),
                                       np.array([[1], [2]], dtype=np.float32))
    hash_table = hash_table.save(basename)
    hash_table.as_op()
    hash_table2 = test_hash_table(1)
    hash_table2 = hash_table2.restore(basename)
    embedding = hash_table2.lookup(_get_id_tensor([-1, 1]))
    np.testing.assert_array_equal(embedding, [[0], [0]])


def test_entry_ttl_not_zero(cluster: PsClient, tmp_path: Path) -> None:
    basename = os.path.join(tmp_path, "test_entry_ttl_not_zero", "table")
    hash_table = test_hash_table(1, expire_time=60 * 60)
    hash_table = hash_table.assign_add(_get_id_tensor([-1, 1]),
                                       np.array([[1], [2]], dtype=np.float32))
    hash_table = hash_table.save(basename)
    hash_table.as_op()
    hash_table2 = test_hash_table(1)
    hash_table2 = hash_table2.restore(basename)
    embedding = hash_table2.lookup(_get_id_tensor([-1, 1]))
    np.testing.assert_array_equal(embedding, [[1], [2]])


def test_entry_ttl_by_slots(cluster: PsClient, tmp_path: Path) -> None:
    basename = os.path.join(tmp_path, "test_entry_ttl_by_slots", "table")
    table_config = embedding_hash_table_pb2.EmbeddingHashTableConfig()
    table_config.cuckoo.SetInParent()
    segment = table_config.entry_config.segments.add()
    segment.dim_size = 1
    segment.opt_config.sgd.SetInParent()
    segment.init_config.zeros.SetInParent()
    table_config.slot_expire_time_config.default_expire_time = 60 * 60
    slot_expire_time_1 = table_config.slot_expire_time_config.slot_expire_times.add()
    slot_expire_time_1.slot = 1
    slot_expire_time_1.expire_time = 0
    slot_expire_time_2 = table_config.slot_expire_time_config.slot_expire_times.add()
    slot_expire_time_2.slot = 2
    slot_expire_time_2.expire_time = 1
    hash_filters = hash_filter_ops.create_hash_filters(0, False)
    config = entry.HashTableConfigInstance(table_config, [1.0])

    id_1 = 1 << 48
    id_2 = 2 << 48
    hash_table = ops.hash_table_from_config(config, hash_filter=hash_filters[0],
                                            name_suffix="ttl_by_slots")
    hash_table = hash_table.assign_add(_get_id_tensor([id_1, id_2]),
                                       np.array([[1], [2]], dtype=np.float32), np.int64(100))
    hash_table = hash_table.save(basename)
    hash_table.as_op()

    basename_new = os.path.join(tmp_path, "test_entry_ttl_by_slots", "table_new")
    hash_table2 = ops.hash_table_from_config(config, hash_filter=hash_filters[0],
                                             name_suffix="ttl_by_slots_1")
    hash_table2 = hash_table2.restore(basename)
    embedding_2 = hash_table2.lookup(_get_id_tensor([id_1, id_2]))
    hash_table2 = hash_table2.save(basename_new)
    hash_table2.as_op()
    np.testing.assert_array_equal(embedding_2, [[0], [2]])

    hash_table3 = test_hash_table(1)
    hash_table3 = hash_table3.restore(basename_new)
    embedding_3 = hash_table3.lookup(_get_id_tensor([id_1, id_2]))
    np.testing.assert_array_equal(embedding_3, [[0], [2]])


def test_restore_not_found(cluster: PsClient, tmp_path: Path) -> None:
    non_existent_files = os.path.join(tmp_path, "test_restore_not_found", "table")
    hash_table2 = test_hash_table(1)
    with pytest.raises(Exception):  # noqa: B017 - Monolith's assertion
        hash_table2.restore(non_existent_files)


def test_two_hash_table_whose_name_is_prefix(cluster: PsClient, tmp_path: Path) -> None:
    dim_size = 1
    hash_table1 = test_hash_table(dim_size)
    hash_table2 = test_hash_table(dim_size)
    basename = os.path.join(tmp_path, "test_two_hash_table_whose_name_is_prefix")
    hash_table1 = hash_table1.save(basename + "/table1")
    hash_table2 = hash_table2.save(basename + "/table10")
    hash_table1 = hash_table1.restore(basename + "/table1")
    hash_table2 = hash_table2.restore(basename + "/table10")


def test_fused_lookup(cluster: PsClient) -> None:
    hash_tables = []
    dim_sizes = [1, 1, 2]
    for x in range(len(dim_sizes)):
        dim_size = dim_sizes[x]
        hash_table = ops.vocab_hash_table(9, dim_size)
        hash_table = hash_table.assign(
            _get_id_tensor([0 + 3 * x, 1 + 3 * x]),
            np.ones([2, dim_size]) if x % 2 == 0 else np.zeros([2, dim_size]))
        hash_tables.append(hash_table)
    embeddings, recv_splits, id_offsets, emb_offsets, _ = ops.fused_lookup(
        [hash_table.table for hash_table in hash_tables],
        _get_id_tensor([0, 4, 6, 1, 3, 7]),
        fused_slot_size=np.array([1, 1, 1, 1, 1, 1]),
        num_of_shards=2)
    np.testing.assert_array_equal(embeddings, [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(recv_splits, [4, 4])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 2, 4, 5, 6, 8])


def test_fused_optimize(cluster: PsClient) -> None:
    hash_tables = []
    dim_sizes = [1, 2]
    fused_slot_size = np.array([1, 1, 1, 1])
    ids = _get_id_tensor([0, 4, 1, 3])
    for x in range(len(dim_sizes)):
        dim_size = dim_sizes[x]
        hash_table = ops.vocab_hash_table(6, dim_size)
        hash_table = hash_table.assign(
            _get_id_tensor([0 + 3 * x, 1 + 3 * x]),
            np.ones([2, dim_size]) if x == 0 else np.zeros([2, dim_size]))
        hash_tables.append(hash_table)
    hash_table_resource = [hash_table.table for hash_table in hash_tables]
    # embeddings=[1, 0, 0, 1, 0, 0]
    embeddings, recv_splits, id_offsets, emb_offsets, indices = ops.fused_lookup(
        hash_table_resource, ids, fused_slot_size, num_of_shards=2)
    ops.fused_apply_gradient(hash_table_resource, ids, indices, fused_slot_size,
                             np.array([-1, -2, -2, -1, -2, -2], dtype=np.float32),
                             id_offsets, emb_offsets,
                             np.array([0.1, 0.1], dtype=np.float32),
                             np.int64(0), np.int64(0), num_of_shards=2)
    embeddings, recv_splits, id_offsets, emb_offsets, _ = ops.fused_lookup(
        hash_table_resource, ids, fused_slot_size, num_of_shards=2)
    np.testing.assert_allclose(embeddings, [1.1, 0.2, 0.2, 1.1, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(recv_splits, [3, 3])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 3, 4, 6])


def test_batch_softmax_optimizer(cluster: PsClient) -> None:
    table_config = embedding_hash_table_pb2.EmbeddingHashTableConfig()
    table_config.cuckoo.SetInParent()
    segment = table_config.entry_config.segments.add()
    segment.dim_size = 1
    segment.opt_config.batch_softmax.SetInParent()
    segment.init_config.zeros.SetInParent()
    segment.comp_config.fp32.SetInParent()
    learning_rate = 0.1
    config = entry.HashTableConfigInstance(table_config, [learning_rate])
    hash_table = ops.hash_table_from_config(config=config, name_suffix="batch_softmax")
    for global_step in range(1000):
        fids = []
        if global_step % 5 == 0:
            fids.append(0)
        if global_step % 10 == 0:
            fids.append(1)
        if len(fids) == 0:
            continue
        id_tensor = _get_id_tensor(fids)
        hash_table = hash_table.apply_gradients(
            id_tensor, np.array([0.1 for _ in fids], dtype=np.float32),
            global_step=_get_id_tensor(global_step))
    item_step_interval = hash_table.lookup(_get_id_tensor([0, 1]))
    item_step_interval = np.maximum(item_step_interval, np.float32(1.0))
    np.testing.assert_allclose([1 / val for val in item_step_interval], [[0.2], [0.1]],
                               atol=0.01)


def test_extract_fid() -> None:
    entry_dump = embedding_hash_table_pb2.EntryDump()
    entry_dump.id = 1 << 48
    slot_tensor = ops.extract_slot_from_entry([entry_dump.SerializeToString()])
    np.testing.assert_array_equal(slot_tensor, [1])


# ----------------------------------------------------------- hash_filter_ops_test.py


def get_config_str(occurrence_threshold: int = 0) -> bytes:
    config = embedding_hash_table_pb2.SlotOccurrenceThresholdConfig()
    config.default_occurrence_threshold = occurrence_threshold
    return config.SerializeToString()


def _count_files(basename: str) -> int:
    return len(glob.glob(basename + "*"))


def _split_meta(ckpt_file: str) -> embedding_hash_table_pb2.HashFilterSplitMetaDump | None:
    for record in read_records(ckpt_file):
        return embedding_hash_table_pb2.HashFilterSplitMetaDump.FromString(record)
    return None


def test_hash_filter_basic(one_shard: PsClient) -> None:
    config = get_config_str(3)
    hash_filter = hash_filter_ops.create_hash_filter(100, 7, config)
    ids = np.array([1, 3 << 17, 1], dtype=np.int64)
    grad = np.ones([3, 2], dtype=np.float32)  # d(sum(output))/d(embedding)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[0, 0], [0, 0], [0, 0]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[0, 0], [0, 0], [1, 1]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [0, 0], [1, 1]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])


def test_hash_filter_save_restore(one_shard: PsClient, tmp_path: Path) -> None:
    config = get_config_str(3)
    hash_filter = hash_filter_ops.create_hash_filter(100, 7, config)
    ids = np.array([1, 3 << 17, 1], dtype=np.int64)
    grad = np.ones([3, 2], dtype=np.float32)
    base_folder = os.path.join(tmp_path, "test_hash_filter_save_restore")

    ckpt_basename_0 = os.path.join(base_folder, "hash_filter_test_0")
    hash_filter_ops.save_hash_filter(hash_filter, ckpt_basename_0, True)
    assert _count_files(ckpt_basename_0) == 7
    hash_filter_ops.restore_hash_filter(hash_filter, ckpt_basename_0, True)

    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[0, 0], [0, 0], [0, 0]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[0, 0], [0, 0], [1, 1]])

    ckpt_basename_1 = os.path.join(base_folder, "hash_filter_test_1")
    hash_filter_ops.save_hash_filter(hash_filter, ckpt_basename_1, True)
    assert _count_files(ckpt_basename_1) == 7
    hash_filter_ops.restore_hash_filter(hash_filter, ckpt_basename_1, True)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [0, 0], [1, 1]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])


def test_hash_filter_save_restore_across_multiple_filters(
    one_shard: PsClient, tmp_path: Path
) -> None:
    config = get_config_str(2)
    # Each split holds up to 2 elements.
    hash_filter = hash_filter_ops.create_hash_filter(300, 100, config)
    ids = np.array([1, 1 << 17, 2 << 17, 1], dtype=np.int64)
    grad = np.ones([4, 2], dtype=np.float32)
    base_folder = os.path.join(tmp_path, "test_hash_filter_save_restore_across_multiple_filters")

    ckpt_basename_0 = os.path.join(base_folder, "hash_filter_test_0")
    hash_filter_ops.save_hash_filter(hash_filter, ckpt_basename_0, True)
    ckpt_0_files = sorted(glob.glob(ckpt_basename_0 + "*"))
    assert len(ckpt_0_files) == 100
    for file in ckpt_0_files:
        dump = _split_meta(file)
        assert dump is not None
        assert dump.total_size == 3
        assert dump.num_elements == 0
        assert dump.sliding_hash_filter_meta.split_num == 100
        assert dump.sliding_hash_filter_meta.head == 0
        assert dump.sliding_hash_filter_meta.head_increment == 0

    hash_filter_ops.restore_hash_filter(hash_filter, ckpt_basename_0, True)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[0, 0], [0, 0], [0, 0], [0, 0]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [0, 0], [0, 0], [1, 1]])

    ckpt_basename_1 = os.path.join(base_folder, "hash_filter_test_1")
    hash_filter_ops.save_hash_filter(hash_filter, ckpt_basename_1, True)
    ckpt_1_files = sorted(glob.glob(ckpt_basename_1 + "*"))
    assert len(ckpt_1_files) == 100
    for file in ckpt_1_files[:4]:
        dump = _split_meta(file)
        assert dump is not None
        assert dump.total_size == 3
        assert dump.num_elements == 2
        assert dump.sliding_hash_filter_meta.split_num == 100
        assert dump.sliding_hash_filter_meta.head == 4
        assert dump.sliding_hash_filter_meta.head_increment == 4
    for file in ckpt_1_files[4:]:
        dump = _split_meta(file)
        assert dump is not None
        assert dump.total_size == 3
        assert dump.num_elements == 0
        assert dump.sliding_hash_filter_meta.split_num == 100
        assert dump.sliding_hash_filter_meta.head == 4
        assert dump.sliding_hash_filter_meta.head_increment == 4

    hash_filter_ops.restore_hash_filter(hash_filter, ckpt_basename_1, True)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1], [1, 1]])
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1], [1, 1]])


def test_dummy_hash_filter_basic(one_shard: PsClient) -> None:
    hash_filter = hash_filter_ops.create_dummy_hash_filter()
    ids = np.array([1, 3 << 17, 1], dtype=np.int64)
    grad = np.ones([3, 2], dtype=np.float32)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])


def test_dummy_hash_filter_save_restore(
    one_shard: PsClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # Monolith's relative basename, in a scratch directory
    basename = "dummy_hash_filter"
    hash_filter = hash_filter_ops.create_dummy_hash_filter()
    ids = np.array([1, 3 << 17, 1], dtype=np.int64)
    grad = np.ones([3, 2], dtype=np.float32)
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])
    hash_filter_ops.save_hash_filter(hash_filter, basename, False)
    assert _count_files(basename) == 0
    grad_value = hash_filter_ops.intercept_gradient(hash_filter, ids, grad)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])
    hash_filter_ops.restore_hash_filter(hash_filter, basename, False)
    hash_filter_ops.restore_hash_filter(hash_filter, basename, False)
    np.testing.assert_array_equal(grad_value, [[1, 1], [1, 1], [1, 1]])
    assert _count_files(basename) == 0


def test_hash_filter_restore_not_found(one_shard: PsClient, tmp_path: Path) -> None:
    """Monolith's ``HashFilterOpsTest.test_restore_not_found``."""
    non_existent_files = os.path.join(tmp_path, "test_restore_not_found", "hash_filters")
    config = get_config_str(2)
    hash_filter = hash_filter_ops.create_hash_filter(300, 7, config)
    with pytest.raises(Exception):  # noqa: B017 - Monolith's assertion
        hash_filter_ops.restore_hash_filter(hash_filter, non_existent_files, True)


# ------------------------------------------------------------------ the drop-in itself


def test_no_client_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="connect"):
        ops.vocab_hash_table(3, 1)


def test_connect_sets_the_default_and_disconnect_closes_it() -> None:
    with start_inprocess_server() as srv:
        client = ps_client.monolith.connect([srv.address], timeout=30)
        try:
            assert ps_client.monolith.get_client() is client
            table = ops.vocab_hash_table(3, 2).assign([7], [[1, 2]])
            np.testing.assert_array_equal(table.lookup([7], use_multi_threads=True,
                                                       enable_dedup=True), [[1, 2]])
        finally:
            ps_client.monolith.disconnect()
        with pytest.raises(RuntimeError):
            ps_client.monolith.get_client()


def test_thread_arguments_are_accepted_and_change_nothing(
    cluster: PsClient, tmp_path: Path
) -> None:
    t = ops.test_hash_table(1, learning_rate=0.1)
    t.apply_gradients([0, 0, 1], [[-1], [-1], [-1]], 0, use_multi_threads=True)
    t.save(str(tmp_path / "t"), random_sleep_ms=50).restore(str(tmp_path / "t"))
    np.testing.assert_allclose(t.lookup([0, 1], use_multi_threads=True), [[0.2], [0.1]],
                               rtol=1e-6)


def test_create_hash_filters_per_ps_handles(cluster: PsClient, tmp_path: Path) -> None:
    n = cluster.num_shards
    with pytest.raises(ValueError, match="ps_num"):
        hash_filter_ops.create_hash_filters(n + 1, True, get_config_str(1))
    filters = hash_filter_ops.create_hash_filters(n, True, get_config_str(1),
                                                  filter_capacity=300, filter_split_num=5)
    assert [f.shard for f in filters] == list(range(n))
    table = test_hash_table_with_hash_filters(1, filters)
    table.assign_add([0, 1, 0, 1], [[1], [1], [1], [1]])  # count 1 then 2: second admitted
    np.testing.assert_array_equal(table.lookup([0, 1]), [[1], [1]])
    # Handle i saves and restores PS i's filter under Monolith's own file names.
    for i, f in enumerate(filters):
        hash_filter_ops.save_hash_filter(f, str(tmp_path / f"hash_filter_{i}"), True)
        assert _count_files(str(tmp_path / f"hash_filter_{i}-")) == 5
        hash_filter_ops.restore_hash_filter(f, str(tmp_path / f"hash_filter_{i}"), True)
    # One handle on every shard: <basename>_<i> per shard when there are several.
    whole = hash_filter_ops.create_hash_filters(0, True, get_config_str(1),
                                                filter_capacity=300, filter_split_num=5)[0]
    hash_filter_ops.save_hash_filter(whole, str(tmp_path / "all"), True)
    expected = ["all-"] if n == 1 else [f"all_{i}-" for i in range(n)]
    for prefix in expected:
        assert _count_files(str(tmp_path / prefix)) == 5
    hash_filter_ops.restore_hash_filter(whole, str(tmp_path / "all"), True)


def test_disabled_filters_ignore_filter_type(one_shard: PsClient) -> None:
    (dummy,) = hash_filter_ops.create_hash_filters(0, False, filter_type="no_such_type")
    assert not dummy.enabled
    with pytest.raises(ValueError, match="filter type"):
        hash_filter_ops.create_hash_filters(0, True, filter_type="no_such_type")


def test_unsupported_arguments_are_refused(one_shard: PsClient) -> None:
    with pytest.raises(NotImplementedError):
        ops.test_hash_table(1, sync_client=object())
    with pytest.raises(NotImplementedError):
        ops.test_hash_table(1, use_gpu=True)


@pytest.mark.parametrize("quirks", [False, True])
def test_hash_table_from_config_takes_monolith_quirks(one_shard: PsClient, quirks: bool
                                                      ) -> None:
    """Not a port: the drop-in's door to Monolith's optimizer bugs. Group AdaGrad with zero
    weights and a zero gradient computes 0/0: Monolith stores NaN, we store 0 unless the
    table is created with monolith_quirks."""
    config = embedding_hash_table_pb2.EmbeddingHashTableConfig()
    seg = config.entry_config.segments.add()
    seg.dim_size = 2
    seg.opt_config.group_adagrad.SetInParent()
    seg.init_config.zeros.SetInParent()
    config.cuckoo.SetInParent()
    table = ops.hash_table_from_config(config, name_suffix=f"quirks_{quirks}",
                                       monolith_quirks=quirks)
    table.apply_gradients(_get_id_tensor([3]), np.zeros((1, 2), np.float32), global_step=1)
    got = table.lookup(_get_id_tensor([3]))
    assert np.isnan(got).all() if quirks else got.tolist() == [[0.0, 0.0]]
