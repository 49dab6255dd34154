"""The protobuf wire format as both ends write and read it by hand.

``ps_client`` and ``ps_server`` write and read bulk messages without protobuf objects
(their ``_codec`` / ``codec`` modules), and the checkpoint code writes Monolith's
``EntryDump`` and filter records the same way. What they share lives here, once:

- **Varints**, scalar (:func:`varint`, :func:`read_varint`) and batched over numpy
  columns (:func:`varint_lengths`, :func:`put_varints`, :func:`varint_values`).
- **The field scanner**: :func:`split_tensors` splits a message's bytes into views of
  its ``Tensor`` fields (data and shape, merged over repeated occurrences as protobuf
  merges them) and the encodings of its other fields.
- **Tensor framing**: :func:`tensor_frame` and :func:`encode_filled` (below).
- **Wire dtypes**: :data:`INT64` and :data:`FLOAT32`, little-endian whatever the host,
  and :data:`WIRE_DTYPES`, the array dtypes that travel as them.
- **Half-size floats**: :func:`narrow` and :func:`widen`, float32 to and from the
  2-byte wire forms (float16, bfloat16) of the opt-in half-size wire (``FloatWire``).
- **Caller input**: :func:`as_ids` and :func:`as_rows`, each side raising its own
  exception types (:class:`Errors`); :func:`row_items`, rows as opaque items.

Nothing here imports gRPC or the service proto: the engine may use it.

Framing: the small fields of a message are serialized by protobuf, and each
``Tensor{data = 1, shape = 2, align = 3}`` field is framed by :func:`tensor_frame`
around its payload, which the caller writes (or copies) in between.

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

Wire reminders: a key is ``field_number << 3 | wire_type``; wire type 0 = varint,
1 = 64-bit, 2 = length-delimited, 5 = 32-bit (3 and 4, groups, are not read here);
varints hold 7 bits per byte, low bits first, a negative int64 in ten bytes.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Container, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

__all__ = [
    "ALIGNMENT",
    "ALIGN_MIN_BYTES",
    "FILL_IN_PLACE_BYTES",
    "BFLOAT16",
    "FLOAT16",
    "FLOAT32",
    "FLOAT_WIRES",
    "INT64",
    "VALUE_ERRORS",
    "WIRE_DTYPES",
    "WIRE_I32",
    "WIRE_I64",
    "WIRE_LEN",
    "WIRE_VARINT",
    "Errors",
    "FilledTensor",
    "WireError",
    "WireTensor",
    "as_ids",
    "as_rows",
    "as_u64",
    "encode_filled",
    "key",
    "narrow",
    "put_varints",
    "read_varint",
    "row_items",
    "skip_value",
    "split_tensors",
    "tensor_frame",
    "varint",
    "varint_lengths",
    "varint_values",
    "widen",
    "wire_of",
]

# ---------------------------------------------------------------- dtypes

INT64 = np.dtype("<i8")
"""Ids on the wire: little-endian int64."""

FLOAT32 = np.dtype("<f4")
"""Values and gradients on the wire: little-endian float32."""

WIRE_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.int64): INT64,
    np.dtype(np.float32): FLOAT32,
}
"""Array dtype -> the dtype its payload travels as."""

# ---------------------------------------------------------------- half-size floats

FLOAT16 = np.dtype("<f2")
"""Values or gradients sent as ``FLOAT_WIRE_FLOAT16``: little-endian IEEE binary16."""

BFLOAT16 = np.dtype("<u2")
"""Values or gradients sent as ``FLOAT_WIRE_BFLOAT16``: the top 16 bits of each float32,
little-endian (numpy has no bfloat16; the bits travel as uint16)."""

FLOAT_WIRES: dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
"""Name -> ``FloatWire`` number (``protos/ps_service.proto``)."""

_FLOAT_WIRE_NAMES = {v: k for k, v in FLOAT_WIRES.items()}
_WIRE_ITEM: dict[int, np.dtype[Any]] = {0: FLOAT32, 1: FLOAT16, 2: BFLOAT16}

#: Elements converted per block: the block's temporaries (three 4-byte arrays, 1.5 MiB)
#: stay in the core's cache, so the passes of a conversion cost less than over memory
#: (65,536 x 32 to bfloat16: 1.7 ms CPU in blocks of 2**17, 1.95 ms unblocked).
_BLOCK = 1 << 17

_U = np.uint32


def wire_of(number: int, what: str = "float wire") -> np.dtype[Any]:
    """The item dtype of ``FloatWire`` ``number`` (``FLOAT32``, ``FLOAT16``, ``BFLOAT16``).

    :raises ValueError: not a ``FloatWire`` this module knows (the message names it).
    """
    item = _WIRE_ITEM.get(number)
    if item is None:
        known = ", ".join(f"{n} ({name})" for n, name in _FLOAT_WIRE_NAMES.items())
        raise ValueError(f"{what} {number} is not a FloatWire value (known: {known})")
    return item


def _f16_block(x: npt.NDArray[np.float32], out: npt.NDArray[np.uint16],
               t1: npt.NDArray[np.uint32], t2: npt.NDArray[np.uint32],
               tf: npt.NDArray[np.float32]) -> None:
    # M. Maratyszcza's FP16 conversion (fp16_ieee_from_fp32_value), vectorized: the FPU
    # rounds (to nearest, ties to even) by adding a power of two that leaves exactly
    # the float16 mantissa bits, subnormals included; scaling by 2**112 makes finite
    # values beyond float16's range infinite first.
    w = x.view(_U)
    with np.errstate(over="ignore", invalid="ignore"):
        np.abs(x, out=tf)
        tf *= np.float32(2.0**112)
        tf *= np.float32(2.0**-110)
    np.add(w, w, out=t1)                         # the bits without the sign, shifted left
    np.bitwise_and(t1, _U(0xFF000000), out=t2)   # the exponent, doubled
    np.maximum(t2, _U(0x71000000), out=t2)
    t2 >>= _U(1)
    t2 += _U(0x07800000)
    with np.errstate(over="ignore", invalid="ignore"):
        tf += t2.view(np.float32)
    b = tf.view(_U)
    np.right_shift(b, _U(13), out=t2)
    t2 &= _U(0x7C00)
    b &= _U(0x0FFF)
    t2 += b
    np.greater(t1, _U(0xFF000000), out=tf.view(np.bool_)[: t1.shape[0]])
    np.copyto(t2, _U(0x7E00), where=tf.view(np.bool_)[: t1.shape[0]])  # NaN: quiet NaN
    np.right_shift(w, _U(16), out=t1)
    t1 &= _U(0x8000)
    np.bitwise_or(t2, t1, out=out, casting="unsafe")


def _bf16_block(x: npt.NDArray[np.float32], out: npt.NDArray[np.uint16],
                t1: npt.NDArray[np.uint32], t2: npt.NDArray[np.uint32],
                tf: npt.NDArray[np.float32]) -> None:
    # Round to nearest, ties to even, on the 16 dropped bits: add 0x7FFF plus the lowest
    # kept bit, keep the top 16. A carry out of the mantissa moves the exponent up, to
    # infinity past the largest finite bfloat16, as IEEE rounding does.
    w = x.view(_U)
    np.right_shift(w, _U(16), out=t1)
    t1 &= _U(1)
    t1 += _U(0x7FFF)
    t1 += w
    np.right_shift(t1, _U(16), out=out, casting="unsafe")
    nan = np.isnan(x, out=tf.view(np.bool_)[: x.shape[0]])
    if nan.any():  # the rounding could carry a NaN into infinity: keep it a (quiet) NaN
        np.right_shift(w, _U(16), out=t2)
        t2 |= _U(0x0040)
        np.copyto(out, t2, where=nan, casting="unsafe")


def narrow(values: npt.NDArray[np.float32], wire: np.dtype[Any],
           out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
    """``values`` (float32) in the wire form ``wire`` (:data:`FLOAT16` or
    :data:`BFLOAT16`; :data:`FLOAT32` copies), written into ``out`` when given.

    float16: IEEE round to nearest, ties to even; a finite value of magnitude at least
    65520 becomes an infinity of its sign (as numpy's ``astype(np.float16)``, which this
    matches bit for bit except that every NaN becomes the quiet NaN ``0x7E00`` with its
    sign); subnormal results are kept, not flushed. bfloat16: round to nearest, ties to
    even, on the top 16 bits (a value past the largest finite bfloat16's halfway point
    becomes infinite); a NaN stays a NaN (its top 16 bits, quiet bit set); infinities
    and subnormals as the same rounding makes them.
    """
    src = np.ascontiguousarray(values, dtype=np.float32)
    if out is None:
        out = np.empty(src.shape, dtype=wire)
    if wire == FLOAT32:
        np.copyto(out, src)
        return out
    block = _bf16_block if wire == BFLOAT16 else _f16_block
    flat_in = src.reshape(-1)
    flat_out = out.reshape(-1).view(np.uint16)
    n = flat_in.shape[0]
    size = min(n, _BLOCK)
    t1, t2 = np.empty(size, _U), np.empty(size, _U)
    tf = np.empty(size, np.float32)
    for lo in range(0, n, size or 1):
        hi = min(lo + size, n)
        k = hi - lo
        block(flat_in[lo:hi], flat_out[lo:hi], t1[:k], t2[:k], tf[:k])
    return out


def widen(half: npt.NDArray[Any], wire: np.dtype[Any],
          out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """Wire-form ``half`` as float32 (exact: every float16 and bfloat16 is a float32),
    written into ``out`` when given. NaNs stay NaNs."""
    if out is None:
        out = np.empty(half.shape, dtype=np.float32)
    if wire == BFLOAT16:
        np.left_shift(half.view(np.uint16), _U(16), out=out.view(_U), dtype=_U)
    else:
        np.copyto(out, half.view(wire) if wire == FLOAT16 else half, casting="unsafe")
    return out


# ---------------------------------------------------------------- varints

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5

_U64_MASK = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not a protobuf encoding this module reads (truncated, overlong
    varint, a length past the end, a group); each side maps it to its own error."""


