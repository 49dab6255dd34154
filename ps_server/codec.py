"""Bulk arrays on the wire: ``Tensor`` messages ⇄ numpy arrays.

A ``Tensor`` (``protos/ps_service.proto``) is raw little-endian bytes plus an
explicit shape: ids are ``int64`` of shape ``[n]``, values and gradients ``float32``
of shape ``[n, dim]`` (a flat ``[n * dim]`` is accepted where rows are expected,
as the engine does). Decoding is ``np.frombuffer`` over the message's bytes: no
copy, no Python list, and the result is read-only. Every mismatch between bytes
and shape raises :class:`~ps_server.errors.BadTensorError` naming the field, so a
malformed request never reaches the engine.

The bulk RPCs skip protobuf objects for their tensors (a generated message would
copy megabytes of payload several times: parse, ``.data``, building and sizing the
answer). :class:`BulkRequestParser` splits a request's wire bytes into a message of
its small fields and :class:`WireTensor` views of its tensors (no copy), and
:func:`encode_message` writes an answer with its tensors appended by hand (one
copy of the payload); :func:`encode_message_filled` lets the engine write an answer's
tensor straight into the answer's bytes (no copy at all). They produce and accept
exactly the bytes protobuf would (``tests/unit/test_wire_codec.py`` checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import numpy as np
from google.protobuf.message import Message

from protos import ps_service_pb2 as ps_pb2
from protos.wire import (
    BFLOAT16,
    FLOAT32,
    INT64,
    WIRE_DTYPES,
    FilledTensor,
    WireError,
    WireTensor,
    encode_filled,
    split_tensors,
    tensor_frame,
    widen,
    wire_of,
)
from ps_server.engine.types import Floats, Ids
from ps_server.errors import BadTensorError, DimMismatchError

__all__ = [
    "FLOAT32",
    "INT64",
    "SMALL_REQUEST_BYTES",
    "BulkRequest",
    "BulkRequestParser",
    "TensorLike",
    "WireTensor",
    "decode_floats",
    "decode_ids",
    "encode_floats",
    "encode_ids",
    "encode_message",
    "encode_message_filled",
    "float_wire",
    "to_wire",
]

class TensorLike(Protocol):
    """What the decoders read: a ``Tensor`` message or a :class:`WireTensor`."""

    @property
    def data(self) -> bytes | memoryview: ...

    @property
    def shape(self) -> Sequence[int]: ...


def _shape_of(tensor: TensorLike, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise BadTensorError(f"{what}: shape {list(shape)} has a negative dimension")
    if not shape and tensor.data:
        raise BadTensorError(
            f"{what}: {len(tensor.data)} bytes of data but no shape (set Tensor.shape)"
        )
    return shape


def _frombuffer(tensor: TensorLike, shape: tuple[int, ...], dtype: np.dtype[Any],
                what: str) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    data = tensor.data
    want = count * dtype.itemsize
    if len(data) != want:
        dims = " x ".join(str(d) for d in shape) or "0"
        kind = "bfloat16" if dtype == BFLOAT16 else dtype.name
        raise BadTensorError(
            f"{what}: {len(data)} bytes is not {dims} x {kind} ({want} bytes expected; "
            f"data must be raw little-endian {kind})"
        )
    try:
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    except ValueError as e:  # no bytes, but other dimensions no array can have
        raise BadTensorError(f"{what}: shape {list(shape)} is too large for an array: {e}") from e


def decode_ids(tensor: TensorLike, what: str = "ids") -> Ids:
    """``int64[n]`` from a Tensor of shape ``[n]`` (an unset Tensor is ``[0]``).

    :raises BadTensorError: shape not 1-D, or byte length != ``8 * n``.
    """
    shape = _shape_of(tensor, what)
    if not shape:
        return np.zeros(0, dtype=np.int64)
    if len(shape) != 1:
        raise BadTensorError(f"{what}: shape must be [n] (1-D int64), got {list(shape)}")
    return _frombuffer(tensor, shape, INT64, what)


def decode_floats(
    tensor: TensorLike,
    what: str = "values",
    *,
    rows: int | None = None,
    dim: int | None = None,
    wire: np.dtype[Any] = FLOAT32,
) -> Floats:
    """``float32`` array of the Tensor's shape (1-D or 2-D; unset Tensor → ``[0]``).

    :param wire: the element form the floats travel in (:func:`float_wire`): float32
        (read in place), or float16 / bfloat16 (2 bytes each, widened exactly into a
        new float32 array).
    :param rows: when given, a 2-D tensor must have this many rows and a 1-D one a
        multiple of it (checked before the engine sees the array).
    :param dim: when given, a 2-D tensor must have this many columns.
    :raises BadTensorError: more than 2 dimensions, or byte length != ``4 x elements``.
    :raises DimMismatchError: ``rows`` / ``dim`` do not match.
    """
    shape = _shape_of(tensor, what)
    if not shape:
        shape = (0,)
    if len(shape) > 2:
        raise BadTensorError(
            f"{what}: shape must be [n, dim] or flat [n * dim], got {list(shape)}"
        )
    arr = _frombuffer(tensor, shape, wire, what)
    if wire != FLOAT32:
        arr = widen(arr, wire)
    if rows is not None:
        if len(shape) == 2 and shape[0] != rows:
            raise DimMismatchError(
                f"{what}: {shape[0]} rows for {rows} ids (shape {list(shape)}); "
                "send one row per id"
            )
        if len(shape) == 1 and (shape[0] % rows if rows else shape[0]):
            raise DimMismatchError(
                f"{what}: {shape[0]} floats cannot be split into one row per id ({rows} ids)"
            )
    if dim is not None and len(shape) == 2 and shape[1] != dim:
        raise DimMismatchError(f"{what}: rows have {shape[1]} floats, expected dim {dim}")
    return arr


def float_wire(number: int, what: str) -> np.dtype[Any]:
    """The element dtype of ``FloatWire`` ``number`` read from field ``what``.

    :raises BadTensorError: (INVALID_ARGUMENT) not a ``FloatWire`` value; the message
        names the field and the value.
    """
    try:
        return wire_of(number, what)
    except ValueError as e:
        raise BadTensorError(str(e)) from None


def encode_ids(ids: Any) -> ps_pb2.Tensor:
    """Tensor of shape ``[n]`` holding ``ids`` as little-endian int64."""
    arr = np.ascontiguousarray(ids, dtype=INT64).reshape(-1)
    return ps_pb2.Tensor(data=arr.tobytes(), shape=[arr.shape[0]])


def encode_floats(values: Any) -> ps_pb2.Tensor:
    """Tensor of ``values``' shape holding little-endian float32 (row-major)."""
    arr = np.ascontiguousarray(values, dtype=FLOAT32)
    return ps_pb2.Tensor(data=arr.tobytes(), shape=list(arr.shape))


