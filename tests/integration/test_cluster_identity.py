"""A cluster knows its members: clients and ``ps-admin`` refuse a list of addresses that
is not exactly one cluster's shards in index order (real shards on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import ps_service_pb2 as pb
from ps_client import AsyncPsClient, PsClient, PsFailedPrecondition
from ps_server.config import ServerConfig
from ps_server.errors import ConfigError
from tests.integration.conftest import RunningServer, start_inprocess_server
from tests.integration.test_admin_cli import ps_admin
from tests.integration.test_client import table_config

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def shards(n: int, cluster_id: str = "") -> Iterator[list[RunningServer]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(start_inprocess_server(
            shard_index=i, num_shards=n, cluster_id=cluster_id)) for i in range(n)]


def ids_of(servers: list[RunningServer]) -> list[str]:
    return [s.stub.GetShardInfo(pb.ShardInfoRequest(), timeout=10).cluster_id
            for s in servers]


def addresses(servers: list[RunningServer]) -> list[str]:
    return [s.address for s in servers]


def refused(addrs: list[str], *lines: str) -> str:
    with pytest.raises(PsFailedPrecondition) as info:
        PsClient(addrs, timeout=10)
    message = str(info.value)
    for line in lines:
        assert line in message, message
    return message


def test_a_fresh_cluster_gets_one_id_on_every_shard() -> None:
    with shards(3) as s:
        assert ids_of(s) == ["", "", ""]
        with PsClient(addresses(s), timeout=10) as c:
            cluster_id = c.cluster_id
            assert len(cluster_id) == 32
            assert c.connect() == cluster_id
        assert ids_of(s) == [cluster_id] * 3
        # A second client finds the named cluster and keeps its id.
        with PsClient(addresses(s), timeout=10) as c:
            assert c.cluster_id == cluster_id


def test_swapped_addresses_are_refused_listing_what_each_said() -> None:
    with shards(2) as s:
        with PsClient(addresses(s), timeout=10) as c:
            t = c.create_table(table_config(), name="t")
            t.assign([0, 1], [[1.0], [2.0]])
            cluster_id = c.cluster_id
        swapped = [s[1].address, s[0].address]
        refused(swapped,
                f"address 0 {s[1].address}: shard 1 of 2, cluster {cluster_id!r}; "
                "expected shard 0",
                f"address 1 {s[0].address}: shard 0 of 2, cluster {cluster_id!r}; "
                "expected shard 1",
                "check_cluster=False")


def test_a_subset_is_refused() -> None:
    with shards(3) as s:
        message = refused(addresses(s)[:2], "expected 2 shards")
        assert f"address 1 {s[1].address}: shard 1 of 3" in message
        # Refused before anything was named.
        assert ids_of(s) == ["", "", ""]


def test_a_shard_of_another_cluster_is_refused() -> None:
    with shards(2, cluster_id="blue") as blue, shards(2, cluster_id="green") as green:
        assert ids_of(blue) == ["blue", "blue"]
        mixed = [blue[0].address, green[1].address]
        refused(mixed, "shards of 2 clusters ('blue', 'green')",
                f"address 1 {green[1].address}: shard 1 of 2, cluster 'green'")
        with PsClient(addresses(green), timeout=10) as c:
            assert c.cluster_id == "green"


def test_a_restarted_blank_shard_rejoins() -> None:
    with shards(2) as s, start_inprocess_server(shard_index=1, num_shards=2) as new1:
        with PsClient(addresses(s), timeout=10) as c:
            cluster_id = c.cluster_id
        # Shard 1 "restarted" blank (a new process without --cluster_id, a new port).
        assert ids_of([new1]) == [""]
        with PsClient([s[0].address, new1.address], timeout=10) as c:
            assert c.cluster_id == cluster_id
        assert ids_of([s[0], new1]) == [cluster_id, cluster_id]


def test_explicit_ids_and_the_join_rules() -> None:
    with shards(2, cluster_id="prod-a") as s:
        with PsClient(addresses(s), timeout=10) as c:
            assert c.cluster_id == "prod-a"
        stub = s[1].stub
        same = stub.JoinCluster(pb.JoinClusterRequest(cluster_id="prod-a", shard_index=1,
                                                      num_shards=2), timeout=10)
        assert (same.cluster_id, same.shard_index, same.num_shards) == ("prod-a", 1, 2)
        for request in (pb.JoinClusterRequest(cluster_id="other", shard_index=1, num_shards=2),
                        pb.JoinClusterRequest(cluster_id="prod-a", shard_index=0, num_shards=2),
                        pb.JoinClusterRequest(cluster_id="prod-a", shard_index=1, num_shards=3)):
            with pytest.raises(grpc.RpcError) as info:
                stub.JoinCluster(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'prod-a'" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.JoinCluster(pb.JoinClusterRequest(shard_index=1, num_shards=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ids_of(s) == ["prod-a", "prod-a"]


def test_cluster_id_flag_is_validated() -> None:
    with pytest.raises(ConfigError, match="at most 128"):
        ServerConfig(cluster_id="x" * 129)
    with pytest.raises(ConfigError, match="printable"):
        ServerConfig(cluster_id="a\nb")
    assert ServerConfig(cluster_id="x" * 128).cluster_id == "x" * 128


def test_check_cluster_false_bypasses_the_check() -> None:
    with shards(2) as s:
        swapped = [s[1].address, s[0].address]
        with PsClient(swapped, timeout=10, check_cluster=False) as c:
            assert c.cluster_id == ""
            assert c.connect() == ""
            assert [i.shard_index for i in c.shard_infos()] == [1, 0]
        assert ids_of(s) == ["", ""]


def test_async_client_checks_before_its_first_operation() -> None:
    with shards(2) as s:
        swapped = [s[1].address, s[0].address]

        async def body() -> Any:
            bad = AsyncPsClient(swapped, timeout=10)
            try:
                with pytest.raises(PsFailedPrecondition, match="expected shard 0"):
                    await bad.tables()
                with pytest.raises(PsFailedPrecondition):  # checked again, refused again
                    await bad.connect()
            finally:
                await bad.close()
            # Two clients naming the fresh cluster at once agree on one id.
            clients = [AsyncPsClient(addresses(s), timeout=10) for _ in range(2)]
            try:
                return await asyncio.gather(*(c.connect() for c in clients))
            finally:
                for c in clients:
                    await c.close()

        first, second = asyncio.run(body())
        assert first == second
        assert ids_of(s) == [first, first]


# ---------------------------------------------------------------- ps-admin


def test_ps_admin_refuses_swapped_addresses(tmp_path: Path) -> None:
    with shards(2, cluster_id="c1") as s:
        swapped = f"--addresses={s[1].address},{s[0].address}"
        done = ps_admin(swapped, "stats")
        assert done.returncode == 1, done.stdout
        assert f"address 0 {s[1].address}: shard 1 of 2, cluster 'c1'; expected shard 0" \
            in done.stderr
        assert f"address 1 {s[0].address}: shard 0 of 2, cluster 'c1'; expected shard 1" \
            in done.stderr
        assert "nothing was done" in done.stderr
        # The same addresses with their indexes work, and every line names the index.
        ok = ps_admin(swapped, "--shards=1,0", "stats")
        assert ok.returncode == 0, ok.stderr
        assert f"shard 1/2 {s[1].address}" in ok.stdout
        assert "cluster c1" in ok.stdout
        saved = ps_admin(swapped, "--shards=1,0", "save",
                         f"--model_dir={tmp_path / 'm'}", "--global_step=1")
        assert saved.returncode == 0, saved.stderr
        assert any(ln.startswith("shard 0 ") and "committed" in ln
                   for ln in saved.stdout.splitlines()), saved.stdout


def test_ps_admin_restores_one_crashed_shard_and_refuses_a_partial_save(
        tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with shards(2) as s, start_inprocess_server(shard_index=1, num_shards=2) as new1:
        with PsClient(addresses(s), timeout=10) as c:
            t = c.create_table(table_config(), name="t")
            t.assign([0, 1, 2, 3], [[1.0], [2.0], [3.0], [4.0]])
            c.save_checkpoint(model_dir, 5)
            cluster_id = c.cluster_id
        # Shard 1 crashed and came back blank (new1); restore it alone.
        restored = ps_admin(f"--addresses={new1.address}", "--shards=1", "restore",
                            f"--model_dir={model_dir}")
        assert restored.returncode == 0, restored.stderr
        assert any(ln.startswith("shard 1 ") and "restored 2 entries" in ln
                   for ln in restored.stdout.splitlines()), restored.stdout
        wrong = ps_admin(f"--addresses={new1.address}", "--shards=0", "restore",
                         f"--model_dir={model_dir}")
        assert wrong.returncode == 1
        assert f"address 0 {new1.address}: shard 1 of 2, no cluster id yet; expected shard 0" \
            in wrong.stderr
        partial = ps_admin(f"--addresses={s[0].address}", "--shards=0", "save",
                           f"--model_dir={model_dir}", "--global_step=6")
        assert partial.returncode == 1
        assert "a save must reach every shard" in partial.stderr
        assert not (Path(model_dir) / "model.ckpt-6.assets").exists()
        with PsClient([s[0].address, new1.address], timeout=10) as c:
            assert c.cluster_id == cluster_id
            assert c.table("t").lookup([0, 1, 2, 3]).tolist() == [[1.0], [2.0], [3.0], [4.0]]
