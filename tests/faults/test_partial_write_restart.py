"""A write that reached one shard but not the other, finished after a restart (issue 12,
class 6).

Real shard processes (``local_cluster``). Shard 1 is killed (SIGKILL) between the
shards' parts of an ``apply_gradients``: shard 0 applies its part, shard 1's outcome is
unknown (``UNAVAILABLE`` after the client's short retries). Shard 1 is started again on
its port, empty, and its table is created again (as the test's setup did);
``client.retry(error)`` then resends shard 1 its original request and does not contact
shard 0. Every row holds exactly one SGD step (``w - lr * g``, worked out by hand):
shard 0's rows were not stepped twice, shard 1's rows once.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import PsClient, PsUnavailable, RetryPolicy
from ps_client.testing import local_cluster
from ps_server.engine import configs

pytestmark = [pytest.mark.integration]

LR = 0.5
#: Quick to give up on a dead shard.
RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.1, attempt_timeout=5)


def create_table_on(address: str, name: str) -> None:
    """The test's setup, on one shard: the table, as ``create_table`` made it."""
    with grpc.insecure_channel(address) as channel:
        ps_grpc.ParameterServerStub(channel).CreateTable(
            pb.CreateTableRequest(
                name=name, config=configs.table_config(2).SerializeToString(deterministic=True),
                saver_parallel=-1, allow_existing=True,
            ),
            timeout=10,
        )


def wait_until_reachable(client: PsClient, within: float = 10.0) -> None:
    """Until the client's channels reconnected to every shard (their backoff after the
    refused connections lasts up to 2 s)."""
    deadline = time.monotonic() + within
    while True:
        try:
            client.shard_infos()
            return
        except PsUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_kill_a_shard_mid_write_restart_it_and_retry_applies_each_part_once() -> None:
    ids = np.array([2, 3, 4, 5], dtype=np.int64)  # 2, 4 on shard 0; 3, 5 on shard 1
    grads = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0], [-4.0, 0.5]], dtype=np.float32)
    with local_cluster(2) as cluster, \
            PsClient(cluster.addresses, timeout=5, retry=RETRY) as client:
        addrs = list(cluster.addresses)
        table = client.create_table(configs.table_config(2), name="emb", learning_rate_fns=(LR,))
        table.assign([2, 4], [[1.0, 2.0], [5.0, 6.0]])
        cluster.kill(1)  # SIGKILL; shard 1's part never arrives
        with pytest.raises(PsUnavailable) as info:
            table.apply_gradients(ids, grads, 1)
        err = info.value
        assert err.write is not None
        assert (err.write.applied, err.write.refused, err.write.unknown) == ((0,), (), (1,))
        assert err.details.startswith(
            f"ApplyGradients applied on shard 0 ({addrs[0]}) only; outcome unknown on "
            f"shard 1 ({addrs[1]}) (it may have applied): UNAVAILABLE: "
        ), err.details

        cluster.restart(1)  # same port, empty
        assert cluster.addresses == addrs
        create_table_on(addrs[1], "emb")
        wait_until_reachable(client)
        client.retry(err)

        assert table.lookup(ids).tolist() == [
            [1.0 - 0.5 * 0.5, 2.0 - 0.5 * -1.0],   # shard 0: one step, not two
            [0.0 - 0.5 * 2.0, 0.0 - 0.5 * 0.25],   # shard 1: one step from zeros
            [5.0 - 0.5 * 1.0, 6.0 - 0.5 * 1.0],
            [0.0 - 0.5 * -4.0, 0.0 - 0.5 * 0.5],
        ]
        # Done: a second retry of the same error resends shard 1 its request again
        # (same tag), which its ledger answers without applying it.
        client.retry(err)
        assert table.lookup(ids).tolist() == [[0.75, 2.5], [-1.0, -0.125], [4.5, 5.5],
                                              [2.0, -0.25]]
