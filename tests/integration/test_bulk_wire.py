"""Bulk RPCs above ``codec.SMALL_REQUEST_BYTES`` through a real server.

Requests this big take the zero-copy path (tensors viewed in the received bytes)
and answers are written by hand (``codec.encode_message_filled``: rows gathered
straight into the answer's bytes, at a 16-byte aligned offset); small requests take
protobuf's path. Both must give what the generated classes would: the answers parse
as protobuf's message with the same fields (plus the ``align`` filler), and values
are worked out by hand (SGD: ``w -= lr * g`` in float32, docs/semantics.md §4.2).
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_server import codec
from ps_server.engine import configs
from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.integration

f32 = np.float32
N = 4096  # 32 KiB of ids: above the 16 KiB threshold
DIM = 2


def tensor(arr: Any, dtype: str) -> pb.Tensor:
    a = np.asarray(arr, dtype=dtype)
    return pb.Tensor(data=a.tobytes(), shape=list(a.shape))


def raw_call(server: RunningServer, method: str, request: Any) -> bytes:
    """The answer's wire bytes, as the shard sent them."""
    call = server.channel.unary_unary(f"/monolith_ps.ParameterServer/{method}")
    answer: bytes = call(request.SerializeToString(), timeout=30)
    return answer


def assert_answer(got: bytes, want: Any) -> None:
    """``got`` parses as ``want`` plus a zero ``align`` filler, and its payload is
    aligned where it arrived: numpy can read it in place at full speed."""
    back = type(want).FromString(got)
    assert set(back.values.align) <= {0} and back.values.align
    back.values.ClearField("align")
    assert back == want
    offset = got.index(want.values.data)
    assert offset % 16 == 0
    view = np.frombuffer(got, dtype="<f4", count=len(want.values.data) // 4, offset=offset)
    assert view.flags.aligned and view.ctypes.data % 16 == 0


def test_big_requests_answer_as_protobuf_would(server: RunningServer) -> None:
    stub = server.stub
    assert len(pb.LookupRequest(table="t", ids=tensor(np.zeros(N), "<i8")).SerializeToString()
               ) >= codec.SMALL_REQUEST_BYTES
    stub.CreateTable(pb.CreateTableRequest(
        name="t", config=configs.table_config(DIM).SerializeToString()))
    ids = np.arange(N, dtype=np.int64) * 7 - 9000  # negative ids too
    i = np.arange(N, dtype=np.float32)
    values = np.stack([i * f32(0.5), -i], axis=1)  # row k = [k / 2, -k]
    stub.Assign(pb.AssignRequest(table="t", ids=tensor(ids, "<i8"), values=tensor(values, "<f4")))

    # Lookup: the rows assigned, in a message identical to protobuf's own encoding.
    got = raw_call(server, "Lookup", pb.LookupRequest(table="t", ids=tensor(ids, "<i8")))
    assert_answer(got, pb.LookupResponse(values=tensor(values, "<f4")))
    # A small request (protobuf's path) reads the same rows.
    small = stub.Lookup(pb.LookupRequest(table="t", ids=tensor(ids[[5, 0]], "<i8"))).values
    assert np.frombuffer(small.data, "<f4").reshape(2, DIM).tolist() == [[2.5, -5.0], [0.0, 0.0]]

    # ApplyGradients, SGD with lr 0.25 and g = [1, 2]: w = [k/2 - 0.25, -k - 0.5].
    grads = np.tile(np.array([1.0, 2.0], dtype=np.float32), (N, 1))
    stub.ApplyGradients(pb.ApplyGradientsRequest(
        table="t", ids=tensor(ids, "<i8"), grads=tensor(grads, "<f4"), learning_rates=[0.25],
        global_step=1))
    lr = f32(0.25)
    want = np.stack([i * f32(0.5) - lr * f32(1), -i - lr * f32(2)], axis=1)
    assert want[3].tolist() == [1.25, -3.5]
    got = raw_call(server, "Lookup", pb.LookupRequest(table="t", ids=tensor(ids, "<i8")))
    assert_answer(got, pb.LookupResponse(values=tensor(want, "<f4")))

    # FusedLookup of one block of every id: the same rows, flattened.
    got = raw_call(server, "FusedLookup", pb.FusedLookupRequest(
        tables=["t"], blocks=[pb.FusedBlock(table_index=0, num_ids=N)], ids=tensor(ids, "<i8")))
    assert_answer(got, pb.FusedLookupResponse(values=tensor(want.reshape(-1), "<f4")))


def test_big_bad_tensor_is_refused_like_a_small_one(server: RunningServer) -> None:
    stub = server.stub
    stub.CreateTable(pb.CreateTableRequest(
        name="t", config=configs.table_config(DIM).SerializeToString()))
    ids = np.arange(N, dtype=np.int64)
    for n in (N, 3):  # zero-copy path, then protobuf's path
        bad = pb.Tensor(data=ids[:n].tobytes(), shape=[n + 1])
        with pytest.raises(grpc.RpcError) as info:
            stub.Lookup(pb.LookupRequest(table="t", ids=bad))
        err: Any = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"ids: {8 * n} bytes is not {n + 1} x int64" in err.details()
