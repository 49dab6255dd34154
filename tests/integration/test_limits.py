"""Limits (issue 7 item 4): ids per request, entries and entry bytes per shard.

Past a limit the call is RESOURCE_EXHAUSTED with the limit in its details, nothing
changes (tables, clocks, hash filters) and the shard keeps serving. Byte costs are
worked out from the entry layout: values (dim x 4) + optimizer state + a 4-byte
timestamp + an 8-byte id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_client import PsClient
from ps_client.errors import PsResourceExhausted
from ps_client.testing import local_cluster
from ps_server.engine import configs
from ps_server.engine.shard import Shard, ShardLimits
from ps_server.errors import ConfigError, ResourceExhaustedError
from tests.integration.conftest import start_inprocess_server
from tests.integration.test_service import (
    Stub,
    apply,
    assign,
    ids_tensor,
    intercept,
    lookup,
    make_filter,
    make_table,
    rows_tensor,
)

pytestmark = pytest.mark.integration

Code = grpc.StatusCode

#: SGD keeps no state: 2 x 4 value bytes + 4 timestamp + 8 id.
SGD_DIM2_BYTES = 2 * 4 + 4 + 8
#: Adagrad keeps one float32 accumulator per value: 4 x 4 + 4 x 4 + 4 + 8.
ADAGRAD_DIM4_BYTES = 4 * 4 + 4 * 4 + 4 + 8


def expect(code: grpc.StatusCode, call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    details = str(err.details())
    assert err.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


def state(stub: Stub) -> list[tuple[str, int, int]]:
    info = stub.GetShardInfo(pb.ShardInfoRequest())
    return [(t.name, t.size, t.max_update_ts) for t in info.tables]


def fill(stub: Stub) -> tuple[Any, ...]:
    info = stub.GetShardInfo(pb.ShardInfoRequest())
    return tuple(f.fill_ratio for f in info.hash_filters)


def fused_optimize(stub: Stub, tables: list[str], blocks: list[tuple[int, list[int]]],
                   dim: int = 2, req_time: int = 0) -> None:
    ids = [i for _, b in blocks for i in b]
    stub.FusedOptimize(pb.FusedOptimizeRequest(
        tables=tables,
        blocks=[pb.FusedBlock(table_index=t, num_ids=len(b)) for t, b in blocks],
        ids=ids_tensor(ids), grads=rows_tensor(np.ones((len(ids), dim))),
        learning_rates=[1.0] * len(tables), req_time=req_time,
    ))


# ---------------------------------------------------------------- ids per request


def test_requests_with_too_many_ids_are_refused_before_anything_changes() -> None:
    with start_inprocess_server(max_ids_per_request=4) as srv:
        stub = srv.stub
        make_filter(stub, "f", threshold=0)
        make_table(stub, "t", configs.table_config(2), hash_filter="f")
        assign(stub, "t", [1, 2, 3, 4], np.ones((4, 2)), req_time=10)  # exactly the limit
        before = state(stub), fill(stub)
        five = [1, 2, 3, 4, 5]
        calls: dict[str, Callable[[], Any]] = {
            "Lookup": lambda: lookup(stub, "t", five),
            "LookupEntry": lambda: stub.LookupEntry(
                pb.LookupEntryRequest(table="t", ids=ids_tensor(five))),
            "Assign": lambda: assign(stub, "t", five, np.ones((5, 2)), req_time=99),
            "AssignAdd": lambda: stub.AssignAdd(pb.AssignRequest(
                table="t", ids=ids_tensor(five), values=rows_tensor(np.ones((5, 2))),
                req_time=99)),
            "ApplyGradients": lambda: apply(stub, "t", five, np.ones((5, 2)), [1.0],
                                            req_time=99),
            "FusedLookup": lambda: stub.FusedLookup(pb.FusedLookupRequest(
                tables=["t"], blocks=[pb.FusedBlock(table_index=0, num_ids=5)],
                ids=ids_tensor(five))),
            "FusedOptimize": lambda: fused_optimize(stub, ["t"], [(0, [1, 2]), (0, [3, 4, 5])],
                                                    req_time=99),
            "InterceptGradient": lambda: intercept(stub, "f", five, np.ones((5, 2))),
        }
        for rpc, call in calls.items():
            expect(Code.RESOURCE_EXHAUSTED, call,
                   f"{rpc}: 5 ids in one request", "max_ids_per_request=4")
        assert (state(stub), fill(stub)) == before
        # Still serving, and 4 ids still pass.
        np.testing.assert_array_equal(lookup(stub, "t", [1, 2, 3, 4]), np.ones((4, 2)))


def test_client_sees_the_batch_limit_of_a_shard_process() -> None:
    # The flag reaches a real shard process; the client maps the status.
    with local_cluster(1, max_ids_per_request=3) as cluster, \
            PsClient(cluster.addresses, timeout=10) as client:
        table = client.create_table(configs.table_config(2), name="t")
        table.assign([1, 2, 3], np.ones((3, 2), np.float32))
        with pytest.raises(PsResourceExhausted, match="max_ids_per_request=3"):
            table.lookup([1, 2, 3, 4])
        np.testing.assert_array_equal(table.lookup([1, 2, 3]), np.ones((3, 2)))


# ---------------------------------------------------------------- entries per shard


def test_entries_per_shard_counts_every_table_and_only_new_ids() -> None:
    with start_inprocess_server(max_entries_per_shard=6) as srv:
        stub = srv.stub
        make_filter(stub, "f", threshold=5)  # counts ids, admits none yet
        make_table(stub, "t", configs.table_config(2))
        make_table(stub, "u", configs.table_config(2))
        make_table(stub, "g", configs.table_config(2), hash_filter="f")
        assign(stub, "t", [1, 2, 3], [[1, 1], [2, 2], [3, 3]], req_time=10)
        assign(stub, "u", [10, 11], np.ones((2, 2)), req_time=10)
        before = state(stub), fill(stub)

        # 5 held + 2 new (the repeated 12 counts once) = 7 > 6.
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: assign(stub, "u", [12, 13, 12], np.ones((3, 2)), req_time=99),
               "table 'u': 2 new ids would make shard 0 hold 7 entries, above "
               "max_entries_per_shard=6", "nothing was changed")
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: stub.AssignAdd(pb.AssignRequest(
                   table="t", ids=ids_tensor([1, 4, 5]), values=rows_tensor(np.ones((3, 2))),
                   req_time=99)),
               "hold 7 entries", "max_entries_per_shard=6")
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: apply(stub, "t", [4, 5], np.ones((2, 2)), [1.0], req_time=99,
                             enable_dedup=True),
               "hold 7 entries")
        # Ids a hash filter would hold back count too, and are not counted by it.
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: assign(stub, "g", [20, 21], np.ones((2, 2)), req_time=99),
               "table 'g': 2 new ids", "hold 7 entries")
        # Fused: the first block alone would fit (6), both would not (7), so neither
        # is applied.
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: fused_optimize(stub, ["t", "u"], [(0, [4]), (1, [12])], req_time=99),
               "fused_optimize on tables 't', 'u': 2 new ids", "hold 7 entries")
        # Nothing changed: sizes, clocks (no 99), filter counts, values.
        assert (state(stub), fill(stub)) == before
        np.testing.assert_array_equal(lookup(stub, "t", [1, 4]), [[1, 1], [0, 0]])

        # Existing ids are not new: a write touching only them always passes.
        assign(stub, "t", [1, 2, 3], np.zeros((3, 2)), req_time=20)
        # Up to the limit exactly.
        fused_optimize(stub, ["t", "u"], [(0, [4]), (1, [10])], req_time=30)
        assert [(n, s) for n, s, _ in state(stub)] == [("g", 0), ("t", 4), ("u", 2)]
        np.testing.assert_array_equal(lookup(stub, "t", [4]), [[-1, -1]])  # 0 - 1.0 * 1


def test_the_message_gives_counts_with_separators() -> None:
    shard = Shard(limits=ShardLimits(max_entries_per_shard=10_000))
    shard.create_table("emb", configs.table_config(1))
    table = shard.table("emb")
    table.assign(np.arange(10_000), np.zeros((10_000, 1), np.float32))
    with pytest.raises(ResourceExhaustedError) as info:
        table.assign(np.arange(9_998, 10_005), np.ones((7, 1), np.float32))
    assert ("table 'emb': 5 new ids would make shard 0 hold 10,005 entries, above "
            "max_entries_per_shard=10,000") in str(info.value)
    assert table.size() == 10_000
    assert table.lookup([9_999])[0, 0] == 0.0  # the existing ids were not written either


# ---------------------------------------------------------------- bytes per shard


def test_bytes_per_shard_weighs_each_table_by_its_entry_layout() -> None:
    limit = 3 * SGD_DIM2_BYTES + ADAGRAD_DIM4_BYTES - 1  # 60 + 44 - 1 = 103
    with start_inprocess_server(max_bytes_per_shard=limit) as srv:
        stub = srv.stub
        make_table(stub, "t", configs.table_config(2))
        make_table(stub, "a", configs.table_config(4, optimizer=configs.adagrad()))
        assign(stub, "t", [1, 2, 3], np.ones((3, 2)), req_time=10)  # 60 bytes
        before = state(stub)
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: apply(stub, "a", [7, 7], np.ones((2, 4)), [0.1], req_time=99),
               "table 'a': 1 new ids (44 bytes) would make shard 0 hold 104 bytes of "
               "entries, above max_bytes_per_shard=103")
        assert state(stub) == before
        # Two more SGD entries: 60 + 40 = 100 <= 103.
        assign(stub, "t", [4, 5], np.ones((2, 2)))
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: assign(stub, "t", [6], np.ones((1, 2))),
               "1 new ids (20 bytes) would make shard 0 hold 120 bytes",
               "max_bytes_per_shard=103")
        assert lookup(stub, "t", [6]).tolist() == [[0.0, 0.0]]


def test_entry_bytes_and_count_new() -> None:
    shard = Shard()
    shard.create_table("t", configs.table_config(2))
    shard.create_table("a", configs.table_config(4, optimizer=configs.adagrad()))
    assert shard.table("t").entry_bytes == SGD_DIM2_BYTES == 20
    assert shard.table("a").entry_bytes == ADAGRAD_DIM4_BYTES == 44
    t = shard.table("t")
    t.assign([1, 2], np.ones((2, 2), np.float32))
    assert t.count_new([1, 2, 3, 3, 4, 1]) == 2
    assert t.count_new([]) == 0


def test_limits_set_later_apply_to_existing_tables() -> None:
    shard = Shard()
    shard.create_table("t", configs.table_config(2))
    shard.table("t").assign([1, 2], np.ones((2, 2), np.float32))
    shard.set_limits(ShardLimits(max_entries_per_shard=2))
    with pytest.raises(ResourceExhaustedError, match="hold 3 entries"):
        shard.table("t").assign([3], np.ones((1, 2), np.float32))
    shard.set_limits(ShardLimits())
    shard.table("t").assign([3], np.ones((1, 2), np.float32))
    assert shard.table("t").size() == 3


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_entries_per_shard and max_bytes_per_shard"):
        ShardLimits(max_bytes_per_shard=-1)
