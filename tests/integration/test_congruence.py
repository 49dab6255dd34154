"""A 3-shard cluster behaves exactly like one in-process table.

Hypothesis draws random operation sequences (assign, assign_add, apply_gradients
with and without dedup and with duplicate ids, lookups, lookup_entry) and runs each
on a fresh table of a 3-shard cluster and on one local ``EmbeddingHashTable``. Every
answer, every entry dump (values, optimizer state, timestamps) and every shard's
table clock must be *identical* (no tolerance): routing only decides where an id
lives, never what happens to it.

The reference follows docs/api.md's single-table semantics: without dedup the whole batch
is applied in order; with ``enable_dedup`` duplicates are summed per owner shard, so
the reference applies each owner's occurrences (``floormod(id, 3)``, computed here
independently of the client's routing) as its own deduplicated batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import embedding_hash_table_pb2 as eht
from ps_client import PolynomialDecay, PsClient, Table
from ps_client.learning_rate_functions import evaluate_learning_rates
from ps_client.testing import local_cluster
from ps_server.checkpoint.entry_dump import lookup_entry
from ps_server.engine.hash_table import EmbeddingHashTable

pytestmark = pytest.mark.integration

NUM_SHARDS = 3
DIM = 5  # segment 0: SGD dim 2; segment 1: Adagrad dim 3
LEARNING_RATES = (PolynomialDecay(0.5, 10, 0.01), 0.25)
EXTREMES = (np.iinfo(np.int64).min, np.iinfo(np.int64).max, -(2**40) - 1)


def config() -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    sgd = cfg.entry_config.segments.add()
    sgd.dim_size = 2
    sgd.init_config.zeros.SetInParent()
    sgd.opt_config.sgd.SetInParent()
    sgd.comp_config.fp32.SetInParent()
    ada = cfg.entry_config.segments.add()
    ada.dim_size = 3
    ada.init_config.zeros.SetInParent()
    ada.opt_config.adagrad.initial_accumulator_value = 0.5
    ada.comp_config.fp32.SetInParent()
    return cfg


@dataclass
class Op:
    kind: str
    ids: np.ndarray
    rows: np.ndarray
    req_time: int
    global_step: int
    dedup: bool


ids_st = st.lists(
    st.one_of(st.integers(-12, 12), st.sampled_from(EXTREMES)), min_size=0, max_size=10
).map(lambda xs: np.array(xs, dtype=np.int64))


@st.composite
def ops(draw: Any) -> Op:
    kind = draw(st.sampled_from(["assign", "assign_add", "apply", "apply", "lookup", "entry"]))
    ids = draw(ids_st)
    rows = draw(hnp.arrays(
        np.float32, (ids.shape[0], DIM),
        elements=st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False),
    ))
    return Op(kind, ids, rows, draw(st.sampled_from([0, 0, 7, 100, 3])),
              draw(st.integers(0, 20)), draw(st.booleans()))


@pytest.fixture(scope="module")
def client() -> Iterator[PsClient]:
    with local_cluster(NUM_SHARDS) as cluster, PsClient(cluster.addresses) as c:
        yield c


def apply_reference(ref: EmbeddingHashTable, op: Op) -> None:
    lrs = evaluate_learning_rates(LEARNING_RATES, op.global_step)
    if not op.dedup:
        ref.apply_gradients(op.ids, op.rows, lrs, op.global_step, req_time=op.req_time)
        return
    owners = np.mod(op.ids, NUM_SHARDS)
    for s in range(NUM_SHARDS):
        mine = owners == s
        ref.apply_gradients(op.ids[mine], op.rows[mine], lrs, op.global_step,
                            enable_dedup=True, req_time=op.req_time)


def run(table: Table, ref: EmbeddingHashTable, op: Op) -> None:
    if op.kind == "assign":
        table.assign(op.ids, op.rows, req_time=op.req_time)
        ref.assign(op.ids, op.rows, req_time=op.req_time)
    elif op.kind == "assign_add":
        table.assign_add(op.ids, op.rows, req_time=op.req_time)
        ref.assign_add(op.ids, op.rows, req_time=op.req_time)
    elif op.kind == "apply":
        table.apply_gradients(op.ids, op.rows, op.global_step, enable_dedup=op.dedup,
                              req_time=op.req_time)
        apply_reference(ref, op)
    elif op.kind == "lookup":
        got = table.lookup(op.ids)
        want = ref.lookup(op.ids)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    else:
        assert table.lookup_entry(op.ids) == lookup_entry(ref, op.ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(sequence=st.lists(ops(), min_size=1, max_size=12))
def test_cluster_matches_single_table(client: PsClient, sequence: list[Op]) -> None:
    table = client.create_table(config(), learning_rate_fns=LEARNING_RATES)
    ref = EmbeddingHashTable(config(), name="reference")
    for op in sequence:
        run(table, ref, op)
    every_id = np.unique(np.concatenate([np.zeros(0, dtype=np.int64)] + [o.ids for o in sequence]))
    assert table.size() == ref.size()
    assert table.lookup(every_id).tobytes() == ref.lookup(every_id).tobytes()
    assert table.lookup_entry(every_id) == lookup_entry(ref, every_id)
    clocks = [
        next(t.max_update_ts for t in info.tables if t.name == table.name)
        for info in client.shard_infos()
    ]
    assert clocks == [ref.max_update_ts] * NUM_SHARDS


def test_reference_dedup_differs_from_plain_for_adagrad(client: PsClient) -> None:
    """The congruence test can tell dedup from no dedup (so it would catch a client that
    dropped ``enable_dedup``): Adagrad on a repeated id gives different values."""
    table = client.create_table(config(), learning_rate_fns=LEARNING_RATES)
    ids = np.array([4, 4], dtype=np.int64)
    grads = np.ones((2, DIM), dtype=np.float32)
    table.apply_gradients(ids, grads, 0, enable_dedup=True)
    ref = EmbeddingHashTable(config(), name="reference")
    apply_reference(ref, Op("apply", ids, grads, 0, 0, dedup=False))
    assert table.lookup([4])[0, 2:].tobytes() != ref.lookup([4])[0, 2:].tobytes()
