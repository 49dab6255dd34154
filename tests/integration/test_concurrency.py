"""Eight threads share one PsClient: lookups and SGD updates interleave freely on a
3-shard cluster, and the final state equals a serial replay of the same updates.

The updates commute exactly: SGD with learning rate 1 subtracts gradients that are
small multiples of 0.5 (powers of two times small integers), so every partial sum
is exact in float32 and the order in which shards apply them cannot matter. Each
gradient row is constant across its dims, so a row read while being updated must
still have equal dims (a torn row would not).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient
from ps_client.testing import local_cluster
from ps_server.engine.hash_table import EmbeddingHashTable

pytestmark = pytest.mark.integration

THREADS = 8
ROUNDS = 25
BATCH = 200
DIM = 4
ID_RANGE = (-150, 150)


def sgd_config() -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    seg = cfg.entry_config.segments.add()
    seg.dim_size = DIM
    seg.init_config.zeros.SetInParent()
    seg.opt_config.sgd.SetInParent()
    seg.comp_config.fp32.SetInParent()
    return cfg


@pytest.fixture(scope="module")
def client() -> Iterator[PsClient]:
    with local_cluster(3) as cluster, PsClient(cluster.addresses) as c:
        yield c


def plan(seed: int) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """One thread's updates: (ids with duplicates, grads, enable_dedup)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(ROUNDS):
        ids = rng.integers(*ID_RANGE, size=BATCH).astype(np.int64)
        g = rng.choice(np.array([-1.0, 0.5, 1.0, 2.0], dtype=np.float32), size=BATCH)
        out.append((ids, np.repeat(g[:, None], DIM, axis=1), bool(r % 2)))
    return out


def test_concurrent_lookups_and_updates_match_serial_replay(client: PsClient) -> None:
    table = client.create_table(sgd_config(), learning_rate_fns=(1.0,))
    counter = client.create_table(sgd_config(), learning_rate_fns=(1.0,))
    plans = [plan(seed) for seed in range(THREADS)]
    errors: list[BaseException] = []
    torn: list[np.ndarray] = []
    start = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        try:
            start.wait()
            for ids, grads, dedup in plans[i]:
                table.apply_gradients(ids, grads, global_step=0, enable_dedup=dedup)
                # assign_add adds, so it commutes too: each thread counts its batches.
                counter.assign_add([i], np.ones((1, DIM), dtype=np.float32))
                rows = table.lookup(ids[::7])
                if not (rows == rows[:, :1]).all():
                    torn.append(rows)
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert not torn

    ref = EmbeddingHashTable(sgd_config(), name="serial")
    for p in plans:
        for ids, grads, dedup in p:
            ref.apply_gradients(ids, grads, [1.0], 0, enable_dedup=dedup)
    every = np.arange(*ID_RANGE, dtype=np.int64)
    got = table.lookup(every)
    assert got.tobytes() == ref.lookup(every).tobytes()
    # The same by hand: every id ends at minus the sum of its grads (lr 1).
    want = np.zeros(every.shape[0], dtype=np.float64)
    for p in plans:
        for ids, grads, _ in p:
            np.add.at(want, ids - ID_RANGE[0], -grads[:, 0].astype(np.float64))
    assert got[:, 0].tolist() == want.tolist()
    assert counter.lookup(np.arange(THREADS))[:, 0].tolist() == [float(ROUNDS)] * THREADS