def varint(n: int) -> bytes:
    """Protobuf varint of ``n`` (a negative int64 as its 64-bit two's complement)."""
    n &= _U64_MASK
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """The encoded key of field ``number`` with ``wire_type``."""
    return varint(number << 3 | wire_type)


def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos]`` (as uint64) and the position after it.

    :raises WireError: it runs past ``end`` or over ten bytes.
    """
    if pos < end and buf[pos] < 0x80:  # one byte: keys and short lengths
        return buf[pos], pos + 1
    result = shift = 0
    while shift < 70:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & _U64_MASK, pos
        shift += 7
    raise WireError("varint longer than 10 bytes")


def skip_value(buf: bytes | memoryview, wire_type: int, pos: int, end: int) -> int:
    """Position after a field's value of ``wire_type`` starting at ``pos``.

    :raises WireError: the value runs past ``end``, or ``wire_type`` is a group's.
    """
    if wire_type == WIRE_VARINT:
        return read_varint(buf, pos, end)[1]
    if wire_type == WIRE_LEN:
        length, pos = read_varint(buf, pos, end)
        pos += length
    elif wire_type == WIRE_I64:
        pos += 8
    elif wire_type == WIRE_I32:
        pos += 4
    else:
        raise WireError(f"unexpected wire type {wire_type}")
    if pos > end:
        raise WireError("a field runs past the end of its message")
    return pos


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def as_u64(values: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """int64 -> its two's-complement uint64 (how protobuf puts a negative int64 on the
    wire), a view when ``values`` already is contiguous int64."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def _bytes_of(value: int) -> int:
    """Bytes of the varint of one non-negative ``value`` below 2**64."""
    return max(1, (value.bit_length() + 6) // 7)


def varint_lengths(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Bytes of the varint of each ``uint64`` value (1..10)."""
    if values.size:
        low, high = _bytes_of(int(values.min())), _bytes_of(int(values.max()))
        if low == high:  # the usual case (one length for all): no per-value pass
            return np.full(values.shape, low, np.int64)
    length = np.ones(values.shape, np.int64)
    for k in range(1, 10):
        length += values >= np.uint64(1 << (7 * k))
    return length


def put_varints(
    rec: npt.NDArray[np.uint8], pos: int, values: npt.NDArray[np.uint64], length: int
) -> int:
    """Write the varint of ``values[i]`` into ``rec[i, pos:pos + length]`` for every row.

    Every value's varint must be ``length`` bytes long (:func:`varint_lengths`).
    :returns: ``pos + length``.
    """
    for k in range(length):
        byte = (values >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k < length - 1:
            byte |= np.uint64(0x80)
        rec[:, pos + k] = byte
    return pos + length


def varint_values(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Values of the varints in the rows of ``raw`` ``[m, k]``, each ``k`` bytes long
    (continuation bits not checked here)."""
    value = (raw[:, 0] & 0x7F).astype(np.uint64)
    for k in range(1, raw.shape[1]):
        value |= (raw[:, k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return value


# ---------------------------------------------------------------- field scanner


class WireTensor(NamedTuple):
    """A ``Tensor`` read from message bytes: ``data`` is a view of them, not a copy."""

    data: memoryview
    shape: tuple[int, ...]


def _merge_tensor(buf: memoryview, start: int, end: int,
                  data: memoryview, shape: list[int]) -> memoryview:
    """Merge the ``Tensor`` encoded in ``buf[start:end]`` into ``(data, shape)`` as
    protobuf merges a repeated occurrence (``data`` replaced, ``shape`` appended);
    other fields (``align``, unknown ones) are skipped."""
    pos = start
    while pos < end:
        k, pos = read_varint(buf, pos, end)
        number, wire_type = k >> 3, k & 7
        if number == 0:
            raise WireError("field number 0 in a Tensor (protobuf allows none)")
        if number == 1 and wire_type == WIRE_LEN:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError("Tensor.data runs past the end of its tensor")
            data = buf[pos:pos + length]
            pos += length
        elif number == 2 and wire_type == WIRE_LEN:  # packed
            length, pos = read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError("Tensor.shape runs past the end of its tensor")
            while pos < stop:
                v, pos = read_varint(buf, pos, stop)
                shape.append(_signed64(v))
        elif number == 2 and wire_type == WIRE_VARINT:
            v, pos = read_varint(buf, pos, end)
            shape.append(_signed64(v))
        else:
            pos = skip_value(buf, wire_type, pos, end)
    return data


def split_tensors(
    buf: bytes | memoryview, tensor_fields: Container[int]
) -> tuple[dict[int, WireTensor], list[memoryview]]:
    """Split the encoding of a message into its ``Tensor`` fields and the rest.

    :param tensor_fields: the numbers of the message's fields of type ``Tensor``.
    :returns: ``(tensors, rest)``: field number -> :class:`WireTensor` (views of
        ``buf``) for the tensor fields present, each merged over its occurrences as
        protobuf merges them; and the encodings of every other field, in order
        (joined, they parse as the message without its tensors).
    :raises WireError: the bytes are malformed or hold a group.
    """
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    end = len(view)
    rest: list[memoryview] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    pos = 0
    while pos < end:
        start = pos
        k, pos = read_varint(view, pos, end)
        number, wire_type = k >> 3, k & 7
        if number == 0:
            raise WireError("field number 0 (protobuf allows none)")
        if wire_type == WIRE_LEN and number in tensor_fields:
            length, pos = read_varint(view, pos, end)
            if pos + length > end:
                raise WireError(f"field {number} runs past the end of the message")
            spans.setdefault(number, []).append((pos, pos + length))
            pos += length
            continue
        pos = skip_value(view, wire_type, pos, end)
        rest.append(view[start:pos])
    tensors: dict[int, WireTensor] = {}
    for number, parts in spans.items():
        data = view[:0]
        shape: list[int] = []
        for lo, hi in parts:
            data = _merge_tensor(view, lo, hi, data, shape)
        tensors[number] = WireTensor(data, tuple(shape))
    return tensors, rest


# ---------------------------------------------------------------- tensor framing

ALIGNMENT = 16
"""Payloads start at a multiple of this many bytes from the start of their message."""

ALIGN_MIN_BYTES = 1024
"""Smaller payloads are not aligned (a copy of them costs less than the filler)."""

_DATA_KEY = key(1, WIRE_LEN)
_SHAPE_KEY = key(2, WIRE_LEN)  # packed varints
_ALIGN_KEY = key(3, WIRE_LEN)


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
    field_key = key(number, WIRE_LEN)
    filler = 0  # bytes of the align field, key and length included (0, or >= 2)
    while True:
        inner = filler + len(data_head) + nbytes + len(tail)
        start = offset + len(field_key) + len(varint(inner)) + filler + len(data_head)
        short = -start % ALIGNMENT
        if nbytes < ALIGN_MIN_BYTES or short == 0:
            break
        # Grow the filler (never by 1 from nothing: a field is at least 2 bytes);
        # the outer length may gain a byte, so check again.
        filler += short if filler or short > 1 else short + ALIGNMENT
    align = _ALIGN_KEY + varint(filler - 2) + bytes(filler - 2) if filler else b""
    return field_key + varint(inner) + align + data_head, tail


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


# ---------------------------------------------------------------- caller input


class Errors(NamedTuple):
    """The exception types one side raises for bad caller input.

    :ivar value: input that cannot be converted (wrong dtype, out of range).
    :ivar shape: input of the wrong shape.
    """

    value: Callable[[str], Exception]
    shape: Callable[[str], Exception]


VALUE_ERRORS = Errors(ValueError, ValueError)
"""Plain ``ValueError`` for both (the default)."""


def as_ids(
    ids: Any, what: str = "ids", errors: Errors = VALUE_ERRORS, *, convert_other: bool = False
) -> npt.NDArray[np.int64]:
    """``ids`` as a 1-D ``int64`` array (a scalar becomes one id; int64 input as it is).

    Integers of any width, and floats holding whole numbers, convert when every value
    fits int64; booleans never do.

    :param convert_other: also convert other dtypes (object arrays of Python ints,
        numeric strings) with ``astype``; otherwise they are refused.
    :raises errors.shape: not 1-D.
    :raises errors.value: not convertible or outside the int64 range.
    """
    try:
        arr = np.asarray(ids)
    except Exception as e:  # ragged nested lists and the like
        raise errors.value(f"{what} must be a 1-D array of int64 ids: {e}") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise errors.shape(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.int64:
        return arr
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind == "b" or (kind not in "iuf" and not convert_other):
        raise errors.value(f"{what} must be integers, got dtype {arr.dtype}")
    if kind == "u" and arr.dtype.itemsize == 8 and bool((arr > np.iinfo(np.int64).max).any()):
        raise errors.value(f"{what} contain values above the int64 range")
    if kind == "f":
        if not bool(np.isfinite(arr).all()) or not bool((arr == np.trunc(arr)).all()):
            raise errors.value(f"{what} must be whole numbers, got non-integral floats")
        if bool((np.abs(arr) >= 2.0**63).any()):
            raise errors.value(f"{what} contain values outside the int64 range")
    if kind in "iuf":
        return arr.astype(np.int64)
    try:
        return arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise errors.value(f"{what} are not convertible to int64 ({arr.dtype}): {e}") from e


def as_rows(
    values: Any, n: int, dim: int, what: str = "values", errors: Errors = VALUE_ERRORS
) -> npt.NDArray[np.float32]:
    """``values`` as ``float32[n, dim]`` (no copy when they already are); a flat
    ``n * dim`` array is reshaped (Monolith's ops accept flat gradient buffers too).

    :raises errors.value: not float32-convertible.
    :raises errors.shape: the wrong shape (the message gives expected and actual).
    """
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise errors.value(f"{what} must be float32-convertible: {e}") from e
    if arr.ndim == 2 and arr.shape == (n, dim):
        return arr
    if arr.ndim == 1 and arr.size == n * dim:
        return arr.reshape(n, dim)
    raise errors.shape(
        f"{what} must have shape [{n}, {dim}] (one row of dim {dim} per id), got {arr.shape}"
    )


def row_items(arr: npt.NDArray[Any]) -> npt.NDArray[np.void] | None:
    """A C-contiguous ``arr`` of ``ndim >= 2`` viewed as one ``void`` item per row (no
    copy), or None when it cannot be: strided, 1-D, or rows of zero bytes.

    numpy's fancy assignment ``dst[rows] = src`` on a 2-D array walks
    ``len(rows) * width`` elements through its general indexing machinery; with rows
    as opaque items ``np.put`` / ``np.take`` make one memcpy per row (2.5-3x faster
    for float32 rows of 32).
    """
    if arr.ndim < 2 or not arr.flags.c_contiguous or arr.size == 0:
        return None
    flat = arr.reshape(arr.shape[0], -1)
    return flat.view(np.dtype((np.void, flat.shape[1] * arr.itemsize))).reshape(-1)
