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

Wire reminders: a key is ``field_number << 3 | wire_type``; wire type 2 is
length-delimited; varints hold 7 bits per byte, low bits first.
"""

from __future__ import annotations

from collections.abc import Sequence

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
