"""The admin service (``monolith_ps.ParameterServerAdmin``) on real in-process servers.

Checkpoints saved through the admin RPCs are restored into clusters of another size;
readiness during a restore, eviction, stats, drain and every admin error are checked
through real gRPC. Values are exact: assigned float32 values come back bit for bit,
and expiry follows docs/semantics.md §6.3 (expired when clock - ts >= expire_days * 86400).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.checkpoint import checkpoints
from ps_server.config import ServerConfig
from ps_server.engine import configs
from ps_server.engine.expiry import EvictionScheduler
from ps_server.server import ShardServer, build_shard_server, evict_due_tables
from tests.integration.conftest import (
    CLIENT_OPTIONS,
    RunningServer,
    _shared_loop,
    start_inprocess_server,
)
from tests.integration.test_service import (
    assign,
    intercept,
    lookup,
    make_filter,
    make_table,
)

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DAY = 86_400
T0 = 1_700_000_000  # a req_time in seconds

_T = TypeVar("_T")


def run_on_server_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on the event loop of the in-process servers."""
    return _shared_loop().run(coro)


@contextlib.contextmanager
def start_shard_server(**config_fields: Any) -> Iterator[tuple[RunningServer, ShardServer]]:
    """Like ``start_inprocess_server``, but a whole :class:`ShardServer` (metrics
    endpoint, periodic eviction) built by ``build_shard_server`` and started."""
    config = ServerConfig(**{"host": "127.0.0.1", "workers": 4, **config_fields, "port": 0})
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    async def start() -> ShardServer:
        built = await build_shard_server(config, executor=executor)
        await built.start()
        return built

    built = run_on_server_loop(start())
    channel = grpc.insecure_channel(f"127.0.0.1:{built.port}", options=CLIENT_OPTIONS)
    try:
        yield RunningServer(
            config=config, shard=built.shard, port=built.port, channel=channel,
            stub=ps_grpc.ParameterServerStub(channel),
            health=health_pb2_grpc.HealthStub(channel), health_servicer=built.health,
            _grpc_server=built.server,
        ), built
    finally:
        channel.close()
        run_on_server_loop(built.stop(0))
        executor.shutdown(wait=True)


def admin(srv: RunningServer) -> ps_grpc.ParameterServerAdminStub:
    return ps_grpc.ParameterServerAdminStub(srv.channel)


def health(srv: RunningServer, service: str = "monolith_ps.ParameterServer") -> int:
    return srv.health.Check(health_pb2.HealthCheckRequest(service=service)).status


@contextlib.contextmanager
def cluster(n: int, **config: Any) -> Iterator[list[RunningServer]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(start_inprocess_server(shard_index=i, num_shards=n, **config))
            for i in range(n)
        ]


def values_of(ids: list[int]) -> np.ndarray:
    # Exactly representable in float32: id / 4 and -id.
    return np.array([[i / 4, -float(i)] for i in ids], dtype=np.float32)


def save_all(servers: list[RunningServer], model_dir: str, step: int,
             max_to_keep: int = 0) -> list[pb.AdminCheckpointResponse]:
    """What ``ps-admin save`` does: every shard saves, then shard 0 commits."""
    req = pb.AdminSaveRequest(model_dir=model_dir, global_step=step, max_to_keep=max_to_keep)
    parts = [admin(s).SaveCheckpoint(req) for s in servers]
    admin(servers[0]).CommitCheckpoint(req)
    return parts


def fill_cluster(servers: list[RunningServer], table: str, ids: list[int]) -> None:
    n = len(servers)
    for s in servers:
        make_table(s.stub, table, configs.table_config(2))
    for k, s in enumerate(servers):
        own = [i for i in ids if i % n == k]
        if own:
            assign(s.stub, table, own, values_of(own), req_time=T0)


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert isinstance(err, grpc.Call)
    assert err.code() == code, err.details()
    for word in words:
        assert word in (err.details() or ""), err.details()
    return err.details() or ""


