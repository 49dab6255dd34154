"""protos.wire, the wire format both ends write and read by hand: varints (scalar and
batched), the field scanner, Tensor framing (hand-framed Tensor fields parse as
protobuf's, and large payloads start at a multiple of 16 bytes into their message),
wire dtypes, id and row coercion, rows as opaque items.

Each side's own use of them is tested with that side: ``test_codec.py`` and
``test_wire_codec.py`` (the shard), ``test_client_codec.py`` and ``test_routing.py``
(the client)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from protos import wire
from protos.wire import ALIGN_MIN_BYTES, ALIGNMENT, tensor_frame, varint


def framed(head: pb.LookupRequest, payload: bytes, shape: list[int]) -> tuple[bytes, int]:
    """``head`` serialized, then field ``ids`` framed around ``payload``; and where
    the payload starts."""
    lead = head.SerializeToString()
    before, after = tensor_frame(2, shape, len(payload), len(lead))
    return lead + before + payload + after, len(lead) + len(before)


def test_varint_examples() -> None:
    # 300 = 0b1_0010_1100: low 7 bits 0x2c with the continuation bit, then 0b10.
    assert varint(0) == b"\x00" and varint(1) == b"\x01" and varint(127) == b"\x7f"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes, as protobuf


def test_small_payload_is_protobufs_own_encoding() -> None:
    ids = np.arange(-3, 5, dtype="<i8")
    msg, start = framed(pb.LookupRequest(table="t"), ids.tobytes(), [8])
    want = pb.LookupRequest(table="t", ids=pb.Tensor(data=ids.tobytes(), shape=[8]))
    assert msg == want.SerializeToString()
    assert msg[start:start + ids.nbytes] == ids.tobytes()


@settings(max_examples=300, deadline=None)
@given(
    name_len=st.integers(0, 200),
    count=st.sampled_from([127, 128, 129, 130, 1000, 4095, 16384, 70000]),
)
def test_large_payload_starts_aligned_and_parses(name_len: int, count: int) -> None:
    ids = (np.arange(count, dtype="<i8") * 7919) - 123
    head = pb.LookupRequest(table="x" * name_len)
    msg, start = framed(head, ids.tobytes(), [count])
    assert msg[start:start + ids.nbytes] == ids.tobytes()
    back = pb.LookupRequest.FromString(msg)
    assert back.table == head.table
    assert back.ids.data == ids.tobytes() and list(back.ids.shape) == [count]
    if ids.nbytes >= ALIGN_MIN_BYTES:
        assert start % ALIGNMENT == 0
        # The filler is zeros and the smallest that aligns (2..17 bytes with its key).
        assert set(back.ids.align) <= {0} and len(back.ids.align) + 2 <= ALIGNMENT + 1
    else:
        assert back.ids.align == b""


@pytest.mark.parametrize("offset", range(0, 40))
def test_every_offset_aligns_a_two_dimensional_payload(offset: int) -> None:
    rows = np.ones((512, 4), dtype="<f4")  # 8 KiB
    before, after = tensor_frame(1, rows.shape, rows.nbytes, offset)
    assert (offset + len(before)) % ALIGNMENT == 0
    back = pb.LookupResponse.FromString(bytes(before) + rows.tobytes() + after)
    assert list(back.values.shape) == [512, 4] and back.values.data == rows.tobytes()


def test_empty_payload_has_no_data_and_no_filler() -> None:
    before, after = tensor_frame(1, [0, 4], 0, 3)
    # Inner length 4: the shape field alone (key 0x12, length 2, dims 0 and 4).
    assert before == b"\x0a\x04" and after == b"\x12\x02\x00\x04"


# ---------------------------------------------------------------- varints


def test_keys_and_reading_varints_back() -> None:
    assert wire.key(1, wire.WIRE_LEN) == b"\x0a" and wire.key(4, wire.WIRE_VARINT) == b"\x20"
    assert wire.key(16, wire.WIRE_I32) == b"\x85\x01"  # 16 << 3 | 5 = 133
    # read_varint returns the value as uint64 and the position after it.
    assert wire.read_varint(b"\x00\xac\x02\x07", 1, 4) == (300, 3)
    assert wire.read_varint(varint(-1), 0, 10) == (2**64 - 1, 10)


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1))
def test_varint_round_trip(n: int) -> None:
    buf = b"\x55" + varint(n) + b"\x66"
    assert wire.read_varint(buf, 1, len(buf)) == (n % 2**64, len(buf) - 1)
    assert len(varint(n)) == int(wire.varint_lengths(np.array([n % 2**64], np.uint64))[0])


@pytest.mark.parametrize("buf", [b"", b"\x80", b"\xff\xff", b"\xff" * 10 + b"\x01"])
def test_truncated_or_overlong_varints_are_wire_errors(buf: bytes) -> None:
    with pytest.raises(wire.WireError, match="varint"):
        wire.read_varint(buf, 0, len(buf))
    # The limit is ``end``, not the buffer's length.
    with pytest.raises(wire.WireError):
        wire.read_varint(b"\xac\x02", 0, 1)


def test_skip_value_by_wire_type() -> None:
    buf = b"\xac\x02" + bytes(8)
    assert wire.skip_value(buf, wire.WIRE_VARINT, 0, len(buf)) == 2
    assert wire.skip_value(buf, wire.WIRE_I64, 2, len(buf)) == 10
    assert wire.skip_value(buf, wire.WIRE_I32, 2, len(buf)) == 6
    assert wire.skip_value(b"\x03abc", wire.WIRE_LEN, 0, 4) == 4
    with pytest.raises(wire.WireError, match="past the end"):
        wire.skip_value(b"\x05abc", wire.WIRE_LEN, 0, 4)
    with pytest.raises(wire.WireError, match="past the end"):
        wire.skip_value(buf, wire.WIRE_I64, 4, len(buf))
    with pytest.raises(wire.WireError, match="wire type 3"):  # a group
        wire.skip_value(buf, 3, 0, len(buf))


def test_batched_varints_write_and_read_what_varint_writes() -> None:
    signed = np.array([0, 1, 127, 128, 300, 2**35, 2**63 - 1, -1, -(2**63)], dtype=np.int64)
    values = wire.as_u64(signed)
    assert values.dtype == np.uint64 and int(values[7]) == 2**64 - 1
    lengths = wire.varint_lengths(values)
    assert lengths.tolist() == [len(varint(int(v))) for v in signed] == [1, 1, 1, 2, 2, 6, 9,
                                                                          10, 10]
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        rec = np.full((rows.size, length + 2), 0xEE, np.uint8)
        assert wire.put_varints(rec, 1, values[rows], length) == length + 1
        for r, i in enumerate(rows.tolist()):
            assert rec[r].tobytes() == b"\xee" + varint(int(signed[i])) + b"\xee"
        back = wire.varint_values(rec[:, 1 : length + 1])
        assert back.view(np.int64).tolist() == signed[rows].tolist()


# ---------------------------------------------------------------- field scanner


def lfield(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


_LOOKUP_TENSORS = {2}  # LookupRequest.ids


def test_split_tensors_views_data_and_reads_the_shape() -> None:
    ids = np.arange(-3, 3, dtype="<i8")
    msg = pb.LookupRequest(table="t", ids=pb.Tensor(data=ids.tobytes(), shape=[2, 3]))
    buf = msg.SerializeToString()
    tensors, rest = wire.split_tensors(buf, _LOOKUP_TENSORS)
    t = tensors[2]
    assert t.shape == (2, 3) and bytes(t.data) == ids.tobytes()
    assert t.data.obj is buf  # a view, no copy
    assert pb.LookupRequest.FromString(b"".join(rest)) == pb.LookupRequest(table="t")
    # Absent tensor fields are absent; an empty message is empty.
    assert wire.split_tensors(pb.LookupRequest(table="t").SerializeToString(),
                              _LOOKUP_TENSORS)[0] == {}
    assert wire.split_tensors(b"", _LOOKUP_TENSORS) == ({}, [])


def test_split_tensors_shape_packed_unpacked_and_negative() -> None:
    unpacked = lfield(2, lfield(1, bytes(8)) + b"\x10\x01")
    assert wire.split_tensors(unpacked, _LOOKUP_TENSORS)[0][2].shape == (1,)
    negative = lfield(2, lfield(2, varint(-1) + varint(4)))
    assert wire.split_tensors(negative, _LOOKUP_TENSORS)[0][2].shape == (-1, 4)
    assert list(pb.LookupRequest.FromString(negative).ids.shape) == [-1, 4]


def test_split_tensors_merges_repeated_occurrences_like_protobuf() -> None:
    # data replaced by the later occurrence, shape appended, align and unknown skipped.
    first = lfield(1, np.int64(5).tobytes()) + lfield(2, varint(1)) + lfield(3, bytes(4))
    second = lfield(1, np.array([6, 7], "<i8").tobytes()) + lfield(2, varint(2)) + b"\x48\x05"
    third = lfield(2, varint(9))  # no data: the earlier data stays
    buf = lfield(1, b"t") + lfield(2, first) + lfield(2, second) + lfield(2, third)
    t = wire.split_tensors(buf, _LOOKUP_TENSORS)[0][2]
    want = pb.LookupRequest.FromString(buf).ids
    assert (bytes(t.data), t.shape) == (want.data, tuple(want.shape)) == (
        np.array([6, 7], "<i8").tobytes(), (1, 2, 9))


def test_split_tensors_keeps_every_other_field_in_order() -> None:
    unknown = varint(99 << 3) + b"\x2a" + varint(98 << 3 | 1) + bytes(8) + varint(97 << 3 | 5)
    unknown += bytes(4)
    buf = lfield(1, b"tbl") + lfield(2, lfield(1, bytes(8))) + unknown
    tensors, rest = wire.split_tensors(memoryview(buf), _LOOKUP_TENSORS)
    assert b"".join(rest) == lfield(1, b"tbl") + unknown
    assert bytes(rest[0]) == lfield(1, b"tbl") and len(rest) == 4
    assert bytes(tensors[2].data) == bytes(8)


@pytest.mark.parametrize("buf", [
    b"\xff\xff",                        # a varint that never ends
    b"\x12\x05abc",                     # ids longer than the message
    lfield(2, b"\x0a\x09" + bytes(3)),  # data longer than the tensor
    lfield(2, b"\x12\x02\x80"),        # a packed shape cut inside a varint
    lfield(2, b"\x12\x05\x01"),        # a packed shape longer than the tensor
    b"\x1b\x00",                        # a group
    b"\x0d\x00",                        # a fixed32 cut short
])
def test_split_tensors_rejects_malformed_bytes(buf: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.split_tensors(buf, _LOOKUP_TENSORS)


@settings(max_examples=200, deadline=None)
@given(
    table=st.text(max_size=8),
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    framed=st.booleans(),
)
def test_split_tensors_reads_what_protobuf_and_tensor_frame_write(
    table: str, ids: list[int], shape: list[int], framed: bool
) -> None:
    payload = np.array(ids, dtype="<i8").tobytes()
    head = pb.LookupRequest(table=table)
    if framed:  # our framing: align filler, data, shape
        lead = head.SerializeToString()
        before, after = tensor_frame(2, shape, len(payload), len(lead))
        buf = lead + before + payload + after
    else:
        buf = pb.LookupRequest(
            table=table, ids=pb.Tensor(data=payload, shape=shape)).SerializeToString()
    tensors, rest = wire.split_tensors(buf, _LOOKUP_TENSORS)
    want = pb.LookupRequest.FromString(buf)
    got = tensors.get(2, wire.WireTensor(memoryview(b""), ()))
    assert (bytes(got.data), got.shape) == (want.ids.data, tuple(want.ids.shape))
    assert pb.LookupRequest.FromString(b"".join(rest)) == head


# ---------------------------------------------------------------- filling in place


@pytest.mark.parametrize("rows", [3, 4096])  # 48 bytes joined / 64 KiB filled in place
def test_encode_filled_writes_each_payload_once_into_its_frame(rows: int) -> None:
    ids = np.arange(rows, dtype="<i8") - 7
    values = np.arange(rows * 4, dtype="<f4").reshape(rows, 4)
    out = wire.encode_filled(pb.AssignRequest(table="t"), [
        wire.FilledTensor("ids", ids.shape, wire.INT64, lambda a: np.copyto(a, ids)),
        wire.FilledTensor("values", values.shape, wire.FLOAT32, lambda a: np.copyto(a, values)),
    ])
    assert type(out) is bytes
    msg = pb.AssignRequest.FromString(out)
    assert msg.table == "t"
    assert msg.ids.data == ids.tobytes() and list(msg.ids.shape) == [rows]
    assert msg.values.data == values.tobytes() and list(msg.values.shape) == [rows, 4]
    if values.nbytes >= wire.FILL_IN_PLACE_BYTES:
        assert out.index(values.tobytes()) % ALIGNMENT == 0


# ---------------------------------------------------------------- dtypes


def test_wire_dtypes_are_little_endian() -> None:
    assert wire.INT64.str == "<i8" and wire.FLOAT32.str == "<f4"
    assert wire.WIRE_DTYPES[np.dtype(np.int64)] == wire.INT64
    assert wire.WIRE_DTYPES[np.dtype(np.float32)] == wire.FLOAT32
    assert np.dtype(np.float64) not in wire.WIRE_DTYPES


# ---------------------------------------------------------------- ids and rows


class ShapeError(Exception):
    pass


class ValueErr(Exception):
    pass


_ERRS = wire.Errors(value=ValueErr, shape=ShapeError)


def test_as_ids_converts_int_likes() -> None:
    ids = np.array([1, -2], dtype=np.int64)
    assert wire.as_ids(ids) is ids  # int64 passes through untouched
    assert wire.as_ids(7).tolist() == [7]
    assert wire.as_ids(np.array([1, 2], dtype=np.uint8)).dtype == np.int64
    assert wire.as_ids([3.0, -2.0]).tolist() == [3, -2]
    assert wire.as_ids(np.array([2**63 - 1], dtype=np.uint64)).tolist() == [2**63 - 1]
    assert wire.as_ids([]).dtype == np.int64 and wire.as_ids([]).shape == (0,)


@pytest.mark.parametrize(("ids", "error", "match"), [
    ([[1, 2]], ShapeError, "1-D"),
    ([[1], [2, 3]], ValueErr, "1-D array of int64 ids"),  # ragged
    ([True, False], ValueErr, "integers"),
    (np.array([2**63], dtype=np.uint64), ValueErr, "int64 range"),
    ([1.5], ValueErr, "whole numbers"),
    ([float("nan")], ValueErr, "whole numbers"),
    ([2.0**63], ValueErr, "int64 range"),
    (np.array(["1"]), ValueErr, "integers"),
    (np.array([1, 2], dtype=object), ValueErr, "integers"),
])
def test_as_ids_raises_the_callers_errors(ids: object, error: type[Exception],
                                          match: str) -> None:
    with pytest.raises(error, match=match):
        wire.as_ids(ids, errors=_ERRS)
    with pytest.raises(ValueError, match=match):  # the default: ValueError
        wire.as_ids(ids)


def test_as_ids_convert_other() -> None:
    assert wire.as_ids(np.array([1, 2], dtype=object), convert_other=True).tolist() == [1, 2]
    assert wire.as_ids(np.array(["12"]), convert_other=True).tolist() == [12]
    with pytest.raises(ValueErr, match="not convertible"):
        wire.as_ids(np.array([2**70], dtype=object), errors=_ERRS, convert_other=True)
    with pytest.raises(ValueErr, match="integers"):  # booleans never
        wire.as_ids([True], errors=_ERRS, convert_other=True)


def test_both_sides_raise_their_own_types() -> None:
    from ps_client.errors import PsInvalidArgument
    from ps_client.routing import as_ids as client_ids
    from ps_client.routing import as_rows as client_rows
    from ps_server.engine.types import as_ids as server_ids
    from ps_server.engine.types import as_rows_matrix as server_rows
    from ps_server.errors import BadTensorError, DimMismatchError

    for good in ([1, 2], 5, [2.0], np.array([3], dtype=np.uint32)):
        assert client_ids(good).tolist() == server_ids(good).tolist()
    with pytest.raises(PsInvalidArgument, match="1-D"):
        client_ids([[1]])
    with pytest.raises(DimMismatchError, match="1-D"):
        server_ids([[1]])
    with pytest.raises(PsInvalidArgument, match="whole numbers"):
        client_ids([0.5])
    with pytest.raises(BadTensorError, match="whole numbers"):
        server_ids([0.5])
    assert server_ids(np.array([4], dtype=object)).tolist() == [4]
    with pytest.raises(PsInvalidArgument, match="integers"):
        client_ids(np.array([4], dtype=object))
    with pytest.raises(PsInvalidArgument, match=r"\[2, 3\]"):
        client_rows(np.zeros((2, 2)), 2, 3)
    with pytest.raises(DimMismatchError, match=r"\[2, 3\]"):
        server_rows(np.zeros((2, 2)), 2, 3)
    with pytest.raises(BadTensorError, match="float32-convertible"):
        server_rows([["x"]], 1, 1)


def test_as_rows_reshapes_flat_and_keeps_float32_rows() -> None:
    rows = np.ones((2, 3), dtype=np.float32)
    assert wire.as_rows(rows, 2, 3) is rows
    assert wire.as_rows([1, 2, 3, 4], 2, 2).tolist() == [[1, 2], [3, 4]]
    assert wire.as_rows(np.zeros((2, 2), np.float64), 2, 2).dtype == np.float32
    with pytest.raises(ShapeError, match=r"\[2, 3\] \(one row of dim 3 per id\), got \(2, 2\)"):
        wire.as_rows(np.zeros((2, 2)), 2, 3, errors=_ERRS)
    with pytest.raises(ValueErr, match="float32-convertible"):
        wire.as_rows([["a"]], 1, 1, errors=_ERRS)


def test_row_items_views_each_row_as_one_item() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    items = wire.row_items(arr)
    assert items is not None and items.shape == (3,) and items.dtype.itemsize == 16
    dst = np.zeros((5, 4), np.float32)
    dst_items = wire.row_items(dst)
    assert dst_items is not None
    np.put(dst_items, [4, 0, 2], items)  # one memcpy per row, into dst itself
    assert dst[[4, 0, 2]].tolist() == arr.tolist() and dst[[1, 3]].sum() == 0
    cube = wire.row_items(np.zeros((2, 2, 3), np.int64))
    assert cube is not None and cube.shape == (2,) and cube.dtype.itemsize == 48
    assert wire.row_items(arr[:, 1:3]) is None  # strided
    assert wire.row_items(arr[0]) is None  # 1-D
    assert wire.row_items(np.zeros((3, 0), np.float32)) is None
    assert wire.row_items(np.zeros((0, 4), np.float32)) is None
