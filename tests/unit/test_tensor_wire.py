"""protos.tensor_wire: hand-framed Tensor fields parse as protobuf's, and large
payloads start at a multiple of 16 bytes into their message."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from protos.tensor_wire import ALIGN_MIN_BYTES, ALIGNMENT, tensor_frame, varint


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