class BlockingRestore:
    """Test hook: a real (not validate-only) restore waits for :meth:`release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        original = checkpoints.restore_shard_checkpoint

        def slow(shard: Any, model_dir: str, prefix: str | None = None,
                 validate_only: bool = False, **kw: Any) -> Any:
            if not validate_only:
                self.entered.set()
                assert self._release.wait(20), "the test never released the restore"
            return original(shard, model_dir, prefix, validate_only, **kw)

        monkeypatch.setattr(checkpoints, "restore_shard_checkpoint", slow)

    def release(self) -> None:
        self._release.set()


def wait_until(what: str, check: Callable[[], bool], limit: float = 30.0) -> None:
    """Wait for ``check()`` to hold (an observed state, asked every 10 ms); ``limit`` is
    only a safety net against a test that would hang."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not within {limit:g} s: {what}"
        time.sleep(0.01)


def in_flight(srv: RunningServer) -> int:
    """Data-plane calls the shard admitted and has not answered (admin Stats)."""
    return admin(srv).Stats(pb.StatsRequest(), timeout=10).in_flight


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except grpc.RpcError as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# ---------------------------------------------------------------- save / restore


def test_save_then_restore_into_a_cluster_of_another_size(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    ids = [-7, -3, 0, 1, 2, 5, 9, 10, 11, 1_000_003]
    with cluster(3) as old:
        fill_cluster(old, "emb", ids)
        parts = save_all(old, model_dir, step=12)
    prefix = f"{model_dir}/model.ckpt-12"
    assert [p.prefix for p in parts] == [prefix] * 3
    # floormod(id, 3): -7 = -3*3 + 2 → 2, -3 → 0, 1_000_003 = 3*333_334 + 1 → 1, so
    # shard 0 {-3, 0, 9}, shard 1 {1, 10, 1_000_003}, shard 2 {-7, 2, 5, 11}.
    assert [p.entries for p in parts] == [3, 3, 4]
    for p in parts:
        assert p.bytes == sum(os.path.getsize(f) for f in p.files) > 0
        assert list(p.tables) == ["emb"]

    with cluster(2) as new:
        stubs = [admin(s) for s in new]
        checked = [a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir,
                                                              validate_only=True))
                   for a in stubs]
        # Validation changes nothing: no table was created yet.
        assert [list(s.stub.ListTables(pb.ListTablesRequest()).names) for s in new] == [[], []]
        assert [c.prefix for c in checked] == [prefix, prefix]
        # floormod(id, 2): the even ids on shard 0, the odd (negative ones too) on shard 1.
        own = [[0, 2, 10], [-7, -3, 1, 5, 9, 11, 1_000_003]]
        assert [c.entries for c in checked] == [len(o) for o in own]
        done = [a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir, prefix=prefix))
                for a in stubs]
        assert [d.entries for d in done] == [len(o) for o in own]
        assert all(list(d.tables) == ["emb"] for d in done)
        for k, s in enumerate(new):
            np.testing.assert_array_equal(lookup(s.stub, "emb", own[k]), values_of(own[k]))
            stats = admin(s).Stats(pb.StatsRequest())
            (table,) = stats.tables
            assert (table.name, table.entries, table.max_update_ts) == ("emb", len(own[k]), T0)
            rec = stats.last_restore
            assert (rec.op, rec.prefix, rec.entries, rec.error) == (
                "restore", prefix, len(own[k]), "")
            assert rec.bytes == done[k].bytes > 0


