"""ps_server.codec at the wire level: bulk requests parsed without copies and answers
written by hand read exactly as protobuf reads and writes them."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from ps_server import codec
from ps_server.errors import BadTensorError

# small_bytes=0: every request takes the field-splitting path, however small.
LOOKUP = codec.BulkRequestParser(pb.LookupRequest, small_bytes=0)
APPLY = codec.BulkRequestParser(pb.ApplyGradientsRequest, small_bytes=0)


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def rebuilt(bulk: codec.BulkRequest[Message]) -> Message:
    """The message a BulkRequest stands for: its head with its tensors put back."""
    msg = type(bulk.head)()
    msg.CopyFrom(bulk.head)
    for name, t in bulk.tensors.items():
        getattr(msg, name).CopyFrom(pb.Tensor(data=bytes(t.data), shape=list(t.shape)))
    return msg


def assert_same(bulk: codec.BulkRequest[Message], want: Message) -> None:
    """``bulk`` holds what protobuf parsed into ``want`` (unknown fields inside a
    Tensor aside: nothing reads them)."""
    rest = type(want)()
    rest.CopyFrom(want)
    for f in want.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.name == "Tensor":
            t = getattr(want, f.name)
            got = bulk.tensor(f.name)
            assert (bytes(got.data), got.shape) == (t.data, tuple(t.shape)), f.name
            rest.ClearField(f.name)
    assert bulk.head == rest


def test_tensors_are_views_of_the_request_bytes() -> None:
    ids = np.array([7, -1, 2**62], dtype=np.int64)
    grads = np.array([[0.5, -1.0], [2.0, 0.25], [3.0, 4.0]], dtype=np.float32)
    request = pb.ApplyGradientsRequest(
        table="emb", ids=codec.encode_ids(ids), grads=codec.encode_floats(grads),
        learning_rates=[0.5], global_step=9, enable_dedup=True, req_time=4,
        tag=pb.RequestTag(client_id="c", seq=3),
    )
    buf = request.SerializeToString()
    bulk = APPLY(buf)
    # The small fields come back as a message; the tensors are left out of it.
    assert (bulk.head.table, list(bulk.head.learning_rates), bulk.head.global_step,
            bulk.head.enable_dedup, bulk.head.req_time, bulk.head.tag.seq) == (
        "emb", [0.5], 9, True, 4, 3)
    assert not bulk.head.HasField("ids") and not bulk.head.HasField("grads")
    assert bulk.tensor("ids").shape == (3,) and bulk.tensor("grads").shape == (3, 2)
    got_ids = codec.decode_ids(bulk.tensor("ids"))
    got_grads = codec.decode_floats(bulk.tensor("grads"), rows=3, dim=2)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_grads, grads)
    # No copy: the arrays live in the received bytes (so they are read-only).
    assert bulk.tensor("grads").data.obj is buf
    assert not got_ids.flags.writeable and not got_grads.flags.writeable
    assert rebuilt(bulk) == request


def test_small_requests_take_protobufs_path_with_the_same_result() -> None:
    parser = codec.BulkRequestParser(pb.LookupRequest)  # default threshold: 16 KiB
    small_ids = np.arange(3, dtype=np.int64)
    big_ids = np.arange(codec.SMALL_REQUEST_BYTES // 8, dtype=np.int64)
    for ids in (small_ids, big_ids):
        buf = pb.LookupRequest(table="t", ids=codec.encode_ids(ids)).SerializeToString()
        bulk = parser(buf)
        assert bulk.head == pb.LookupRequest(table="t")
        np.testing.assert_array_equal(codec.decode_ids(bulk.tensor("ids")), ids)
        # Only the big one is a view of the received bytes.
        assert (bulk.tensor("ids").data.obj is buf) == (ids is big_ids)


def test_unset_tensor_reads_as_empty() -> None:
    bulk = LOOKUP(pb.LookupRequest(table="t").SerializeToString())
    assert bulk.tensors == {}
    assert codec.decode_ids(bulk.tensor("ids")).shape == (0,)
    assert LOOKUP(b"").head == pb.LookupRequest()


def test_unpacked_shape_and_negative_dimensions() -> None:
    # Tensor{data: 8 zero bytes, shape: 1 as a lone varint (field 2, wire type 0)}.
    unpacked = field(2, field(1, bytes(8)) + b"\x10\x01")
    bulk = LOOKUP(unpacked)
    assert bulk.tensor("ids").shape == (1,)
    assert codec.decode_ids(bulk.tensor("ids")).tolist() == [0]
    # shape [-1]: a 10-byte varint (two's complement) inside a packed field.
    minus_one = varint(-1)
    assert len(minus_one) == 10
    negative = field(2, field(2, minus_one))
    assert LOOKUP(negative).tensor("ids").shape == (-1,)
    assert list(pb.LookupRequest.FromString(negative).ids.shape) == [-1]
    with pytest.raises(BadTensorError, match="negative"):
        codec.decode_ids(LOOKUP(negative).tensor("ids"))


def test_repeated_tensor_merges_like_protobuf() -> None:
    # Two occurrences of field 2 (ids): the second's data replaces the first's,
    # shapes are appended ([1] then [2] -> [1, 2]), as protobuf merges messages.
    first = field(1, np.int64(5).tobytes()) + field(2, varint(1))
    second = field(1, np.array([6, 7], dtype=np.int64).tobytes()) + field(2, varint(2))
    buf = field(1, b"t") + field(2, first) + field(2, second)
    bulk = LOOKUP(buf)
    assert bulk.tensor("ids").shape == (1, 2)
    assert bytes(bulk.tensor("ids").data) == np.array([6, 7], dtype=np.int64).tobytes()
    assert_same(bulk, pb.LookupRequest.FromString(buf))


def test_unknown_fields_are_kept_or_skipped_as_protobuf_does() -> None:
    # Outer: unknown varint field 99 and fixed64 field 98; inner: unknown field 9.
    inner = field(1, np.int64(3).tobytes()) + field(2, varint(1)) + varint(9 << 3) + b"\x05"
    buf = (varint(99 << 3) + b"\x2a" + field(2, inner) + varint(98 << 3 | 1) + bytes(8)
           + field(1, b"tbl"))
    bulk = LOOKUP(buf)
    assert bulk.head.table == "tbl"
    assert codec.decode_ids(bulk.tensor("ids")).tolist() == [3]
    assert bulk.head.SerializeToString() == pb.LookupRequest.FromString(
        varint(99 << 3) + b"\x2a" + varint(98 << 3 | 1) + bytes(8) + field(1, b"tbl")
    ).SerializeToString()
    # A group (wire types 3/4) takes protobuf's path and still parses the same.
    grouped = field(1, b"t") + varint(50 << 3 | 3) + varint(50 << 3 | 4) + field(2, inner)
    assert_same(LOOKUP(grouped), pb.LookupRequest.FromString(grouped))


@pytest.mark.parametrize("buf", [
    b"\xff\xff",                       # a varint that never ends
    b"\x12\x05abc",                    # ids longer than the message
    field(2, b"\x0a\x09" + bytes(3)),  # data longer than the tensor
    field(2, b"\x12\x02\x80"),         # a packed shape cut inside a varint
    b"\x1b\x00",                       # a group that is never closed
    field(1, b"\xff"),                 # a table name that is not UTF-8
])
def test_malformed_requests_fail_as_protobuf_fails(buf: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.LookupRequest.FromString(buf)
    with pytest.raises(DecodeError):
        LOOKUP(buf)


_TENSOR_FIELDS = {2: "ids", 3: "grads"}


@st.composite
def wire_fields(draw: st.DrawFn) -> bytes:
    """One field of an ApplyGradientsRequest encoding, valid or slightly off."""
    kind = draw(st.sampled_from(["tensor", "table", "step", "rates", "unknown", "junk"]))
    if kind == "tensor":
        inner = b""
        for _ in range(draw(st.integers(0, 3))):
            part = draw(st.sampled_from(["data", "packed", "unpacked", "unknown"]))
            if part == "data":
                inner += field(1, draw(st.binary(max_size=24)))
            elif part == "packed":
                dims = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
                inner += field(2, b"".join(varint(d) for d in dims))
            elif part == "unpacked":
                inner += b"\x10" + varint(draw(st.integers(0, 2**64 - 1)))
            else:
                inner += varint(7 << 3) + varint(draw(st.integers(0, 300)))
        return field(draw(st.sampled_from(sorted(_TENSOR_FIELDS))), inner)
    if kind == "table":
        return field(1, draw(st.text(max_size=5)).encode())
    if kind == "step":
        return varint(5 << 3) + varint(draw(st.integers(0, 2**64 - 1)))
    if kind == "rates":
        return field(4, np.array(draw(st.lists(st.floats(width=32), max_size=3)),
                                 dtype="<f4").tobytes())
    if kind == "unknown":
        return varint(draw(st.integers(16, 200)) << 3) + varint(draw(st.integers(0, 1000)))
    return draw(st.binary(min_size=1, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(wire_fields(), max_size=6), st.integers(0, 3))
# Found by this test: a field number 0 inside a Tensor was skipped, protobuf refuses it.
@example(fields=[b"\xf8", b"\x12\x04\x12\x02\x00\x00"], cut=0)
@example(fields=[b"\x00\x00"], cut=0)
def test_any_bytes_parse_as_protobuf_parses_them(fields: list[bytes], cut: int) -> None:
    buf = b"".join(fields)
    buf = buf[: len(buf) - cut] if cut < len(buf) else buf
    try:
        want = pb.ApplyGradientsRequest.FromString(buf)
    except DecodeError:
        with pytest.raises(DecodeError):
            APPLY(buf)
        return
    assert_same(APPLY(buf), want)


def test_encoded_answer_equals_protobuf_serialization() -> None:
    rows = np.array([[1.5, -2.0, 0.0], [3.0, 4.25, -0.5]], dtype=np.float32)
    ours = codec.encode_message(pb.LookupResponse(), values=rows)
    assert ours == pb.LookupResponse(values=codec.encode_floats(rows)).SerializeToString()
    # 1.5f is 0x3fc00000, little-endian on the wire: 00 00 c0 3f.
    assert ours[ours.index(b"\x00\x00\xc0\x3f"):][:4] == b"\x00\x00\xc0\x3f"
    back = pb.LookupResponse.FromString(ours)
    assert list(back.values.shape) == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(back.values.data, "<f4").reshape(2, 3), rows)


def test_encoded_answer_edge_cases() -> None:
    # No rows: shape [0, 4] and no data field, as protobuf writes it.
    empty = np.zeros((0, 4), dtype=np.float32)
    ours = codec.encode_message(pb.LookupResponse(), values=empty)
    assert ours == pb.LookupResponse(values=codec.encode_floats(empty)).SerializeToString()
    # A strided float64 array is written as contiguous float32 (0.1 -> float32(0.1)).
    strided = np.array([0.1, 9.0, 0.2, 9.0])[::2]
    ours = codec.encode_message(pb.FusedLookupResponse(), values=strided)
    back = pb.FusedLookupResponse.FromString(ours)
    assert np.frombuffer(back.values.data, "<f4").tolist() == [np.float32(0.1), np.float32(0.2)]
    # Head fields and int64 tensors: a request written by hand reads back whole.
    head = pb.LookupRequest(table="t")
    ids = np.array([1, -2], dtype=np.int64)
    assert pb.LookupRequest.FromString(codec.encode_message(head, ids=ids)) == pb.LookupRequest(
        table="t", ids=codec.encode_ids(ids))


def without_filler(message: Message) -> Message:
    """``message`` with the ``align`` filler of its tensors cleared."""
    for _, value in message.ListFields():
        if isinstance(value, pb.Tensor):
            assert set(value.align) <= {0}
            value.ClearField("align")
    return message


@pytest.mark.parametrize("shape", [(0, 4), (3, 2), (40_000, 8), (70_000,), (16_384, 1)])
def test_filled_answer_is_the_encoded_answer(shape: tuple[int, ...]) -> None:
    """Small answers are filled in an array and copied, large ones (>= 64 KiB of
    payload) in their own bytes: the same bytes as encode_message, which parse as
    protobuf's own message, the payload 16-byte aligned in the message when large."""
    values = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    seen: list[tuple[tuple[int, ...], bool]] = []

    def fill(out: np.ndarray) -> None:
        seen.append((out.shape, out.flags.c_contiguous and out.flags.writeable))
        out[...] = values

    ours = codec.encode_message_filled(pb.LookupResponse(), "values", shape, codec.FLOAT32, fill)
    assert type(ours) is bytes
    assert seen == [(shape, True)]
    assert ours == codec.encode_message(pb.LookupResponse(), values=values)
    want = pb.LookupResponse(values=codec.encode_floats(values))
    assert without_filler(pb.LookupResponse.FromString(ours)) == want
    if values.nbytes >= 1024:
        assert ours.index(values.tobytes()) % 16 == 0
    else:
        assert ours == want.SerializeToString()


def test_filled_answer_keeps_head_fields_and_int64() -> None:
    head = pb.LookupRequest(table="emb")
    ids = np.arange(-10_000, 10_000, dtype=np.int64) * 3  # 160,000 payload bytes
    ours = codec.encode_message_filled(head, "ids", ids.shape, codec.INT64,
                                       lambda out: np.copyto(out, ids))
    assert without_filler(pb.LookupRequest.FromString(ours)) == pb.LookupRequest(
        table="emb", ids=codec.encode_ids(ids))
    assert ours.index(ids.tobytes()) % 16 == 0
    # Two answers filled alike are equal values but distinct objects (never shared).
    again = codec.encode_message_filled(head, "ids", ids.shape, codec.INT64,
                                        lambda out: np.copyto(out, ids))
    assert again == ours and again is not ours


def test_to_wire_passes_bytes_and_serializes_messages() -> None:
    assert codec.to_wire(b"\x08\x01") == b"\x08\x01"
    assert codec.to_wire(pb.UpdateResponse(replayed=True)) == b"\x08\x01"
