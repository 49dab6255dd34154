"""A hot id repeated past the per-request limit, as a trainer meets it (issue 12, class 7).

Every occurrence of an id is its own optimizer step, bit for bit as Monolith's C++
steps it, so an id repeated r times costs r sequential steps. One request of ``n`` ids
may repeat an id at most ``max(REPEAT_FLOOR, n // cost)`` times, ``cost`` being the
table optimizer's cost of one more occurrence (SGD 96, Adagrad 128, Adam and the others
512 distinct ids' worth): past it the call is RESOURCE_EXHAUSTED naming the id, its
count and the limit, and no shard changes; at the limit every occurrence is a step.
An apply held on one table does not stall calls on another.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from ps_client import PsClient
from ps_client.errors import PsResourceExhausted
from ps_client.testing import local_cluster
from ps_server.engine import configs
from ps_server.engine.hash_table import REPEAT_FLOOR
from tests.integration.conftest import start_inprocess_server
from tests.integration.test_admin import admin, in_flight, in_thread, wait_until
from tests.integration.test_service import apply, assign, lookup, make_table

pytestmark = pytest.mark.integration

ADAM = eht.OptimizerConfig(adam=eht.AdamOptimizerConfig(beta1=0.9, beta2=0.999, epsilon=1e-8))


def test_repeats_past_the_limit_are_refused_and_change_nothing() -> None:
    with local_cluster(num_shards=2) as cluster, PsClient(cluster.addresses) as client:
        table = client.create_table(configs.table_config(4, optimizer=ADAM), name="adam")
        # 7 and 9 both live on shard 1: the refusal is one shard's whole answer (a write
        # refused by some shards while others apply is issue 12's class 6).
        table.assign([7, 9], np.ones((2, 4), np.float32))
        hot = np.concatenate([np.full(REPEAT_FLOOR + 1, 7), [9]])
        with pytest.raises(PsResourceExhausted) as info:
            table.apply_gradients(hot, np.ones((hot.size, 4), np.float32), global_step=1)
        message = str(info.value)
        assert f"id 7 occurs {REPEAT_FLOOR + 1} times" in message, message
        assert f"request of {REPEAT_FLOOR + 2} ids" in message, message
        assert f"the limit for a request of that size is {REPEAT_FLOOR} " in message, message
        assert "AdamOptimizer" in message and "enable_dedup" in message, message
        assert table.lookup([7, 9]).tolist() == [[1.0] * 4] * 2  # nothing applied
        # At the limit the request is applied, every occurrence a step.
        at_limit = np.full(REPEAT_FLOOR, 7)
        table.apply_gradients(at_limit, np.ones((at_limit.size, 4), np.float32), global_step=1)
        assert (table.lookup([7]) < 1.0).all()
        # enable_dedup sums an id's gradients into one step: no limit.
        table.apply_gradients(hot, np.ones((hot.size, 4), np.float32), global_step=2,
                              enable_dedup=True)


def test_sgd_applies_a_hot_id_at_its_limit_exactly() -> None:
    lr = 0.01
    hot = 1000
    n = 96 * hot  # SGD's cost is 96: a request of n ids may repeat an id n // 96 times
    with local_cluster(num_shards=1) as cluster, PsClient(cluster.addresses) as client:
        table = client.create_table(configs.table_config(2, optimizer=configs.sgd()),
                                    name="sgd", learning_rate_fns=(lr,))
        table.assign([5], np.zeros((1, 2), np.float32))
        ids = np.concatenate([np.full(hot, 5), np.arange(1000, 1000 + n - hot)])
        rng = np.random.default_rng(3)
        ids = ids[rng.permutation(n)]
        table.apply_gradients(ids, np.ones((n, 2), np.float32), global_step=1)
        # The sequential float32 chain w <- w - lr * 1 (exact product: one rounding per
        # step, as the FMA rounds it), once per occurrence.
        want = np.subtract.accumulate(
            np.concatenate([[0.0], np.full(hot, lr)]).astype(np.float32))[-1]
        assert table.lookup([5]).tolist() == [[float(want)] * 2]
        # One more occurrence of 5 in a request of the same size is refused.
        ids[ids == 1000 + 7] = 5
        with pytest.raises(PsResourceExhausted, match=f"id 5 occurs {hot + 1} times"):
            table.apply_gradients(ids, np.ones((n, 2), np.float32), global_step=2)
        assert table.lookup([5]).tolist() == [[float(want)] * 2]


def test_a_long_apply_on_one_table_does_not_stall_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An apply held inside the engine (as a long one is) keeps its own table's lock and
    one worker thread: lookups and applies on another table answer meanwhile, and a
    lookup on the busy table waits for it (class 7's 'stalled lookups')."""
    with start_inprocess_server() as srv:
        for name in ("busy", "other"):
            make_table(srv.stub, name, configs.table_config(2, optimizer=configs.sgd()))
            assign(srv.stub, name, [1, 2], [[1.0, 1.0], [2.0, 2.0]])
        busy = srv.shard.tables["busy"].table
        entered, release = threading.Event(), threading.Event()
        original = busy.apply_gradients

        def held(*args: Any, **kwargs: Any) -> None:
            entered.set()
            assert release.wait(20), "the test never released the apply"
            original(*args, **kwargs)

        monkeypatch.setattr(busy, "apply_gradients", held)
        writer, _ = in_thread(lambda: apply(srv.stub, "busy", [1], [[1.0, 1.0]], [0.5]))
        assert entered.wait(10)
        try:
            # The other table answers while the apply holds "busy".
            assert lookup(srv.stub, "other", [1, 2]).tolist() == [[1.0, 1.0], [2.0, 2.0]]
            apply(srv.stub, "other", [2], [[2.0, 2.0]], [0.5])
            assert lookup(srv.stub, "other", [2]).tolist() == [[1.0, 1.0]]
            assert admin(srv).Stats(pb.StatsRequest(), timeout=5).in_flight == 1
            # A lookup on the busy table waits for the apply, then sees it.
            reader, read = in_thread(lambda: lookup(srv.stub, "busy", [1]))
            wait_until("the shard admitted the lookup", lambda: in_flight(srv) == 2)
            assert reader.is_alive() and not read
        finally:
            release.set()
        writer.join(10)
        reader.join(10)
        assert read["result"].tolist() == [[0.5, 0.5]]