# ---------------------------------------------------------------- wire level

_TENSOR_NAME = ps_pb2.Tensor.DESCRIPTOR.full_name
_M = TypeVar("_M", bound=Message)
_NO_TENSOR = WireTensor(memoryview(b""), ())

#: Below this size protobuf's C parser plus a copy of the tensors beats splitting
#: the fields in Python.
SMALL_REQUEST_BYTES: Final = 16 << 10


@dataclass(frozen=True)
class BulkRequest(Generic[_M]):
    """A bulk request as received: its small fields and views of its tensors.

    :ivar head: the request message with every field except the tensors (left unset).
    :ivar tensors: field name → :class:`WireTensor`, for the tensor fields present.
    """

    head: _M
    tensors: Mapping[str, WireTensor]

    def tensor(self, name: str) -> WireTensor:
        """Tensor field ``name`` (an empty ``WireTensor`` when it is unset)."""
        return self.tensors.get(name, _NO_TENSOR)


class BulkRequestParser(Generic[_M]):
    """Parses wire bytes of ``message_type`` into a :class:`BulkRequest` (a gRPC
    request deserializer).

    The fields of type ``Tensor`` become views of the bytes; all other fields are
    parsed by protobuf from a copy of their (small) encodings. Bytes with groups or
    a malformed structure go through protobuf whole, so they fail (``DecodeError``)
    or parse exactly as ``message_type.FromString`` would; so do requests shorter
    than ``small_bytes`` (copying their tensors costs less than splitting them).
    """

    def __init__(self, message_type: type[_M], *,
                 small_bytes: int = SMALL_REQUEST_BYTES) -> None:
        self.message_type = message_type
        self._small_bytes = small_bytes
        self._tensor_fields = {
            f.number: f.name
            for f in message_type.DESCRIPTOR.fields
            if f.message_type is not None and f.message_type.full_name == _TENSOR_NAME
        }

    def __call__(self, buf: bytes) -> BulkRequest[_M]:
        if len(buf) < self._small_bytes:
            return self._slow(buf)
        try:
            return self._parse(buf)
        except WireError:  # groups, malformed: protobuf parses or rejects them
            return self._slow(buf)

    def _parse(self, buf: bytes) -> BulkRequest[_M]:
        numbered, rest = split_tensors(buf, self._tensor_fields)
        tensors = {self._tensor_fields[number]: t for number, t in numbered.items()}
        return BulkRequest(self.message_type.FromString(b"".join(rest)), tensors)

    def _slow(self, buf: bytes) -> BulkRequest[_M]:
        message = self.message_type.FromString(buf)
        tensors: dict[str, WireTensor] = {}
        for name in self._tensor_fields.values():
            if message.HasField(name):
                t = getattr(message, name)
                tensors[name] = WireTensor(memoryview(t.data), tuple(t.shape))
                message.ClearField(name)
        return BulkRequest(message, tensors)


