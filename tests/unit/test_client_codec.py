"""The client's hand-written wire bytes equal what the generated classes produce and read."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_client._codec import ADOPT_MIN_BYTES, Gather, adopt, encode_request, read_floats, read_rows
from ps_client.errors import PsInternal


def test_encoded_request_parses_with_the_generated_class() -> None:
    ids = np.array([1, -1, 2**62, -(2**63)], dtype=np.int64)
    grads = np.arange(8, dtype=np.float32).reshape(4, 2)
    head = pb.ApplyGradientsRequest(table="t", learning_rates=[0.5, 0.25], global_step=7,
                                    enable_dedup=True, req_time=3,
                                    tag=pb.RequestTag(client_id="c", seq=9))
    msg = pb.ApplyGradientsRequest.FromString(encode_request(head, ids=ids, grads=grads))
    assert (msg.table, list(msg.learning_rates), msg.global_step, msg.enable_dedup,
            msg.req_time, msg.tag.seq) == ("t", [0.5, 0.25], 7, True, 3, 9)
    assert msg.ids.data == ids.astype("<i8").tobytes() and list(msg.ids.shape) == [4]
    assert msg.grads.data == grads.astype("<f4").tobytes()
    assert list(msg.grads.shape) == [4, 2]


def test_encoded_request_equals_protobuf_serialization() -> None:
    ids = np.array([5, 6], dtype=np.int64)
    ours = encode_request(pb.LookupRequest(table="emb"), ids=ids)
    theirs = pb.LookupRequest(table="emb", ids=pb.Tensor(data=ids.tobytes(), shape=[2]))
    assert ours == theirs.SerializeToString()


def test_empty_and_non_contiguous_arrays() -> None:
    ids = np.arange(10, dtype=np.int64)[::3]  # a strided view: 0, 3, 6, 9
    msg = pb.LookupRequest.FromString(encode_request(pb.LookupRequest(table="x"), ids=ids))
    assert np.frombuffer(msg.ids.data, dtype="<i8").tolist() == [0, 3, 6, 9]
    empty = pb.LookupRequest.FromString(
        encode_request(pb.LookupRequest(table="x"), ids=np.zeros(0, dtype=np.int64)))
    assert empty.ids.data == b"" and list(empty.ids.shape) == [0]
    no_rows = pb.AssignRequest.FromString(encode_request(
        pb.AssignRequest(table="x"), values=np.zeros((0, 5), dtype=np.float32)))
    assert no_rows.values.data == b"" and list(no_rows.values.shape) == [0, 5]


def test_read_floats_views_the_answer() -> None:
    rows = np.array([[1.5, -2.0], [3.0, 4.25]], dtype=np.float32)
    buf = pb.LookupResponse(values=pb.Tensor(data=rows.tobytes(), shape=[2, 2])).SerializeToString()
    got = read_rows(buf, pb.LookupResponse, "values", 2, 2, "Lookup")
    assert got.tolist() == rows.tolist()
    with pytest.raises(PsInternal, match="expected 6 float32 values"):
        read_floats(buf, pb.LookupResponse, "values", 6, "Lookup")
    assert read_floats(b"", pb.LookupResponse, "values", 0, "Lookup").shape == (0,)


@pytest.mark.parametrize("rows", [4, 40_000])  # 48 bytes / 480 KB: joined / filled in place
def test_gathered_tensors_hold_the_selected_rows(rows: int) -> None:
    values = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)  # row k = [3k, 3k+1, 3k+2]
    ids = np.arange(rows, dtype=np.int64) * -7  # id of row k = -7k
    pick = np.array([0, 2, 3], dtype=np.int64)
    msg = pb.AssignRequest.FromString(encode_request(
        pb.AssignRequest(table="t"), ids=Gather(ids, pick), values=Gather(values, pick)))
    assert np.frombuffer(msg.ids.data, "<i8").tolist() == [0, -14, -21]
    assert np.frombuffer(msg.values.data, "<f4").reshape(3, 3).tolist() == [
        [0, 1, 2], [6, 7, 8], [9, 10, 11]]
    assert list(msg.ids.shape) == [3] and list(msg.values.shape) == [3, 3]
    # Every position, in order: the whole array; no position: an empty tensor.
    every = pb.AssignRequest.FromString(encode_request(
        pb.AssignRequest(), values=Gather(values, np.arange(rows, dtype=np.int64))))
    assert every.values.data == values.tobytes()
    none = pb.AssignRequest.FromString(encode_request(
        pb.AssignRequest(), values=Gather(values, np.zeros(0, dtype=np.int64))))
    assert none.values.data == b"" and list(none.values.shape) == [0, 3]


def test_large_tensors_start_aligned_and_read_back_aligned() -> None:
    """Every payload of 1 KiB or more starts 16-byte aligned in the message (after an
    ``align`` filler), so the shard views it in place at full speed; answers framed
    the same way are read in place, aligned."""
    ids = np.arange(1000, dtype=np.int64) - 500
    grads = np.linspace(-1, 1, 1000 * 3, dtype=np.float32).reshape(1000, 3)
    head = pb.ApplyGradientsRequest(table="a-table", learning_rates=[0.5], global_step=2)
    buf = encode_request(head, ids=ids, grads=grads)
    assert buf.index(ids.tobytes()) % 16 == 0 and buf.index(grads.tobytes()) % 16 == 0
    msg = pb.ApplyGradientsRequest.FromString(buf)
    assert msg.ids.align and msg.grads.align and set(msg.ids.align + msg.grads.align) == {0}
    assert (msg.table, list(msg.learning_rates), msg.global_step) == ("a-table", [0.5], 2)
    assert msg.ids.data == ids.tobytes() and list(msg.ids.shape) == [1000]
    assert msg.grads.data == grads.tobytes() and list(msg.grads.shape) == [1000, 3]

    answer = encode_request(pb.LookupResponse(), values=grads)
    rows = read_rows(answer, pb.LookupResponse, "values", 1000, 3, "Lookup")
    np.testing.assert_array_equal(rows, grads)
    assert rows.base is not None and (rows.ctypes.data - np.frombuffer(answer, np.uint8).ctypes.data
                                      ) % 16 == 0


def test_adopted_answer_is_writable_in_place_and_keeps_its_bytes() -> None:
    values = np.linspace(-1, 1, 4096 * 8, dtype=np.float32).reshape(4096, 8)
    answer = encode_request(pb.LookupResponse(), values=values)
    rows = read_rows(answer, pb.LookupResponse, "values", 4096, 8, "Lookup")
    mine = adopt(rows, answer)
    assert mine is not None and mine.flags.writeable and mine.flags.c_contiguous
    assert mine.ctypes.data == rows.ctypes.data  # the same memory: no copy
    np.testing.assert_array_equal(mine, values)
    del answer, rows
    gc.collect()
    mine[0, 0] = 5.0  # the bytes are still alive, held by the array
    assert mine[0, 0] == 5.0
    part = mine[10:20]
    del mine
    gc.collect()
    np.testing.assert_array_equal(part, values[10:20])


def test_adopt_declines_small_foreign_or_unaligned_views() -> None:
    small = np.arange(16, dtype=np.float32)
    answer = encode_request(pb.LookupResponse(), values=small)
    rows = read_rows(answer, pb.LookupResponse, "values", 16, 1, "Lookup")
    assert adopt(rows, answer) is None  # under ADOPT_MIN_BYTES: the caller copies
    big = np.zeros(ADOPT_MIN_BYTES, dtype=np.uint8)
    other = bytes(ADOPT_MIN_BYTES + 8)
    assert adopt(np.frombuffer(other, np.float32), bytearray(other)) is None  # type: ignore[arg-type]
    assert adopt(np.frombuffer(big.tobytes(), np.float32), other) is None  # not a view of it
    assert adopt(np.frombuffer(other, np.uint8)[1:-7].view(np.float32), other) is None