def test_readiness_is_not_serving_while_a_restore_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = str(tmp_path / "model")
    with start_inprocess_server() as srv:
        fill_cluster([srv], "emb", [1, 2, 3])
        save_all([srv], model_dir, step=1)
        assign(srv.stub, "emb", [1], [[100.0, 100.0]])  # changed after the save
        hook = BlockingRestore(monkeypatch)
        restore, restored = in_thread(
            lambda: admin(srv).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir)))
        assert hook.entered.wait(10)
        try:
            assert health(srv) == NOT_SERVING
            assert health(srv, "") == SERVING  # liveness is untouched
            assert health(srv, "monolith_ps.ParameterServerAdmin") == SERVING
            # Stats answers while the restore holds the shard.
            assert admin(srv).Stats(pb.StatsRequest(), timeout=5).state == "RESTORING"
            # A data RPC waits for the restore instead of interleaving with it: the
            # shard admitted it (in flight), and it has no answer while the restore
            # is held.
            assert in_flight(srv) == 0
            reader, read = in_thread(lambda: lookup(srv.stub, "emb", [1]))
            wait_until("the shard admitted the lookup", lambda: in_flight(srv) == 1)
            assert reader.is_alive() and not read
            assert in_flight(srv) == 1
        finally:
            hook.release()
        for thread in (restore, reader):
            thread.join(30)
            assert not thread.is_alive(), "a call still runs after the restore was released"
        assert "error" not in restored, restored
        np.testing.assert_array_equal(read["result"], values_of([1]))  # the restored value
        assert health(srv) == SERVING
        assert admin(srv).Stats(pb.StatsRequest()).state == "SERVING"


def test_a_failed_restore_puts_readiness_back_and_is_recorded(tmp_path: Path) -> None:
    with start_inprocess_server() as srv:
        missing = str(tmp_path / "model" / "model.ckpt-5")
        expect_error(
            lambda: admin(srv).RestoreCheckpoint(pb.AdminRestoreRequest(
                model_dir=str(tmp_path / "model"), prefix=missing)),
            grpc.StatusCode.NOT_FOUND, missing,
        )
        assert health(srv) == SERVING
        rec = admin(srv).Stats(pb.StatsRequest()).last_restore
        assert rec.op == "restore" and missing in rec.error


# ---------------------------------------------------------------- eviction


def expiring_table(srv: RunningServer, name: str, *, periodic: bool = False,
                   every_n_hours: int = 0) -> None:
    config = configs.table_config(2, expire_days=1)
    config.enable_feature_eviction = periodic
    config.feature_evict_every_n_hours = every_n_hours
    make_table(srv.stub, name, config)
    # Clock = T0 + 1 day. Ages: id 1: 86400 >= 86400 → expired; id 2: 86399 → kept;
    # id 3: 0 → kept.
    assign(srv.stub, name, [1], values_of([1]), req_time=T0)
    assign(srv.stub, name, [2], values_of([2]), req_time=T0 + 1)
    assign(srv.stub, name, [3], values_of([3]), req_time=T0 + DAY)


def test_evict_drops_expired_entries() -> None:
    with start_inprocess_server() as srv:
        expiring_table(srv, "a")
        expiring_table(srv, "b")
        done = admin(srv).Evict(pb.EvictRequest(table="a"))
        assert [(t.table, t.evicted, t.remaining) for t in done.tables] == [("a", 1, 2)]
        assert done.evicted == 1
        np.testing.assert_array_equal(
            lookup(srv.stub, "a", [1, 2, 3]), np.vstack([np.zeros(2), values_of([2, 3])]))
        # "" = every table; "a" has nothing left to evict.
        done = admin(srv).Evict(pb.EvictRequest())
        assert [(t.table, t.evicted, t.remaining) for t in done.tables] == [
            ("a", 0, 2), ("b", 1, 2)]
        stats = admin(srv).Stats(pb.StatsRequest())
        assert [(t.name, t.entries, t.evicted_entries) for t in stats.tables] == [
            ("a", 2, 1), ("b", 2, 1)]


def test_periodic_eviction_follows_each_tables_schedule() -> None:
    with start_shard_server(eviction_check_seconds=0) as (srv, built):
        expiring_table(srv, "every2h", periodic=True, every_n_hours=2)
        expiring_table(srv, "never", periodic=False)
        schedulers: dict[tuple[str, int], EvictionScheduler] = {}

        def check(now: float) -> list[str]:
            return run_on_server_loop(evict_due_tables(built.runtime, schedulers, now))

        assert check(0.0) == []          # the first check starts the period
        assert check(7199.0) == []       # 2 h = 7200 s are not over yet
        assert check(7200.0) == ["every2h"]
        sizes = {t.name: t.entries for t in admin(srv).Stats(pb.StatsRequest()).tables}
        assert sizes == {"every2h": 2, "never": 3}
        assert check(7300.0) == []       # a new period started at 7200


