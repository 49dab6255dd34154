"""Bulk requests and answers as protobuf wire bytes, written and read without copies.

A request with megabytes of ids and floats would be copied four times on its way
through protobuf objects (fancy-indexed array, ``tobytes``, the message's arena,
``SerializeToString``); each fresh buffer also costs page faults. Instead the
scalar part of a request is serialized by protobuf and every ``Tensor`` field is
appended by hand around its payload (``protos.wire``: protobuf allows fields
in any order, and concatenated encodings merge), so the payload is copied once, into
the final ``bytes``, at an aligned offset. Answers are read the same way: the float
payload of a ``Tensor`` field becomes a numpy view of the received bytes (aligned
when the shard aligned it). The bytes parse exactly as the message with those
fields set (``tests/unit/test_client_codec.py`` checks both directions).

Framing, the field scanner and the wire dtypes are ``protos.wire``'s, shared with
the shard.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from protos.wire import (
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    WIRE_DTYPES,
    FilledTensor,
    WireError,
    encode_filled,
    split_tensors,
    widen,
)
from ps_client.errors import PsInternal

#: Array dtype -> wire dtype of a request's tensors: :data:`protos.wire.WIRE_DTYPES`
#: plus the 2-byte forms of the half-size wire (``protos.wire.narrow`` makes them).
_REQUEST_WIRE: dict[np.dtype[Any], np.dtype[Any]] = {
    **WIRE_DTYPES, FLOAT16: FLOAT16, BFLOAT16: BFLOAT16,
}


class Gather(NamedTuple):
    """The rows of ``array`` at ``positions`` (increasing, as
    :func:`ps_client.routing.partition` gives them): one shard's share of a batch."""

    array: npt.NDArray[Any]
    positions: npt.NDArray[np.int64]


def encode_request(head: Message, **tensors: npt.NDArray[Any] | Gather) -> bytes:
    """Wire bytes of ``head`` plus its ``Tensor`` fields named by the keywords.

    ``head`` holds the scalar fields (its tensor fields left unset); arrays must be
    ``int64`` (ids) or ``float32`` (values, grads), or a half-size wire form
    (``protos.wire.FLOAT16`` / ``BFLOAT16``), written as it is. An array is written whole, keeping
    its shape; a :class:`Gather` as its selected rows, gathered straight into the
    request's bytes (``protos.wire.encode_filled``), so a shard's share of a
    batch is written once.
    """
    filled = []
    for name, tensor in tensors.items():
        arr, positions = (tensor.array, tensor.positions) if isinstance(tensor, Gather) else (
            tensor, None)
        wire = arr.astype(_REQUEST_WIRE[arr.dtype], copy=False)
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


def read_floats(
    buf: bytes, response: type[Message], name: str, count: int, what: str,
    wire: np.dtype[Any] = FLOAT32,
) -> npt.NDArray[np.float32]:
    """The ``float32[count]`` payload of ``Tensor`` field ``name`` of a ``response``
    message encoded in ``buf``: a read-only view of ``buf``, no copy; or, when the
    floats travel in a half-size ``wire`` form, a new array of them widened (exactly).

    :raises PsInternal: the field holds a different number of floats, or ``buf`` is
        not a well-formed message.
    """
    number = response.DESCRIPTOR.fields_by_name[name].number
    try:
        tensor = split_tensors(buf, (number,))[0].get(number)
    except WireError as e:
        raise PsInternal(f"{what}: the shard's answer is malformed: {e}") from e
    data = tensor.data if tensor is not None else memoryview(b"")
    size = wire.itemsize
    if len(data) != count * size:
        kind = "bfloat16" if wire == BFLOAT16 else wire.name
        raise PsInternal(
            f"{what}: expected {count} {kind} values ({count * size} bytes), "
            f"the shard sent {len(data)} bytes"
        )
    if wire != FLOAT32:
        return widen(np.frombuffer(data, dtype=wire, count=count), wire)
    return np.frombuffer(data, dtype=FLOAT32, count=count).astype(np.float32, copy=False)


def read_half_rows(
    buf: bytes, response: type[Message], name: str, n: int, dim: int, what: str,
    wire: np.dtype[Any],
) -> npt.NDArray[Any]:
    """The ``[n, dim]`` payload of ``Tensor`` field ``name`` in the half-size ``wire``
    form (``protos.wire.FLOAT16`` / ``BFLOAT16``), as it came: a read-only view of
    ``buf``, not widened.

    :raises PsInternal: as :func:`read_floats`.
    """
    number = response.DESCRIPTOR.fields_by_name[name].number
    try:
        tensor = split_tensors(buf, (number,))[0].get(number)
    except WireError as e:
        raise PsInternal(f"{what}: the shard's answer is malformed: {e}") from e
    data = tensor.data if tensor is not None else memoryview(b"")
    count = n * dim
    if len(data) != count * wire.itemsize:
        kind = "bfloat16" if wire == BFLOAT16 else wire.name
        raise PsInternal(
            f"{what}: expected {count} {kind} values ({count * wire.itemsize} bytes), "
            f"the shard sent {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=wire, count=count).reshape(n, dim)


def read_rows(
    buf: bytes, response: type[Message], name: str, n: int, dim: int, what: str,
    wire: np.dtype[Any] = FLOAT32,
) -> npt.NDArray[np.float32]:
    """:func:`read_floats` viewed as ``float32[n, dim]``."""
    return read_floats(buf, response, name, n * dim, what, wire).reshape(n, dim)


#: Smallest payload :func:`adopt` hands out in place: below it a copy costs next to
#: nothing, and a tiny ``bytes`` may be shared (CPython keeps one of each single byte).
ADOPT_MIN_BYTES = 1 << 16


class _Adopted:
    """Owner of an array over a received ``bytes``: numpy reads the memory from
    ``__array_interface__`` and keeps this object (so the bytes) alive as the array's base."""

    __slots__ = ("__array_interface__", "_buf")

    def __init__(self, view: npt.NDArray[Any], buf: bytes) -> None:
        self._buf = buf
        self.__array_interface__ = {
            "version": 3, "shape": view.shape, "typestr": view.dtype.str, "strides": None,
            "data": (view.__array_interface__["data"][0], False),  # False: writable
        }


def adopt(view: npt.NDArray[Any], buf: bytes) -> npt.NDArray[Any] | None:
    """``view`` (a C-contiguous, aligned read-only view into ``buf``, as
    :func:`read_rows` gives) made writable in place, no copy; or None when it does not
    qualify (``buf`` not a ``bytes``, the view unaligned or under
    :data:`ADOPT_MIN_BYTES`), for the caller to copy.

    The array keeps ``buf`` alive and writes into it: only for an answer the caller
    received itself and nothing else keeps (gRPC hands each answer out as a fresh
    ``bytes`` and never touches it again), never for request bytes, which a retry may
    resend.
    """
    if (type(buf) is not bytes or view.nbytes < ADOPT_MIN_BYTES
            or not (view.flags.c_contiguous and view.flags.aligned)):
        return None
    start = view.__array_interface__["data"][0]
    base = np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    if not base <= start <= start + view.nbytes <= base + len(buf):
        return None  # not a view of buf
    out: npt.NDArray[Any] = np.asarray(_Adopted(view, buf))
    return out