def _wire_array(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    wire = WIRE_DTYPES.get(arr.dtype, FLOAT32)
    return np.ascontiguousarray(arr, dtype=wire)  # no copy when it already is


def encode_message(head: Message, **tensors: np.ndarray[Any, Any]) -> bytes:
    """Wire bytes of ``head`` plus the ``Tensor`` fields named by the keywords.

    ``head`` holds the other fields (its tensor fields unset). Each array is written
    once, straight into the result: int64 as little-endian int64, anything else as
    little-endian float32, keeping its shape. ``Msg.FromString`` of the result equals
    ``head`` with the tensors set (``encode_floats`` / ``encode_ids``).
    """
    fields = head.DESCRIPTOR.fields_by_name
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    offset = len(parts[0])
    for name, arr in tensors.items():
        wire = _wire_array(arr)
        frame_head, frame_tail = tensor_frame(fields[name].number, wire.shape, wire.nbytes, offset)
        parts += [frame_head, wire.data.cast("B") if wire.nbytes else b"", frame_tail]
        offset += len(frame_head) + wire.nbytes + len(frame_tail)
    return b"".join(parts)


def encode_message_filled(
    head: Message,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    fill: Callable[[np.ndarray[Any, Any]], object],
) -> bytes:
    """Wire bytes of ``head`` plus ``Tensor`` field ``name`` of ``shape`` and ``dtype``
    (``INT64`` or ``FLOAT32``), whose payload ``fill`` writes: into the answer's own
    bytes when it is large (``protos.wire.encode_filled``), so an answer's rows
    are written once. ``fill`` must write every element and keep no reference to the
    array. The bytes equal :func:`encode_message` of the filled array.
    """
    return encode_filled(head, [FilledTensor(name, shape, dtype, fill)])


def to_wire(response: Message | bytes) -> bytes:
    """A gRPC response serializer taking answers already encoded (``bytes``) as they
    are and serializing messages."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()