def test_the_server_runs_periodic_eviction_in_the_background() -> None:
    with start_shard_server(eviction_check_seconds=0.05) as (srv, _):
        # every_n_hours = 0: due at every check after the first.
        expiring_table(srv, "hourly0", periodic=True, every_n_hours=0)
        expiring_table(srv, "never", periodic=False)
        def sizes() -> dict[str, int]:
            return {t.name: t.entries for t in admin(srv).Stats(pb.StatsRequest()).tables}

        wait_until("a background eviction of hourly0", lambda: sizes()["hourly0"] == 2)
        assert sizes() == {"hourly0": 2, "never": 3}
        evicted = {t.name: t.evicted_entries for t in admin(srv).Stats(pb.StatsRequest()).tables}
        assert evicted == {"hourly0": 1, "never": 0}


# ---------------------------------------------------------------- stats


def test_stats_reports_tables_filters_and_the_last_save(tmp_path: Path) -> None:
    with start_inprocess_server(shard_index=1, num_shards=2) as srv:
        a = admin(srv)
        empty = a.Stats(pb.StatsRequest())
        assert (empty.shard_index, empty.num_shards, empty.state) == (1, 2, "SERVING")
        assert empty.uptime_seconds > 0 and empty.version
        assert not empty.HasField("last_save") and not empty.HasField("last_restore")
        assert make_filter(srv.stub, "f", threshold=3, capacity=1000, split_num=7)
        make_table(srv.stub, "t", configs.table_config(2), hash_filter="f")
        make_table(srv.stub, "u", configs.table_config(1))
        assign(srv.stub, "u", [1, 3, 5], [[1.0], [2.0], [3.0]], req_time=T0)
        # capacity 1000: 4 distinct new ids each occupy one cell → 4 / 1000.
        intercept(srv.stub, "f", [1, 3, 5, 7], np.ones((4, 1)))
        stats = a.Stats(pb.StatsRequest())
        info = {t.name: t for t in srv.stub.GetShardInfo(pb.ShardInfoRequest()).tables}
        assert [(t.name, t.entries, t.dim_size, t.hash_filter) for t in stats.tables] == [
            ("t", 0, 2, "f"), ("u", 3, 1, "")]
        assert [t.memory_bytes for t in stats.tables] == [
            info["t"].memory_bytes, info["u"].memory_bytes]
        assert stats.tables[1].max_update_ts == T0
        assert stats.entries == 3
        assert stats.memory_bytes == info["t"].memory_bytes + info["u"].memory_bytes
        (f,) = stats.hash_filters
        assert (f.name, f.filter_type, f.enabled, f.failure_count, f.capacity) == (
            "f", "sliding_hash_filter", True, 0, 1000)
        assert f.fill_ratio == pytest.approx(4 / 1000)

        model_dir = str(tmp_path / "m")
        saved = a.SaveCheckpoint(pb.AdminSaveRequest(model_dir=model_dir, global_step=3))
        rec = a.Stats(pb.StatsRequest()).last_save
        assert (rec.op, rec.prefix, rec.entries, rec.error) == (
            "save", f"{model_dir}/model.ckpt-3", 3, "")
        assert rec.bytes == sum(os.path.getsize(p) for p in saved.files) > 0
        assert rec.start_time == pytest.approx(time.time(), abs=60)
        assert rec.duration_seconds >= 0


# ---------------------------------------------------------------- drain


