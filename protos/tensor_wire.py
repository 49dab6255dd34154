"""How a ``Tensor`` field is laid out on the wire by our hand-written encoders.

``ps_client`` and ``ps_server`` write bulk messages without protobuf objects (their
``_codec`` / ``codec`` modules): the small fields are serialized by protobuf, and
each ``Tensor{data = 1, shape = 2, align = 3}`` field is framed here around its
payload, which the caller writes (or copies) in between.

Alignment: numpy runs several times slower on arrays whose address is not a multiple
of their item size (gathering 65,536 rows into an unaligned answer: 0.53 ms instead
of 0.16 ms), and a payload's address on the receiving side is the message's own
(16-byte aligned: CPython puts a ``bytes``' data 32 bytes into an allocation aligned
to 16) plus the payload's offset in the message. So a payload of at least
:data:`ALIGN_MIN_BYTES` is preceded by an ``align`` field, filler that readers
ignore, sized so the payload starts at a multiple of :data:`ALIGNMENT` bytes from the
start of the message. Protobuf accepts fields in any order, so the frame is
``align, data, shape``; it parses exactly as the message with those fields set.

Filling in place: :func:`encode_filled` writes a whole message into a new ``bytes``
and lets the caller write each payload straight into it (a gather of table rows, of
one shard's share of a batch), so a payload is written once instead of into an array
and again into the message.

Wire reminders: a key is ``field_number << 3 | wire_type``; wire type 2 is
length-delimited; varints hold 7 bits per byte, low bits first.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import Message

ALIGNMENT = 16
"""Payloads start at a multiple of this many bytes from the start of their message."""

ALIGN_MIN_BYTES = 1024
"""Smaller payloads are not aligned (a copy of them costs less than the filler)."""

_DATA_KEY = b"\x0a"  # field 1, length-delimited
_SHAPE_KEY = b"\x12"  # field 2, packed varints
_ALIGN_KEY = b"\x1a"  # field 3, length-delimited


def varint(n: int) -> bytes:
    """Protobuf varint of ``n`` (a negative int64 as its 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tensor_frame(
    number: int, shape: Sequence[int], nbytes: int, offset: int = 0
) -> tuple[bytes, bytes]:
    """What goes before and after the ``nbytes`` of payload of field ``number`` holding
    ``Tensor{data, shape}``, when the field starts ``offset`` bytes into its message.

    :returns: ``(head, tail)``; the payload goes right after ``head``, at an offset
        that is a multiple of :data:`ALIGNMENT` when ``nbytes >= ALIGN_MIN_BYTES``.
    """
    dims = b"".join(varint(d) for d in shape)
    tail = _SHAPE_KEY + varint(len(dims)) + dims if dims else b""
    data_head = _DATA_KEY + varint(nbytes) if nbytes else b""
    key = varint(number << 3 | 2)
    filler = 0  # bytes of the align field, key and length included (0, or >= 2)
    while True:
        inner = filler + len(data_head) + nbytes + len(tail)
        start = offset + len(key) + len(varint(inner)) + filler + len(data_head)
        short = -start % ALIGNMENT
        if nbytes < ALIGN_MIN_BYTES or short == 0:
            break
        # Grow the filler (never by 1 from nothing: a field is at least 2 bytes);
        # the outer length may gain a byte, so check again.
        filler += short if filler or short > 1 else short + ALIGNMENT
    align = _ALIGN_KEY + varint(filler - 2) + bytes(filler - 2) if filler else b""
    return key + varint(inner) + align + data_head, tail


#: Below this many payload bytes a message is filled in numpy arrays and joined: a
#: copy that small costs less than the calls that make a fillable ``bytes``.
FILL_IN_PLACE_BYTES = 64 << 10

# CPython's constructor of a bytes object whose contents the caller writes, as C
# extensions build them: the object is new and unshared until it is returned, so
# filling it breaks no one's view of an immutable value.
_bytes_of_size = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_of_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_of_size.restype = ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes = (ctypes.py_object,)
_bytes_address.restype = ctypes.c_void_p


class FilledTensor(NamedTuple):
    """A ``Tensor`` field whose payload :func:`encode_filled` has ``fill`` write.

    :ivar name: the field's name in the message.
    :ivar shape: the tensor's shape.
    :ivar dtype: its wire dtype (``<i8`` or ``<f4``).
    :ivar fill: called with a C-contiguous writable array of ``shape``; must write
        every element and keep no reference to it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill: Callable[[np.ndarray[Any, Any]], object]


def encode_filled(head: Message, tensors: Sequence[FilledTensor]) -> bytes:
    """Wire bytes of ``head`` (its tensor fields unset) followed by ``tensors``, each
    framed by :func:`tensor_frame` and filled by its ``fill``.

    With :data:`FILL_IN_PLACE_BYTES` of payload or more, every ``fill`` writes into a
    view of the returned bytes themselves.
    """
    fields = head.DESCRIPTOR.fields_by_name
    lead = head.SerializeToString()
    sizes = [math.prod(t.shape) * t.dtype.itemsize for t in tensors]
    if sum(sizes) < FILL_IN_PLACE_BYTES:
        parts: list[bytes | memoryview] = [lead]
        offset = len(lead)
        for t, nbytes in zip(tensors, sizes, strict=True):
            arr = np.empty(t.shape, dtype=t.dtype)
            t.fill(arr)
            before, after = tensor_frame(fields[t.name].number, t.shape, nbytes, offset)
            parts += [before, arr.data.cast("B") if nbytes else b"", after]
            offset += len(before) + nbytes + len(after)
        return b"".join(parts)
    frames, offset = [], len(lead)
    for t, nbytes in zip(tensors, sizes, strict=True):
        before, after = tensor_frame(fields[t.name].number, t.shape, nbytes, offset)
        frames.append((before, after))
        offset += len(before) + nbytes + len(after)
    out: bytes = _bytes_of_size(None, offset)
    memory = memoryview((ctypes.c_ubyte * offset).from_address(_bytes_address(out)))
    buf = np.frombuffer(memory.cast("B"), dtype=np.uint8)
    buf[: len(lead)] = np.frombuffer(lead, dtype=np.uint8)
    pos = len(lead)
    for t, nbytes, (before, after) in zip(tensors, sizes, frames, strict=True):
        buf[pos : pos + len(before)] = np.frombuffer(before, dtype=np.uint8)
        pos += len(before)
        t.fill(buf[pos : pos + nbytes].view(t.dtype).reshape(t.shape))
        pos += nbytes
        buf[pos : pos + len(after)] = np.frombuffer(after, dtype=np.uint8)
        pos += len(after)
    del buf, memory
    return out
