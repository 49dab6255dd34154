"""A hot id repeated past the per-request limit, as a trainer meets it (issue 12, class 7).

Optimizers without an exact run form (Adam here) step a repeated id once per
occurrence, so one request may repeat an id at most ``MAX_SEQUENTIAL_REPEATS`` times:
past it the call is RESOURCE_EXHAUSTED naming the id, its count and the limit, and no
shard changes. SGD has a run form: any multiplicity is applied, every occurrence a step.
"""

from __future__ import annotations

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient
from ps_client.errors import PsResourceExhausted
from ps_client.testing import local_cluster
from ps_server.engine import configs
from ps_server.engine.hash_table import MAX_SEQUENTIAL_REPEATS

pytestmark = pytest.mark.integration

ADAM = eht.OptimizerConfig(adam=eht.AdamOptimizerConfig(beta1=0.9, beta2=0.999, epsilon=1e-8))


def test_repeats_past_the_limit_are_refused_and_change_nothing() -> None:
    with local_cluster(num_shards=2) as cluster, PsClient(cluster.addresses) as client:
        table = client.create_table(configs.table_config(4, optimizer=ADAM), name="adam")
        # 7 and 9 both live on shard 1: the refusal is one shard's whole answer (a write
        # refused by some shards while others apply is issue 12's class 6).
        table.assign([7, 9], np.ones((2, 4), np.float32))
        hot = np.concatenate([np.full(MAX_SEQUENTIAL_REPEATS + 1, 7), [9]])
        with pytest.raises(PsResourceExhausted) as info:
            table.apply_gradients(hot, np.ones((hot.size, 4), np.float32), global_step=1)
        message = str(info.value)
        assert f"id 7 occurs {MAX_SEQUENTIAL_REPEATS + 1} times" in message, message
        assert f"the limit is {MAX_SEQUENTIAL_REPEATS}" in message, message
        assert table.lookup([7, 9]).tolist() == [[1.0] * 4] * 2  # nothing applied
        # At the limit the request is applied, every occurrence a step.
        at_limit = np.full(MAX_SEQUENTIAL_REPEATS, 7)
        table.apply_gradients(at_limit, np.ones((at_limit.size, 4), np.float32), global_step=1)
        assert (table.lookup([7]) < 1.0).all()


def test_sgd_applies_any_multiplicity_exactly() -> None:
    lr = 0.01
    with local_cluster(num_shards=1) as cluster, PsClient(cluster.addresses) as client:
        table = client.create_table(configs.table_config(2, optimizer=configs.sgd()),
                                    name="sgd", learning_rate_fns=(lr,))
        table.assign([5], np.zeros((1, 2), np.float32))
        n = 4 * MAX_SEQUENTIAL_REPEATS
        table.apply_gradients(np.full(n, 5), np.ones((n, 2), np.float32), global_step=1)
        # The sequential float32 chain w <- w - lr * 1, n times.
        want = np.subtract.accumulate(
            np.concatenate([[0.0], np.full(n, lr)]).astype(np.float32))[-1]
        assert table.lookup([5]).tolist() == [[float(want)] * 2]