def test_drain_refuses_data_rpcs_after_the_running_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = str(tmp_path / "model")
    with start_inprocess_server(grace_seconds=30) as srv:
        fill_cluster([srv], "emb", [1, 2])
        save_all([srv], model_dir, step=1)
        hook = BlockingRestore(monkeypatch)
        restore, _ = in_thread(
            lambda: admin(srv).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir)))
        assert hook.entered.wait(10)
        # A data call admitted before the drain, waiting behind the restore.
        reader, read = in_thread(lambda: lookup(srv.stub, "emb", [2]))
        wait_until("the shard admitted the lookup", lambda: in_flight(srv) == 1)
        t0 = time.monotonic()
        drained = admin(srv).Drain(pb.DrainRequest(grace_seconds=0.5))
        assert drained.in_flight == 1 and drained.waited_seconds >= 0.5
        assert time.monotonic() - t0 < 5
        assert health(srv) == NOT_SERVING and health(srv, "") == SERVING
        details = expect_error(lambda: lookup(srv.stub, "emb", [1]),
                               grpc.StatusCode.UNAVAILABLE, "drained", "shard 0 of 1")
        assert "restart" in details
        hook.release()
        for thread in (restore, reader):
            thread.join(30)
            assert not thread.is_alive(), "a call still runs after the restore was released"
        # The admitted call was not cut off.
        np.testing.assert_array_equal(read["result"], values_of([2]))
        drained = admin(srv).Drain(pb.DrainRequest(grace_seconds=5))
        assert drained.in_flight == 0
        stats = admin(srv).Stats(pb.StatsRequest())
        assert (stats.state, stats.in_flight) == ("DRAINING", 0)
        # Still refusing after the restore ended: readiness stays down.
        assert health(srv) == NOT_SERVING
        expect_error(lambda: srv.stub.ListTables(pb.ListTablesRequest()),
                     grpc.StatusCode.UNAVAILABLE, "drained")


# ---------------------------------------------------------------- errors


def test_every_admin_error_maps_to_a_precise_status(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with start_inprocess_server(data_root=str(root)) as srv:
        a = admin(srv)
        fill_cluster([srv], "emb", [1, 2])
        saved = save_all([srv], "model", step=4)  # relative: under the data root
        prefix = str(root / "model" / "model.ckpt-4")
        assert saved[0].prefix == prefix

        codes = grpc.StatusCode
        expect_error(lambda: a.SaveCheckpoint(pb.AdminSaveRequest(model_dir="", global_step=1)),
                     codes.INVALID_ARGUMENT, "model_dir must not be empty")
        expect_error(lambda: a.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=-1)),
                     codes.INVALID_ARGUMENT, "global_step must be >= 0, got -1")
        expect_error(
            lambda: a.CommitCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=1,
                                                           max_to_keep=-2)),
            codes.INVALID_ARGUMENT, "max_to_keep must be >= 0")
        expect_error(
            lambda: a.SaveCheckpoint(pb.AdminSaveRequest(model_dir=str(tmp_path / "out"),
                                                         global_step=1)),
            codes.PERMISSION_DENIED, "outside the data root")
        expect_error(lambda: a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="nothing_here")),
                     codes.NOT_FOUND, "no checkpoint in 'nothing_here'", "nothing was restored")
        expect_error(
            lambda: a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="model",
                                                               prefix="model.ckpt-9")),
            codes.NOT_FOUND, "model.ckpt-9")
        expect_error(lambda: a.Evict(pb.EvictRequest(table="nope")),
                     codes.NOT_FOUND, "'nope'")
        expect_error(lambda: a.Drain(pb.DrainRequest(grace_seconds=-1)),
                     codes.INVALID_ARGUMENT, "grace_seconds must be >= 0")

        # A live table the checkpoint has no files for.
        make_table(srv.stub, "extra", configs.table_config(1))
        expect_error(lambda: a.RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="model")),
                     codes.FAILED_PRECONDITION, "'extra'")
        srv.stub.ListTables(pb.ListTablesRequest())  # still serving
        assert health(srv) == SERVING

    with start_inprocess_server(data_root=str(root)) as fresh:
        # One flipped byte in a table part: DATA_LOSS, and nothing changes.
        (part,) = [f for f in saved[0].files if os.path.basename(f).startswith("emb_")]
        data = bytearray(Path(part).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(part).write_bytes(bytes(data))
        expect_error(
            lambda: admin(fresh).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="model")),
            codes.DATA_LOSS, os.path.basename(part))
        assert list(fresh.stub.ListTables(pb.ListTablesRequest()).names) == []
        assert health(fresh) == SERVING
