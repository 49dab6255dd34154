"""Every ParameterServer RPC through a real server and the raw generated stub.

Expected values are worked out by hand from the formulas of
docs/semantics.md (§3.3, §4.2, §5.1, §7) in float32; tensors are built and read here with
numpy directly (not with ps_server.codec) so the wire format itself is checked.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import ps_server
from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.engine import configs
from tests.integration.conftest import RunningServer, start_inprocess_server

pytestmark = pytest.mark.integration

f32 = np.float32
Stub = ps_grpc.ParameterServerStub


# ---------------------------------------------------------------- helpers


def ids_tensor(ids: Any) -> pb.Tensor:
    a = np.asarray(ids, dtype="<i8").reshape(-1)
    return pb.Tensor(data=a.tobytes(), shape=[a.size])


def rows_tensor(rows: Any) -> pb.Tensor:
    a = np.asarray(rows, dtype="<f4")
    return pb.Tensor(data=a.tobytes(), shape=list(a.shape))


def read(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


def make_table(stub: Stub, name: str, config: eht.EmbeddingHashTableConfig, **kw: Any) -> bool:
    req = pb.CreateTableRequest(name=name, config=config.SerializeToString(), **kw)
    return bool(stub.CreateTable(req).created)


def thresholds(default: int) -> bytes:
    return eht.SlotOccurrenceThresholdConfig(
        default_occurrence_threshold=default
    ).SerializeToString()


def make_filter(stub: Stub, name: str, threshold: int = 3, capacity: int = 100,
                split_num: int = 7) -> bool:
    return bool(stub.CreateHashFilter(pb.CreateHashFilterRequest(
        name=name, enable_hash_filter=True, filter_type="sliding_hash_filter",
        occurrence_threshold_config=thresholds(threshold), capacity=capacity,
        split_num=split_num,
    )).created)


def lookup(stub: Stub, table: str, ids: Any) -> np.ndarray:
    return read(stub.Lookup(pb.LookupRequest(table=table, ids=ids_tensor(ids))).values)


def assign(stub: Stub, table: str, ids: Any, rows: Any, req_time: int = 0) -> None:
    stub.Assign(pb.AssignRequest(table=table, ids=ids_tensor(ids), values=rows_tensor(rows),
                                 req_time=req_time))


def apply(stub: Stub, table: str, ids: Any, grads: Any, lrs: list[float], step: int = 0,
          **kw: Any) -> None:
    stub.ApplyGradients(pb.ApplyGradientsRequest(
        table=table, ids=ids_tensor(ids), grads=rows_tensor(grads), learning_rates=lrs,
        global_step=step, **kw,
    ))


def intercept(stub: Stub, flt: str, ids: Any, grads: Any) -> np.ndarray:
    return read(stub.InterceptGradient(pb.InterceptGradientRequest(
        hash_filter=flt, ids=ids_tensor(ids), grads=rows_tensor(grads))).grads)


# ---------------------------------------------------------------- creation and info


def test_create_list_and_shard_info() -> None:
    with start_inprocess_server(shard_index=1, num_shards=3) as srv:
        stub = srv.stub
        assert make_filter(stub, "f", threshold=3, capacity=1000, split_num=7)
        cfg_a = configs.table_config(2)
        assert make_table(stub, "a", cfg_a, hash_filter="f", extra_restore_names=["old_a"])
        assert make_table(stub, "b", configs.table_config(1), saver_parallel=3)
        # Same name and config with allow_existing: not an error, not created again.
        assert not make_table(stub, "a", cfg_a, hash_filter="f", allow_existing=True)
        # Same filter options again: not created again.
        assert not make_filter(stub, "f", threshold=3, capacity=1000, split_num=7)
        assert list(stub.ListTables(pb.ListTablesRequest()).names) == ["a", "b"]

        assign(stub, "b", [4, 7, 10], [[1.0], [2.0], [3.0]], req_time=1234)
        info = stub.GetShardInfo(pb.ShardInfoRequest())
        assert (info.shard_index, info.num_shards) == (1, 3)
        assert info.version == ps_server.__version__
        a, b = info.tables
        assert (a.name, a.dim_size, a.num_segments, a.size) == ("a", 2, 1, 0)
        assert eht.EmbeddingHashTableConfig.FromString(a.config) == cfg_a
        assert a.hash_filter == "f"
        assert list(a.extra_restore_names) == ["old_a"]
        assert a.saver_parallel == -1  # 0 on the wire = unset = Monolith's automatic count
        assert (b.name, b.dim_size, b.size, b.saver_parallel) == ("b", 1, 3, 3)
        assert b.max_update_ts == 1234
        assert b.memory_bytes > 0
        (f,) = info.hash_filters
        assert (f.name, f.filter_type, f.enabled, f.split_num) == (
            "f", "sliding_hash_filter", True, 7)
        assert (f.failure_count, f.fill_ratio) == (0, 0.0)
        # capacity 1000, split 7: one new id occupies one cell → 1 / 1000.
        intercept(stub, "f", [1], [[1.0]])
        (f,) = stub.GetShardInfo(pb.ShardInfoRequest()).hash_filters
        assert f.fill_ratio == pytest.approx(1 / 1000)


def test_health_and_reflection(server: RunningServer) -> None:
    for service in ("", "monolith_ps.ParameterServer"):
        resp = server.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (resp,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"monolith_ps.ParameterServer", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------- data plane


def test_assign_lookup_assign_add_size(stub: Stub) -> None:
    make_table(stub, "t", configs.table_config(2))
    # Later duplicates win in assign (§4.2); negative ids are ordinary ids.
    assign(stub, "t", [5, -7, 5], [[1, 2], [3, 4], [5, 6]])
    got = lookup(stub, "t", [5, 9, -7])
    assert got.dtype == np.dtype("<f4") and got.shape == (3, 2)
    np.testing.assert_array_equal(got, [[5, 6], [0, 0], [3, 4]])  # missing id → zeros
    assert stub.Size(pb.SizeRequest(table="t")).size == 2
    # assign_add accumulates duplicates in order; a missing id starts from the
    # zeros initializer: 5 → [5+1+2, 6+1+2], 9 → [0.5, 0.5].
    stub.AssignAdd(pb.AssignRequest(table="t", ids=ids_tensor([5, 5, 9]),
                                    values=rows_tensor([[1, 1], [2, 2], [0.5, 0.5]])))
    np.testing.assert_array_equal(lookup(stub, "t", [5, 9, -7]), [[8, 9], [0.5, 0.5], [3, 4]])
    assert stub.Size(pb.SizeRequest(table="t")).size == 3
    # An empty batch is fine and returns [0, dim].
    assert lookup(stub, "t", []).shape == (0, 2)


def test_lookup_entry_bytes(stub: Stub) -> None:
    make_table(stub, "t", configs.table_config(1))
    assign(stub, "t", [7], [[0.1]])
    resp = stub.LookupEntry(pb.LookupEntryRequest(table="t", ids=ids_tensor([7, 8])))
    # §4.2 example: num 0.1f, opt {dump {sgd {}}}, last_update_ts_sec 0, no id.
    assert list(resp.entries) == [bytes.fromhex("15cdcccc3d1a040a0212002000"), b""]
    assign(stub, "t", [7], [[0.1]], req_time=1234)
    (entry, ) = stub.LookupEntry(pb.LookupEntryRequest(table="t", ids=ids_tensor([7]))).entries
    assert eht.EntryDump.FromString(entry).last_update_ts_sec == 1234


def test_apply_gradients_sgd_with_and_without_dedup(stub: Stub) -> None:
    make_table(stub, "plain", configs.table_config(10))
    make_table(stub, "dedup", configs.table_config(10))
    ids = [0, 1, 0, 1, 0]
    grads = -np.ones((5, 10), dtype=np.float32)
    apply(stub, "plain", ids, grads, [0.1])
    apply(stub, "dedup", ids, grads, [0.1], enable_dedup=True)
    lr = f32(0.1)
    # Without dedup: one step per occurrence, w -= lr * g with g = -1.
    w0 = f32(0) - lr * f32(-1)
    w0 = w0 - lr * f32(-1)
    w0 = w0 - lr * f32(-1)
    w1 = (f32(0) - lr * f32(-1)) - lr * f32(-1)
    np.testing.assert_array_equal(lookup(stub, "plain", [0, 1]),
                                  [[w0] * 10, [w1] * 10])
    # With dedup: one step with the summed gradient (-3 and -2).
    np.testing.assert_array_equal(lookup(stub, "dedup", [0, 1]),
                                  [[f32(0) - lr * f32(-3)] * 10, [f32(0) - lr * f32(-2)] * 10])


def test_apply_gradients_adagrad(stub: Stub) -> None:
    make_table(stub, "t", configs.table_config(
        2, optimizer=configs.adagrad(initial_accumulator_value=1.0)))
    lr = f32(0.1)
    g = np.array([1, 2], dtype=np.float32)
    apply(stub, "t", [3], [g], [0.1])
    # norm = 1 + g²; w = 0 - lr / sqrt(norm) * g  → (-0.0707107, -0.0894427)
    norm = f32(1) + g * g
    w = f32(0) - lr / np.sqrt(norm) * g
    np.testing.assert_allclose(lookup(stub, "t", [3])[0], w, rtol=1e-6)
    np.testing.assert_allclose(w, [-0.07071067, -0.08944272], rtol=1e-6)
    apply(stub, "t", [3], [g], [0.1])
    norm = norm + g * g
    w = w - lr / np.sqrt(norm) * g
    np.testing.assert_allclose(lookup(stub, "t", [3])[0], w, rtol=1e-6)


def test_apply_gradients_adagrad_dedup_makes_one_step(stub: Stub) -> None:
    # Adagrad tells the two apart (SGD does not): grads 1 and 1 on one id.
    adagrad = configs.adagrad(initial_accumulator_value=1.0)
    make_table(stub, "plain", configs.table_config(1, optimizer=adagrad))
    make_table(stub, "dedup", configs.table_config(1, optimizer=adagrad))
    apply(stub, "plain", [-5, -5], [[1], [1]], [0.1])
    apply(stub, "dedup", [-5, -5], [[1], [1]], [0.1], enable_dedup=True)
    lr = f32(0.1)
    # Two steps: norm 2, w = -lr/sqrt(2); norm 3, w -= lr/sqrt(3).
    two_steps = (f32(0) - lr / np.sqrt(f32(2)) * f32(1)) - lr / np.sqrt(f32(3)) * f32(1)
    # One step with the summed grad 2: norm 1 + 4 = 5, w = -lr/sqrt(5) * 2.
    one_step = f32(0) - lr / np.sqrt(f32(5)) * f32(2)
    np.testing.assert_allclose(lookup(stub, "plain", [-5]), [[two_steps]], rtol=1e-6)
    np.testing.assert_allclose(lookup(stub, "dedup", [-5]), [[one_step]], rtol=1e-6)


def test_apply_gradients_passes_global_step(stub: Stub) -> None:
    # batch_softmax (§5.1): B = (1 - lr) * B + lr * (global_step - A); A = global_step.
    opt = eht.OptimizerConfig(batch_softmax=eht.BatchSoftmaxOptimizerConfig())
    make_table(stub, "t", configs.table_config(1, optimizer=opt))
    apply(stub, "t", [1], [[0.0]], [0.1], step=10)
    b = (f32(1) - f32(0.1)) * f32(0) + f32(0.1) * f32(10 - 0)
    np.testing.assert_allclose(lookup(stub, "t", [1]), [[b]], rtol=1e-6)
    apply(stub, "t", [1], [[0.0]], [0.1], step=15)
    b = (f32(1) - f32(0.1)) * b + f32(0.1) * f32(15 - 10)
    np.testing.assert_allclose(lookup(stub, "t", [1]), [[b]], rtol=1e-6)


def _fused_tables(stub: Stub) -> None:
    make_table(stub, "t1", configs.table_config(1))
    make_table(stub, "t2", configs.table_config(2))
    assign(stub, "t1", [1, 2], [[1], [2]])
    assign(stub, "t2", [3, 4], [[3, 3], [4, 4]])


_BLOCKS = [pb.FusedBlock(table_index=t, num_ids=1) for t in (0, 1, 0, 1)]


def test_fused_lookup_docstring_example(stub: Stub) -> None:
    _fused_tables(stub)
    resp = stub.FusedLookup(pb.FusedLookupRequest(
        tables=["t1", "t2"], blocks=_BLOCKS, ids=ids_tensor([1, 3, 2, 4])))
    # Blocks (t1: id 1), (t2: id 3), (t1: id 2), (t2: id 4), each flattened in order.
    np.testing.assert_array_equal(read(resp.values), [1, 3, 3, 2, 4, 4])


def test_fused_optimize_sgd_docstring_example(stub: Stub) -> None:
    _fused_tables(stub)
    stub.FusedOptimize(pb.FusedOptimizeRequest(
        tables=["t1", "t2"], blocks=_BLOCKS, ids=ids_tensor([1, 3, 2, 4]),
        grads=rows_tensor([1, 2, 2, 1, 2, 2]), learning_rates=[1, 1], global_step=1))
    # SGD lr 1: 1 - 1 = 0, [3,3] - [2,2] = [1,1], 2 - 1 = 1, [4,4] - [2,2] = [2,2].
    np.testing.assert_array_equal(lookup(stub, "t1", [1, 2]), [[0], [1]])
    np.testing.assert_array_equal(lookup(stub, "t2", [3, 4]), [[1, 1], [2, 2]])


def test_intercept_gradient_worked_example(stub: Stub) -> None:
    # §3.3: threshold 3, capacity 100, split 7, ids [1, 3<<17, 1]; each call counts
    # every occurrence once and an id passes from its 4th counted occurrence.
    make_filter(stub, "f", threshold=3, capacity=100, split_num=7)
    ids = [1, 3 << 17, 1]
    ones = np.ones((3, 2), dtype=np.float32)
    expected = [
        [[0, 0], [0, 0], [0, 0]],
        [[0, 0], [0, 0], [1, 1]],
        [[1, 1], [0, 0], [1, 1]],
        [[1, 1], [1, 1], [1, 1]],
    ]
    for want in expected:
        got = intercept(stub, "f", ids, ones)
        assert got.shape == (3, 2)
        np.testing.assert_array_equal(got, want)


def test_table_with_filter_skips_new_ids_until_admitted(stub: Stub) -> None:
    make_filter(stub, "f", threshold=1)
    make_table(stub, "t", configs.table_config(1), hash_filter="f")
    # Threshold 1: the first occurrence of a new id is filtered, the second passes.
    assign(stub, "t", [5], [[1.0]])
    assert stub.Size(pb.SizeRequest(table="t")).size == 0
    assign(stub, "t", [5], [[2.0]])
    np.testing.assert_array_equal(lookup(stub, "t", [5]), [[2.0]])


def test_save_as_tensor_pages_each_part(stub: Stub) -> None:
    make_table(stub, "t", configs.table_config(1))
    ids = np.arange(-3, 7, dtype=np.int64)
    assign(stub, "t", ids, ids.astype(np.float32).reshape(-1, 1))
    for part in range(2):
        offset, seen = 0, {}
        while True:
            resp = stub.SaveAsTensor(pb.SaveAsTensorRequest(
                table="t", shard_idx=part, num_shards=2, limit=2, offset=offset))
            for raw in resp.entries:
                dump = eht.EntryDump.FromString(raw)
                seen[dump.id] = dump.num[0]
            offset = resp.offset
            if len(resp.entries) < 2:
                break
        # Part p holds the ids with floormod(id, 2) == p (e.g. -3 → 1), value = id.
        want = {int(i): float(i) for i in ids if int(i) % 2 == part}
        assert seen == want


def test_concurrent_updates_serialize_per_table(server: RunningServer) -> None:
    stub = server.stub
    for name in ("a", "b"):
        make_table(stub, name, configs.table_config(4))
    ids = np.arange(1000)
    ones = np.ones((1000, 4), dtype=np.float32)

    def add(table: str) -> None:
        stub.AssignAdd(pb.AssignRequest(table=table, ids=ids_tensor(ids),
                                        values=rows_tensor(ones)))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(add, ["a", "b"] * 20))
    # 20 calls per table, each adding 1 to every id: no update may be lost.
    for name in ("a", "b"):
        np.testing.assert_array_equal(lookup(stub, name, ids), np.full((1000, 4), 20.0))
        assert stub.Size(pb.SizeRequest(table=name)).size == 1000


def test_creation_runs_alongside_updates_and_info(server: RunningServer) -> None:
    stub = server.stub

    def worker(i: int) -> list[list[float]]:
        # Creation holds the whole shard; updates and info calls interleave with it.
        make_table(stub, f"x{i}", configs.table_config(2))
        for _ in range(10):
            stub.AssignAdd(pb.AssignRequest(table=f"x{i}", ids=ids_tensor([1, 2]),
                                            values=rows_tensor(np.ones((2, 2)))))
            stub.GetShardInfo(pb.ShardInfoRequest())
        return lookup(stub, f"x{i}", [1, 2]).tolist()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(worker, range(16)))
    assert results == [[[10.0, 10.0], [10.0, 10.0]]] * 16
    assert len(stub.ListTables(pb.ListTablesRequest()).names) == 16


# ---------------------------------------------------------------- files


def test_save_and_restore_table(stub: Stub, tmp_path: Path) -> None:
    pytest.importorskip("ps_server.checkpoint.table_files")
    make_table(stub, "t", configs.table_config(2))
    assign(stub, "t", [1, 2, 3], [[1, 1], [2, 2], [3, 3]])
    base = str(tmp_path / "emb")
    saved = stub.SaveTable(pb.SaveRequest(table="t", basename=base))
    assert saved.entries == 3
    assert [Path(f).name for f in saved.files] == ["emb_0-00000-of-00001"]
    assign(stub, "t", [1, 4], [[9, 9], [4, 4]])
    # validate_only checks the files and leaves the table alone.
    checked = stub.RestoreTable(pb.RestoreRequest(table="t", basename=base, validate_only=True))
    assert checked.entries == 3
    np.testing.assert_array_equal(lookup(stub, "t", [1, 4]), [[9, 9], [4, 4]])
    restored = stub.RestoreTable(pb.RestoreRequest(table="t", basename=base))
    assert restored.entries == 3
    np.testing.assert_array_equal(lookup(stub, "t", [1, 2, 3, 4]),
                                  [[1, 1], [2, 2], [3, 3], [0, 0]])
    assert stub.Size(pb.SizeRequest(table="t")).size == 3


def test_save_and_restore_hash_filter(stub: Stub, tmp_path: Path) -> None:
    pytest.importorskip("ps_server.checkpoint.filter_dump")
    make_filter(stub, "f", threshold=3, capacity=100, split_num=7)
    ids, ones = [1, 3 << 17, 1], np.ones((3, 2), dtype=np.float32)
    intercept(stub, "f", ids, ones)
    intercept(stub, "f", ids, ones)  # §3.3 runs 1 and 2
    base = str(tmp_path / "hash_filter_0")
    files = stub.SaveHashFilter(pb.HashFilterFilesRequest(hash_filter="f", basename=base)).files
    assert [Path(f).name for f in files] == [f"hash_filter_0-{i:05d}-of-00007" for i in range(7)]
    with start_inprocess_server() as fresh:
        make_filter(fresh.stub, "f", threshold=3, capacity=100, split_num=7)
        fresh.stub.RestoreHashFilter(pb.HashFilterFilesRequest(hash_filter="f", basename=base))
        # The restored counts continue the worked example at run 3.
        np.testing.assert_array_equal(intercept(fresh.stub, "f", ids, ones),
                                      [[1, 1], [0, 0], [1, 1]])


def test_checkpoint_save_commit_restore(server: RunningServer, tmp_path: Path) -> None:
    # Whole checkpoints are admin-plane RPCs.
    stub, admin = server.stub, ps_grpc.ParameterServerAdminStub(server.channel)
    make_table(stub, "t", configs.table_config(2))
    assign(stub, "t", [1, 2], [[1, 1], [2, 2]])
    model_dir = str(tmp_path / "model")
    req = pb.AdminSaveRequest(model_dir=model_dir, global_step=7)
    saved = admin.SaveCheckpoint(req)
    committed = admin.CommitCheckpoint(req)
    assert saved.prefix == committed.prefix == f"{model_dir}/model.ckpt-7"
    assert (Path(model_dir) / "checkpoint").exists()
    with start_inprocess_server() as fresh:
        # An empty shard rebuilds its tables from the checkpoint's manifest.
        fresh_admin = ps_grpc.ParameterServerAdminStub(fresh.channel)
        resp = fresh_admin.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir))
        assert resp.prefix == f"{model_dir}/model.ckpt-7"
        assert list(resp.tables) == ["t"]
        np.testing.assert_array_equal(lookup(fresh.stub, "t", [1, 2]), [[1, 1], [2, 2]])
