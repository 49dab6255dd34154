"""Bulk requests and answers as protobuf wire bytes, written and read without copies.

A request with megabytes of ids and floats would be copied four times on its way
through protobuf objects (fancy-indexed array, ``tobytes``, the message's arena,
``SerializeToString``); each fresh buffer also costs page faults. Instead the
scalar part of a request is serialized by protobuf and every ``Tensor`` field is
appended by hand around its payload (``protos.tensor_wire``: protobuf allows fields
in any order, and concatenated encodings merge), so the payload is copied once, into
the final ``bytes``, at an aligned offset. Answers are read the same way: the float
payload of a ``Tensor`` field becomes a numpy view of the received bytes (aligned
when the shard aligned it). The bytes parse exactly as the message with those
fields set (``tests/unit/test_client_codec.py`` checks both directions).

Wire reminders: a key is ``field_number << 3 | wire_type``; ``Tensor{data = 1 (bytes),
shape = 2 (packed int64), align = 3 (filler)}``; wire type 2 = length-delimited,
0 = varint, 1 = 64-bit, 5 = 32-bit.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from protos.tensor_wire import FilledTensor, encode_filled
from ps_client.errors import PsInternal

_WIRE: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.int64): np.dtype("<i8"),
    np.dtype(np.float32): np.dtype("<f4"),
}
_F32 = np.dtype("<f4")
_LEN = 2


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise PsInternal("truncated varint in a shard's answer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


class Gather(NamedTuple):
    """The rows of ``array`` at ``positions`` (increasing, as
    :func:`ps_client.routing.partition` gives them): one shard's share of a batch."""

    array: npt.NDArray[Any]
    positions: npt.NDArray[np.int64]


def encode_request(head: Message, **tensors: npt.NDArray[Any] | Gather) -> bytes:
    """Wire bytes of ``head`` plus its ``Tensor`` fields named by the keywords.

    ``head`` holds the scalar fields (its tensor fields left unset); arrays must be
    ``int64`` (ids) or ``float32`` (values, grads). An array is written whole, keeping
    its shape; a :class:`Gather` as its selected rows, gathered straight into the
    request's bytes (``protos.tensor_wire.encode_filled``), so a shard's share of a
    batch is written once.
    """
    filled = []
    for name, tensor in tensors.items():
        arr, positions = (tensor.array, tensor.positions) if isinstance(tensor, Gather) else (
            tensor, None)
        wire = arr.astype(_WIRE[arr.dtype], copy=False)
        if positions is None or positions.shape[0] == wire.shape[0]:
            filled.append(FilledTensor(name, wire.shape, wire.dtype,
                                       functools.partial(np.copyto, src=wire)))
        else:
            filled.append(FilledTensor(name, (positions.shape[0], *wire.shape[1:]), wire.dtype,
                                       functools.partial(_gather, wire, positions)))
    return encode_filled(head, filled)


def _gather(arr: npt.NDArray[Any], positions: npt.NDArray[np.int64],
            out: npt.NDArray[Any]) -> None:
    # Rows move whole with np.take(axis=0): several times faster than fancy indexing;
    # "wrap" (every position is valid) spares the copy np.take makes into `out` when
    # it must check bounds.
    np.take(arr, positions, axis=0, out=out, mode="wrap")


def _fields(buf: bytes | memoryview, start: int, stop: int) -> dict[int, tuple[int, int]]:
    """``{field number: (start, stop)}`` of the length-delimited fields in ``buf[start:stop]``
    (last occurrence wins, as protobuf's merge does for singular fields)."""
    out: dict[int, tuple[int, int]] = {}
    pos = start
    while pos < stop:
        key, pos = _read_varint(buf, pos)
        wire_type = key & 7
        if wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            out[key >> 3] = (pos, pos + length)
            pos += length
        elif wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise PsInternal(f"unexpected wire type {wire_type} in a shard's answer")
    if pos != stop:
        raise PsInternal("a shard's answer is truncated")
    return out


def read_floats(
    buf: bytes, response: type[Message], name: str, count: int, what: str
) -> npt.NDArray[np.float32]:
    """The ``float32[count]`` payload of ``Tensor`` field ``name`` of a ``response``
    message encoded in ``buf``: a read-only view of ``buf``, no copy.

    :raises PsInternal: the field holds a different number of floats.
    """
    number = response.DESCRIPTOR.fields_by_name[name].number
    span = _fields(buf, 0, len(buf)).get(number)
    lo, hi = _fields(buf, *span).get(1, (0, 0)) if span else (0, 0)
    if hi - lo != count * 4:
        raise PsInternal(
            f"{what}: expected {count} float32 values ({count * 4} bytes), "
            f"the shard sent {hi - lo} bytes"
        )
    return np.frombuffer(buf, dtype=_F32, count=count, offset=lo).astype(np.float32, copy=False)


def read_rows(
    buf: bytes, response: type[Message], name: str, n: int, dim: int, what: str
) -> npt.NDArray[np.float32]:
    """:func:`read_floats` viewed as ``float32[n, dim]``."""
    return read_floats(buf, response, name, n * dim, what).reshape(n, dim)
