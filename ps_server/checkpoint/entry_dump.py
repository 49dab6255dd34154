"""``EntryDump`` wire codec over columns, without a protobuf object per entry.

A table keeps its entries as columns: ``values`` ``float32[n, dim]`` (all segments
concatenated), one :data:`State` per segment and ``int64[n]`` timestamps. Saving and
``lookup_entry`` need the very bytes Monolith writes for each entry::

    EntryDump {
      id                 1  sfixed64   (saves only)        09 <8 bytes LE>
      num                2  rep float  (unpacked)          15 <4 bytes LE> per value
      opt                3  OptimizerDump                  1a <len> ...   (always, maybe 1a 00)
      last_update_ts_sec 4  int64                          20 <varint>    (always, even 0)
    }
    OptimizerDump { dump 1 rep SingleOptimizerDump }       0a <len> ...   per dumping segment
    SingleOptimizerDump { <dump_field> <message> }         <tag> <len> <slots in field order>

Inside a segment's dump message a float slot is one ``(field << 3) | 5`` tag and four
bytes per element (repeated slots unpacked, scalars always present) and an int64
scalar is a ``(field << 3) | 0`` tag and a varint (always present, negatives take ten
bytes). Serialization is by field number, which is also the order written here.

Only varints change a record's length (timestamps, int64 scalars and the length
prefixes above them). Records are therefore grouped by the byte length of every
varint they contain (their *layout*); all records of a layout share the position of
every byte, so each group is written or read as a ``uint8[m, record_len]`` matrix.
Tagged floats are moved through unaligned strided views of that matrix
(``float32[m, width]`` with strides ``(record_len, tag + 4)``), one copy per piece,
no byte gathers. When every record has one layout (uniform timestamps) or only the
timestamp's length differs (0 beside real times), records are written a block at a
time into a cache-sized scratch matrix whose constant bytes are written once, and
each block is copied out (in one piece, or one row per record); the timestamp tails
of the second case are written as the 8-byte word ending each record.

Decoding reads long runs of consecutive equal-length records through a *template*:
the first record of the run is walked, and every byte that is not payload (tags,
length prefixes, continuation bits of the value varints) must equal the template's
(checked for a block of records in one pass, as 4-byte words against the template's
mask repeated); records that fit are read with strided views, the others are left
for the walk. Records differing only in their timestamp's length are read through
the template of their common head, their tails as the 8-byte word ending each. The
walk follows every remaining record's framing in lockstep (tags and varints, all
records at once), then reads the fixed-width parts per layout group and checks their
tags. Records written any other way (packed floats, other field order, missing or
unknown fields, fewer values than ``dim``) are parsed one by one with protobuf.
:func:`check_entry_dumps` runs the same checks without building value columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from protos import embedding_hash_table_pb2 as eht
from protos.wire import (
    WIRE_I32,
    WIRE_I64,
    WIRE_LEN,
    WIRE_VARINT,
    as_u64,
    key,
    put_varints,
    varint_lengths,
    varint_values,
)
from ps_server.engine.hash_table import EmbeddingHashTable, EntrySelection
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot
from ps_server.engine.types import Floats, Ids
from ps_server.errors import (
    CheckpointCorruptError,
    ConfigError,
    ConfigMismatchError,
    DimMismatchError,
)

Buffer = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]

# Target bytes per group chunk: bounds temporaries while keeping numpy calls large.
_CHUNK_BYTES = 1 << 24
# Bytes of the scratch matrix records are written through (about a CPU cache's worth).
_SCRATCH_BYTES = 1 << 19
# Bytes of records a template's repeated mask covers (see _tiles).
_TILE_BYTES = 1 << 16
# Records per block when reading: bounds the temporaries of a template check.
_BLOCK_BYTES = 1 << 19
# The high bit of every byte of a word, and the high bits a varint of k bytes has.
_HIGH_BITS = 0x8080808080808080
_VARINT_HIGH = np.array(
    [0] + [sum(0x80 << (8 * j) for j in range(k - 1)) for k in range(1, 8)], np.uint64
)
# Runs of at least this many equal-length records are read through a template.
_MIN_RUN = 128
# Records left over by the runs are read grouped by length when a length has this many.
_MIN_GROUP = 128


_ID_TAG = key(1, WIRE_I64)
_NUM_TAG = key(2, WIRE_I32)
_OPT_TAG = key(3, WIRE_LEN)
_TS_TAG = key(4, WIRE_VARINT)
_DUMP_TAG = key(1, WIRE_LEN)


@dataclass(frozen=True)
class _SlotCodec:
    slot: StateSlot
    tag: bytes
    is_float: bool


@dataclass(frozen=True)
class _SegmentCodec:
    """Wire facts of one segment, checked against the proto schema once."""

    index: int
    optimizer: Optimizer
    dump_name: str | None  # the SingleOptimizerDump member, None: no dump
    dump_tag: bytes
    slots: tuple[_SlotCodec, ...]
    fixed_inner_len: int  # bytes of the dump message that no varint affects


def _segment_codec(index: int, optimizer: Optimizer) -> _SegmentCodec:
    field = optimizer.dump_field
    if field is None:
        return _SegmentCodec(index, optimizer, None, b"", (), 0)
    holder = eht.SingleOptimizerDump.DESCRIPTOR.fields_by_number.get(field)
    if holder is None or holder.message_type is None:
        raise ConfigError(
            f"segment {index}: {type(optimizer).__name__}.dump_field {field} is not a "
            "SingleOptimizerDump member"
        )
    fields = holder.message_type.fields_by_number
    slots = []
    fixed = 0
    for slot in optimizer.slots():
        fd = fields.get(slot.field)
        where = f"segment {index}: slot {slot.name!r} (field {slot.field} of {holder.name})"
        if fd is None or fd.name != slot.name:
            found = "nothing" if fd is None else repr(fd.name)
            raise ConfigError(f"{where} does not match the dump schema, which has {found} there")
        repeated = bool(fd.is_repeated)
        is_float = slot.dtype == np.float32
        if is_float:
            if fd.type != fd.TYPE_FLOAT or repeated != slot.repeated:
                raise ConfigError(f"{where}: the schema field is not a matching float field")
            if not slot.repeated and slot.width != 1:
                raise ConfigError(f"{where}: a scalar slot must have width 1")
            tag = key(slot.field, WIRE_I32)
            fixed += slot.width * (len(tag) + 4)
        elif slot.dtype == np.int64:
            if fd.type != fd.TYPE_INT64 or repeated or slot.repeated or slot.width != 1:
                raise ConfigError(f"{where}: only scalar int64 fields are supported")
            tag = key(slot.field, WIRE_VARINT)
            fixed += len(tag)
        else:
            raise ConfigError(f"{where}: unsupported dtype {slot.dtype}")
        slots.append(_SlotCodec(slot, tag, is_float))
    return _SegmentCodec(index, optimizer, holder.name, key(field, WIRE_LEN), tuple(slots), fixed)


def _check_dims(optimizers: Sequence[Optimizer], dim: int) -> None:
    total = sum(opt.dim for opt in optimizers)
    if total != dim:
        raise DimMismatchError(
            f"segment dims {[opt.dim for opt in optimizers]} add up to {total}, values have "
            f"dim {dim}"
        )


def _spans(offsets: Offsets, row_bytes: int) -> Iterator[tuple[int, int]]:
    """Consecutive record ranges ``[a, b)`` of bounded size, for bounded temporaries.

    A range holds at most ``_CHUNK_BYTES // row_bytes`` records and, unless it is a
    single record, at most ``_CHUNK_BYTES`` bytes.
    """
    n = offsets.size - 1
    most = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    a = 0
    while a < n:
        fit = int(np.searchsorted(offsets, offsets[a] + _CHUNK_BYTES, side="right")) - 1
        b = max(a + 1, min(n, a + most, fit))
        yield a, b
        a = b


def _groups(signature: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.int64]]:
    """Row indices per distinct row of ``signature`` ``[m, k]`` (one group if uniform)."""
    m, k = signature.shape
    if bool((signature == signature[0]).all()):
        return [np.arange(m, dtype=np.int64)]
    code = np.zeros(m, np.uint64)
    for column in signature.T:  # exact up to 8 columns; wider ones are verified below
        code = code * np.uint64(256) + column
    groups: list[npt.NDArray[np.int64]] = []
    left = np.arange(m, dtype=np.int64)
    while left.size and len(groups) < 8:  # a few layouts: peel them off one by one
        hit = code[left] == code[left[0]]
        groups.append(left[hit])
        left = left[~hit]
    if left.size:
        _, inverse = np.unique(code[left], return_inverse=True)
        groups += [left[inverse.ravel() == g] for g in range(int(inverse.max()) + 1)]
    if k > 8 and not all(bool((signature[g] == signature[g[0]]).all()) for g in groups):
        _, inverse = np.unique(signature, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        groups = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    return groups


def _row_mask(lens: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.bool_]:
    """``[m, width]`` True where a byte of a record padded to ``width`` is real."""
    return np.arange(width) < lens[:, None]


def _strided(rec: Buffer, pos: int, width: int, step: int, dtype: str) -> npt.NDArray[Any]:
    """``[m, width]`` elements of ``dtype`` at byte ``pos + step * j`` of each row of ``rec``.

    A view (writable if ``rec`` is); ``rec`` is a C-contiguous ``uint8[m, record_len]``
    with at least one row. Elements need not be aligned.
    """
    m, length = rec.shape
    return np.ndarray((m, width), dtype, buffer=rec, offset=pos, strides=(length, step))


def _windows(buffer: Buffer, length: int) -> Buffer:
    """``uint8[buffer.size - length + 1, length]``: row ``k`` is ``buffer[k:k + length]``.

    Overlapping rows, no copy: fancy-indexing its first axis gathers (or scatters)
    whole records at arbitrary offsets, one contiguous copy per record.
    """
    return np.lib.stride_tricks.as_strided(
        buffer, shape=(buffer.size - length + 1, length), strides=(1, 1),
        writeable=buffer.flags.writeable,
    )


def _put_floats(rec: Buffer, pos: int, tag: bytes, floats: npt.NDArray[Any]) -> int:
    width = floats.shape[1]
    step = len(tag) + 4
    for j, byte in enumerate(tag):
        _strided(rec, pos + j, width, step, "u1")[...] = byte
    _strided(rec, pos + len(tag), width, step, "<f4")[...] = floats
    return pos + width * step


def _put_const(rec: Buffer, pos: int, const: bytes) -> int:
    rec[:, pos : pos + len(const)] = np.frombuffer(const, np.uint8)
    return pos + len(const)


def encode_entry_dumps(
    values: Floats,
    segments: Sequence[tuple[Optimizer, State]],
    timestamps: npt.NDArray[np.int64],
    ids: Ids | None,
) -> tuple[Buffer, Offsets]:
    """Serialize ``n`` entries as ``EntryDump`` records, all in one buffer.

    Record ``i`` is ``buffer[offsets[i]:offsets[i + 1]]`` and equals, byte for byte,
    ``EntryDump.SerializeToString()`` of the message Monolith writes for the entry:
    ``id`` (only when ``ids`` is given), every value in ``num``, ``opt`` with one
    ``SingleOptimizerDump`` per segment whose optimizer has a ``dump_field`` (in
    segment order, present even when empty) and ``last_update_ts_sec``.

    :param values: ``float32[n, dim]``, all segments concatenated.
    :param segments: per segment in order, its optimizer and its state rows
        ``{slot name: array[n, width]}``.
    :param timestamps: ``int64[n]`` last update times (seconds).
    :param ids: ``int64[n]`` ids, or None to leave ``id`` out (``lookup_entry``).
    :returns: ``(buffer uint8[total], offsets int64[n + 1])``.
    :raises DimMismatchError: shapes disagree with each other or with the segments.
    :raises ConfigError: an optimizer's slots do not match the dump schema.
    """
    buffer, offsets = _encode(values, segments, timestamps, ids, None)
    assert offsets is not None
    return buffer, offsets


def encode_entry_dump_rows(
    values: Floats,
    segments: Sequence[tuple[Optimizer, State]],
    timestamps: npt.NDArray[np.int64],
    ids: Ids | None,
    margins: tuple[int, int],
) -> tuple[Buffer, Offsets | None]:
    """:func:`encode_entry_dumps`, with room around each record when all records
    have the same length (one layout: the usual case of uniform timestamps).

    Then returns ``(rows, None)``: ``rows`` is ``uint8[n, before + length + after]``
    for ``margins == (before, after)``, record ``i`` at ``rows[i, before:before +
    length]``, the margins left uninitialized (for a container's framing, e.g.
    TFRecord's header and CRC, written without copying the records again).
    Otherwise returns what :func:`encode_entry_dumps` does.

    :raises: as :func:`encode_entry_dumps`.
    """
    return _encode(values, segments, timestamps, ids, margins)


def _encode(
    values: Floats,
    segments: Sequence[tuple[Optimizer, State]],
    timestamps: npt.NDArray[np.int64],
    ids: Ids | None,
    margins: tuple[int, int] | None,
) -> tuple[Buffer, Offsets | None]:
    values = np.asarray(values)
    if values.ndim != 2:
        raise DimMismatchError(f"values must be [n, dim], got shape {values.shape}")
    n, dim = values.shape
    _check_dims([opt for opt, _ in segments], dim)
    ts = np.asarray(timestamps)
    if ts.shape != (n,):
        raise DimMismatchError(f"timestamps must have shape ({n},), got {ts.shape}")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (n,):
            raise DimMismatchError(f"ids must have shape ({n},), got {ids.shape}")
        ids = np.ascontiguousarray(ids, dtype="<i8")
    codecs = [_segment_codec(k, opt) for k, (opt, _) in enumerate(segments)]
    states = [state for _, state in segments]
    for codec, state in zip(codecs, states, strict=True):
        for sc in codec.slots:
            arr = state.get(sc.slot.name)
            if arr is None or arr.shape != (n, sc.slot.width):
                got = None if arr is None else arr.shape
                raise DimMismatchError(
                    f"segment {codec.index} slot {sc.slot.name!r} must have shape "
                    f"({n}, {sc.slot.width}), got {got}"
                )

    # Varints in record order: opt's length; per dumping segment its dump's length,
    # its message's length and its int64 scalars; the timestamp. Lengths nest, so
    # they are computed from the inside out.
    opt_len = np.zeros(n, np.int64)
    per_segment: list[list[npt.NDArray[np.uint64]]] = []
    for codec, state in zip(codecs, states, strict=True):
        if codec.dump_name is None:
            continue
        scalars = [as_u64(state[sc.slot.name].reshape(n)) for sc in codec.slots if not sc.is_float]
        inner_len = np.full(n, codec.fixed_inner_len, np.int64)
        for raw in scalars:
            inner_len += varint_lengths(raw)
        single_len = len(codec.dump_tag) + varint_lengths(inner_len.view(np.uint64)) + inner_len
        opt_len += len(_DUMP_TAG) + varint_lengths(single_len.view(np.uint64)) + single_len
        per_segment.append([single_len.view(np.uint64), inner_len.view(np.uint64), *scalars])
    varints = [opt_len.view(np.uint64), *itertools.chain(*per_segment), as_u64(ts)]
    lengths = [varint_lengths(v) for v in varints]

    record_len = (
        (len(_ID_TAG) + 8 if ids is not None else 0)
        + dim * (len(_NUM_TAG) + 4)
        + len(_OPT_TAG)
        + lengths[0]
        + opt_len
        + len(_TS_TAG)
        + lengths[-1]
    )
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(record_len, out=offsets[1:])
    if n == 0:
        return np.empty(0, np.uint8), offsets
    signature = np.empty((n, len(lengths)), np.uint8)
    for column, length in zip(signature.T, lengths, strict=True):
        column[...] = length
    # Varints equal in every record are part of the template (written once per layout).
    same = [bool(v.min() == v.max()) for v in varints]
    same_len = [bool(k.min() == k.max()) for k in lengths]
    if all(same_len):
        size = int(record_len[0])
        before, after = margins or (0, 0)
        rows = np.empty((n, before + size + after), np.uint8)
        _encode_blocks(rows[:, before : before + size], signature, values, codecs, states,
                       varints, ids, same)
        if margins is not None:
            return rows, None
        return rows.reshape(-1), offsets
    buffer = np.empty(int(offsets[-1]), np.uint8)

    def write(rec: Buffer, sel: slice | Ids, first: int, ts: bool = True) -> None:
        # The first record written whole gives every constant byte of the layout;
        # broadcast to all rows (one contiguous copy each), then only payload.
        layout = [int(x) for x in signature[first]]
        one = slice(first, first + 1)
        _write_records(rec[:1], one, layout, values, codecs, states, varints, ids, None, ts)
        if rec.shape[0] > 1:
            rec[1:] = rec[0]
            _write_records(rec, sel, layout, values, codecs, states, varints, ids, same, ts)

    # A uniform range is written in place. In a mixed one, when only the timestamp's
    # length varies (the usual case), every record's bytes before it are written as
    # one matrix and scattered to the record offsets, then each timestamp length's
    # tails; otherwise each layout is written as a matrix and scattered.
    ts_bytes = len(_TS_TAG) + lengths[-1]
    if all(same_len[:-1]):
        _encode_heads(buffer, offsets, signature, values, codecs, states, varints, ids, same,
                      int(record_len[0] - ts_bytes[0]))
        return buffer, offsets
    for a, b in _spans(offsets, int(record_len.max())):
        region = buffer[offsets[a] : offsets[b]]
        sig = signature[a:b]
        groups = _groups(sig)
        if len(groups) == 1:
            write(region.reshape(b - a, -1), slice(a, b), a)
            continue
        starts = offsets[a:b] - offsets[a]
        if len(_groups(sig[:, :-1])) == 1:
            # The heads in place: the first one whole, copied to every record's
            # start (one contiguous copy each), then each payload field scattered.
            head = int(record_len[a] - ts_bytes[a])
            layout = [int(x) for x in signature[a]]
            one = np.empty((1, head), np.uint8)
            _write_records(one, slice(a, a + 1), layout, values, codecs, states, varints,
                           ids, None, False)
            _windows(region, head)[starts] = one
            end = _write_records(region, slice(a, b), layout, values, codecs, states,
                                 varints, ids, same, False, starts)
            assert end == head, "layout arithmetic out of step with the writer"
            for local in groups:
                k = int(lengths[-1][a + int(local[0])])
                tail = np.empty((local.size, len(_TS_TAG) + k), np.uint8)
                pos = _put_const(tail, 0, _TS_TAG)
                put_varints(tail, pos, varints[-1][local + a], k)
                _windows(region, tail.shape[1])[starts[local] + head] = tail
            continue
        for local in groups:
            size = int(record_len[a + int(local[0])])
            rec = np.empty((local.size, size), np.uint8)
            write(rec, local + a, a + int(local[0]))
            _windows(region, size)[starts[local]] = rec
    return buffer, offsets


def _encode_blocks(
    out: Buffer,
    signature: npt.NDArray[np.uint8],
    values: npt.NDArray[Any],
    codecs: list[_SegmentCodec],
    states: list[State],
    varints: list[npt.NDArray[np.uint64]],
    ids: Ids | None,
    same: list[bool],
) -> None:
    """Write records that all share one layout into the rows of ``out`` ``[n, length]``
    (maybe a view with longer rows), a block at a time through a cache-sized scratch
    matrix (constant bytes written once), each block copied in one piece."""
    n, length = out.shape
    layout = [int(x) for x in signature[0]]
    rows = min(n, max(1, _SCRATCH_BYTES // max(length, 1)))
    scratch = np.empty((rows, length), np.uint8)
    _write_records(scratch[:1], slice(0, 1), layout, values, codecs, states, varints, ids, None)
    scratch[1:] = scratch[0]
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = scratch[: b - a]
        _write_records(block, slice(a, b), layout, values, codecs, states, varints, ids, same)
        out[a:b] = block


def _encode_heads(
    buffer: Buffer,
    offsets: Offsets,
    signature: npt.NDArray[np.uint8],
    values: npt.NDArray[Any],
    codecs: list[_SegmentCodec],
    states: list[State],
    varints: list[npt.NDArray[np.uint64]],
    ids: Ids | None,
    same: list[bool],
    head: int,
) -> None:
    """Write records that differ only in the length of their timestamp (the usual
    mix: 0 beside real times); every record's first ``head`` bytes share one layout.

    The heads are written a block of records at a time into one small scratch
    matrix (cache-sized; its constant bytes are written once, each block only
    overwrites the payload), each block copied to its records' offsets (one
    contiguous copy per record); then each timestamp length's tails.
    """
    n = offsets.size - 1
    # Tails of up to 8 bytes first, each as the 8-byte word ending its record: the
    # word's lower bytes fall in the record's own head, written over below.
    ts_lens = signature[:, -1].astype(np.int64)
    ends = offsets[1:]
    short = (ts_lens + len(_TS_TAG) <= 8) & (ends - 8 >= offsets[:-1])
    if short.all():
        _put_tail_words(buffer, ends, varints[-1], ts_lens)
    elif short.any():
        _put_tail_words(buffer, ends[short], varints[-1][short], ts_lens[short])
    layout = [int(x) for x in signature[0]]
    rows = min(n, max(1, _SCRATCH_BYTES // max(head, 1)))
    scratch = np.empty((rows, head), np.uint8)
    _write_records(scratch[:1], slice(0, 1), layout, values, codecs, states, varints, ids,
                   None, False)
    scratch[1:] = scratch[0]
    heads = _windows(buffer, head)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = scratch[: b - a]
        end = _write_records(block, slice(a, b), layout, values, codecs, states, varints, ids,
                             same, False)
        assert end == head, "layout arithmetic out of step with the writer"
        heads[offsets[a:b]] = block
    if short.all():
        return
    for k in np.unique(ts_lens[~short]).tolist():
        idx = np.flatnonzero((ts_lens == k) & ~short)
        tail = np.empty((idx.size, len(_TS_TAG) + k), np.uint8)
        pos = _put_const(tail, 0, _TS_TAG)
        put_varints(tail, pos, varints[-1][idx], k)
        _windows(buffer, tail.shape[1])[offsets[idx] + head] = tail


def _put_tail_words(buffer: Buffer, ends: Offsets, raw: npt.NDArray[np.uint64],
                    lens: npt.NDArray[np.int64]) -> None:
    """Write each timestamp tag and varint (``lens`` bytes, at most 7) as the top bytes
    of the 8-byte word ending at ``ends``; the word's other bytes are garbage."""
    # The varint's 7-bit groups spread one per byte (bytes past its length are 0,
    # varints being as short as possible), its continuation bits, then the tag.
    word = raw & np.uint64(0x7F)
    group = np.empty_like(raw)
    for j in range(1, 7):
        np.right_shift(raw, np.uint64(7 * j), out=group)
        group &= np.uint64(0x7F)
        group <<= np.uint64(8 * j)
        word |= group
    word |= _VARINT_HIGH[lens]
    word <<= np.uint64(8)
    word |= np.uint64(_TS_TAG[0])
    word <<= ((8 - len(_TS_TAG) - lens) * 8).astype(np.uint64)
    np.ndarray((buffer.size - 7,), "<u8", buffer=buffer, strides=(1,))[ends - 8] = word


def _write_records(
    rec: Buffer,
    sel: slice | Ids,
    layout: list[int],
    values: npt.NDArray[Any],
    codecs: list[_SegmentCodec],
    states: list[State],
    varints: list[npt.NDArray[np.uint64]],
    ids: Ids | None,
    same: list[bool] | None,
    ts: bool = True,
    starts: Offsets | None = None,
) -> int:
    """Fill ``rec`` ``[m, record_len]`` with the records ``sel``, all of one layout
    (``ts`` False: all but ``last_update_ts_sec``, ``rec`` that much shorter).

    ``same`` None: every byte. Otherwise ``rec`` already holds the layout's constant
    bytes (tags, and the varints ``same`` marks equal in all records): only the rest.
    With ``starts`` (only with ``same``), ``rec`` is a flat buffer whose records
    begin at ``starts``: each field is scattered there (strided element views whose
    rows start at every byte), no matrix in between. Returns the bytes per record.
    """
    every = same is None
    assert starts is None or not every, "scattered records need their constant bytes"

    def scatter(pos: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: str,
                data: npt.NDArray[Any]) -> None:
        assert starts is not None
        span = sum((k - 1) * st for k, st in zip(shape, strides, strict=True))
        rows = rec.size - pos - span - np.dtype(dtype).itemsize + 1
        view = np.ndarray((rows, *shape), dtype, buffer=rec, offset=pos,
                          strides=(1, *strides))
        view[starts] = data

    def const(pos: int, tag: bytes) -> int:
        return _put_const(rec, pos, tag) if every else pos + len(tag)

    def floats(pos: int, tag: bytes, data: npt.NDArray[Any]) -> int:
        if every:
            return _put_floats(rec, pos, tag, data)
        width = data.shape[1]
        step = len(tag) + 4
        if starts is None:
            _strided(rec, pos + len(tag), width, step, "<f4")[...] = data
        else:
            scatter(pos + len(tag), (width,), (step,), "<f4", data)
        return pos + width * step

    def varint(pos: int, v: int) -> int:
        if every or not same[v]:  # type: ignore[index]
            if starts is None:
                return put_varints(rec, pos, _rows(varints[v], sel), layout[v])
            raw = _rows(varints[v], sel)
            for k in range(layout[v]):
                byte = (raw >> np.uint64(7 * k)) & np.uint64(0x7F)
                if k < layout[v] - 1:
                    byte |= np.uint64(0x80)
                rec[starts + (pos + k)] = byte
        return pos + layout[v]

    pos = 0
    if ids is not None:
        pos = const(pos, _ID_TAG)
        if starts is None:
            rec[:, pos : pos + 8] = _rows(ids, sel).view(np.uint8).reshape(-1, 8)
        else:
            scatter(pos, (), (), "<i8", _rows(ids, sel))
        pos += 8
    pos = floats(pos, _NUM_TAG, _rows(values, sel))
    pos = const(pos, _OPT_TAG)
    pos = varint(pos, 0)
    v = 1
    for codec, state in zip(codecs, states, strict=True):
        if codec.dump_name is None:
            continue
        pos = const(pos, _DUMP_TAG)
        pos = varint(pos, v)
        pos = const(pos, codec.dump_tag)
        pos = varint(pos, v + 1)
        v += 2
        for sc in codec.slots:
            if sc.is_float:
                pos = floats(pos, sc.tag, _rows(state[sc.slot.name], sel))
            else:
                pos = const(pos, sc.tag)
                pos = varint(pos, v)
                v += 1
    if ts:
        pos = const(pos, _TS_TAG)
        pos = varint(pos, v)
    assert starts is not None or pos == rec.shape[1], "layout arithmetic out of step"
    return pos


def split_records(buffer: Buffer, offsets: Offsets) -> list[bytes]:
    """The records of ``buffer`` as separate ``bytes`` (``offsets`` ``int64[n + 1]``)."""
    view = np.ascontiguousarray(buffer, dtype=np.uint8).data
    bounds = np.asarray(offsets).tolist()
    return [view[a:b].tobytes() for a, b in itertools.pairwise(bounds)]


@dataclass
class DecodedEntries:
    """Columns decoded from ``n`` ``EntryDump`` records.

    :param ids: ``int64[n]``; 0 where a record has no ``id``.
    :param values: ``float32[n, dim]``; positions past a record's ``num`` count are 0.
    :param num_lengths: ``int64[n]`` how many ``num`` floats each record carried.
    :param states: per segment ``{slot: array[n, width]}``; rows of records whose
        ``opt`` lacked that segment's dump keep the optimizer's ``init_state`` values.
    :param has_state: ``bool[n]`` whether ``opt`` carried every segment's dump.
    :param timestamps: ``int64[n]`` ``last_update_ts_sec``; 0 where absent.
    """

    ids: Ids
    values: Floats
    num_lengths: npt.NDArray[np.int64]
    states: list[State]
    has_state: npt.NDArray[np.bool_]
    timestamps: npt.NDArray[np.int64]


class _Walk:
    """A cursor per record, advanced in lockstep over the expected framing.

    ``ok`` turns False for a record as soon as its bytes differ from the framing
    this module writes; such records go to the protobuf parser.
    """

    def __init__(self, buffer: Buffer, starts: Offsets, ends: Offsets) -> None:
        self.buffer = buffer if buffer.size else np.zeros(1, np.uint8)
        self.last = self.buffer.size - 1
        self.pos = starts.copy()
        self.end = ends
        self.ok = np.ones(starts.size, np.bool_)

    def byte(self, k: int = 0) -> npt.NDArray[np.uint8]:
        return self.buffer[np.minimum(self.pos + k, self.last)]

    def expect(self, const: bytes) -> None:
        for k, b in enumerate(const):
            self.ok &= (self.pos + k < self.end) & (self.byte(k) == b)
        self.pos += len(const)

    def varint(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        value = np.zeros(self.pos.size, np.uint64)
        length = np.zeros(self.pos.size, np.int64)
        going = self.ok.copy()
        for k in range(10):
            if not going.any():
                break
            inside = self.pos + k < self.end
            self.ok &= inside | ~going
            going &= inside
            byte = self.byte(k)
            value |= np.where(going, byte & 0x7F, 0).astype(np.uint64) << np.uint64(7 * k)
            length += going
            going &= byte >= 0x80
        self.ok &= ~going
        self.pos += length
        return value, length


@dataclass
class _Framing:
    """What a lockstep walk found in each of ``k`` records.

    :param ok: the record has exactly the framing this module writes.
    :param lens: byte length of every varint, in record order (the record's layout).
    :param floats: per float piece (``num`` first, then the float slots in segment
        and field order): its start relative to the record, its tag and its width.
    :param values: per value varint (the int64 slots in order, then the timestamp):
        its start relative to the record, its raw value and its byte length.
    """

    ok: npt.NDArray[np.bool_]
    has_id: npt.NDArray[np.bool_]
    lens: list[npt.NDArray[np.int64]]
    floats: list[tuple[Offsets, bytes, int]]
    values: list[tuple[Offsets, npt.NDArray[np.uint64], npt.NDArray[np.int64]]]


def _walk(
    buffer: Buffer, starts: Offsets, ends: Offsets, codecs: list[_SegmentCodec], dim: int
) -> _Framing:
    """Walk the records ``buffer[starts[i]:ends[i]]`` over our framing, all at once."""
    walk = _Walk(buffer, starts, ends)
    has_id = (walk.pos < walk.end) & (walk.byte() == _ID_TAG[0])
    walk.pos += has_id * (len(_ID_TAG) + 8)
    floats = [(walk.pos - starts, _NUM_TAG, dim)]
    walk.pos += dim * (len(_NUM_TAG) + 4)
    walk.expect(_OPT_TAG)
    opt_len, opt_len_len = walk.varint()
    lens = [opt_len_len]
    opt_end = walk.pos + opt_len.view(np.int64)
    values = []
    for codec in codecs:
        if codec.dump_name is None:
            continue
        walk.expect(_DUMP_TAG)
        single_len, single_len_len = walk.varint()
        single_end = walk.pos + single_len.view(np.int64)
        walk.expect(codec.dump_tag)
        inner_len, inner_len_len = walk.varint()
        inner_end = walk.pos + inner_len.view(np.int64)
        lens += [single_len_len, inner_len_len]
        for sc in codec.slots:
            if sc.is_float:
                floats.append((walk.pos - starts, sc.tag, sc.slot.width))
                walk.pos += sc.slot.width * (len(sc.tag) + 4)
            else:
                walk.expect(sc.tag)
                at = walk.pos - starts
                raw, raw_len = walk.varint()
                lens.append(raw_len)
                values.append((at, raw, raw_len))
        walk.ok &= (walk.pos == inner_end) & (walk.pos == single_end)
    walk.ok &= walk.pos == opt_end
    walk.expect(_TS_TAG)
    at = walk.pos - starts
    ts_raw, ts_len = walk.varint()
    lens.append(ts_len)
    values.append((at, ts_raw, ts_len))
    walk.ok &= walk.pos == walk.end
    return _Framing(walk.ok, has_id, lens, floats, values)


@dataclass
class _Sinks:
    """Where decoded fields go, by record index (None: check only, not kept).

    ``floats`` matches :attr:`_Framing.floats` and ``ints`` :attr:`_Framing.values`.
    """

    ids: Ids
    floats: list[npt.NDArray[Any]] | None
    ints: list[npt.NDArray[Any]] | None


def _sinks(codecs: list[_SegmentCodec], ids: Ids, out: DecodedEntries | None) -> _Sinks:
    if out is None:
        return _Sinks(ids, None, None)
    floats = [out.values]
    ints = []
    for codec in codecs:
        if codec.dump_name is None:
            continue
        state = out.states[codec.index]
        for sc in codec.slots:
            if sc.is_float:
                floats.append(state[sc.slot.name])
            else:
                ints.append(state[sc.slot.name][:, 0])
    ints.append(out.timestamps)
    return _Sinks(ids, floats, ints)


@dataclass(frozen=True)
class _Template:
    """The byte layout shared by records of one length and one set of varint lengths.

    Taken from one record that walked cleanly. A record of the same length fits
    iff its bytes under ``mask`` equal ``expected``: every tag and length prefix is
    the same byte, and each value varint (timestamp, int64 slots) has its
    continuation bits where the template's has them. Those bytes are compared as
    8-byte words (``words``: start, mask, expected); float tags are compared apart,
    through strided views (they are ``mask`` 0, like every payload byte).
    """

    length: int
    has_id: bool
    mask: Buffer
    expected: Buffer
    words: tuple[tuple[int, np.uint64, np.uint64], ...]
    floats: tuple[tuple[int, bytes, int], ...]  # (start, tag, width) per float piece
    values: tuple[tuple[int, int], ...]  # (start, byte length) per value varint
    # Every checked byte (float tags included) as a row of 8-byte words: mask and
    # expected of words 0 .. length // 8 - 1, then of the word ending the record.
    row_words: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], np.uint64, np.uint64]
    # Mask and expected bytes of a few records back to back, as 4-byte words (under
    # key 0, filled on use, for records whose length is a multiple of 4).
    tiles: dict[int, tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]] = field(
        default_factory=dict, compare=False
    )
    # Where the id's 8 bytes start (after its tag; later in a template of framed records).
    id_at: int = len(_ID_TAG)


def _template(
    buffer: Buffer, start: int, length: int, codecs: list[_SegmentCodec], dim: int
) -> _Template | None:
    """The template of the record ``buffer[start:start + length]``; None if it is foreign."""
    framing = _walk(
        buffer, np.array([start], np.int64), np.array([start + length], np.int64), codecs, dim
    )
    if not framing.ok[0]:
        return None
    mask = np.full(length, 0xFF, np.uint8)
    has_id = bool(framing.has_id[0])
    if has_id:
        mask[len(_ID_TAG) : len(_ID_TAG) + 8] = 0
    floats = []
    for rel, tag, width in framing.floats:
        at = int(rel[0])
        floats.append((at, tag, width))
        mask[at : at + width * (len(tag) + 4)] = 0
    values = []
    for rel, _, nbytes in framing.values:
        at, k = int(rel[0]), int(nbytes[0])
        values.append((at, k))
        mask[at : at + k] = 0x80
    expected = buffer[start : start + length] & mask
    return _Template(
        length, has_id, mask, expected, _words(mask, expected), tuple(floats), tuple(values),
        _row_words(mask, expected, tuple(floats)),
    )


def _words(mask: Buffer, expected: Buffer) -> tuple[tuple[int, np.uint64, np.uint64], ...]:
    """Cover the masked bytes with 8-byte windows (a short record is padded to one)."""
    length = mask.size
    padded_mask = np.zeros(max(length, 8), np.uint8)
    padded_mask[:length] = mask
    padded_expected = np.zeros(max(length, 8), np.uint8)
    padded_expected[:length] = expected
    words = []
    pos = 0
    for at in np.flatnonzero(padded_mask).tolist():
        if at < pos:
            continue
        pos = min(at, padded_mask.size - 8)
        window = slice(pos, pos + 8)
        words.append(
            (pos, padded_mask[window].view("<u8")[0], padded_expected[window].view("<u8")[0])
        )
        pos += 8
    return tuple(words)


def _full_bytes(
    mask: Buffer, expected: Buffer, floats: tuple[tuple[int, bytes, int], ...]
) -> tuple[Buffer, Buffer]:
    """Mask and expected bytes of a template with its float tags added."""
    full_mask = mask.copy()
    full_expected = expected.copy()
    for at, tag, width in floats:
        step = len(tag) + 4
        for j, byte in enumerate(tag):
            full_mask[at + j : at + width * step : step] = 0xFF
            full_expected[at + j : at + width * step : step] = byte
    return full_mask, full_expected


def _tiles(tpl: _Template) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    """The template's full mask and expected bytes repeated for ``_TILE_BYTES`` worth
    of records, as ``<u4`` words (kept on the template)."""
    got = tpl.tiles.get(0)
    if got is None:
        full_mask, full_expected = _full_bytes(tpl.mask, tpl.expected, tpl.floats)
        rows = max(1, _TILE_BYTES // max(tpl.length, 1))
        got = (np.tile(full_mask, rows).view("<u4"), np.tile(full_expected, rows).view("<u4"))
        tpl.tiles[0] = got
    return got


def _row_words(
    mask: Buffer, expected: Buffer, floats: tuple[tuple[int, bytes, int], ...]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], np.uint64, np.uint64]:
    """:attr:`_Template.row_words` of a template (its float tags added to the mask)."""
    length = mask.size
    full_mask, full_expected = _full_bytes(mask, expected, floats)
    padded_mask = np.zeros(max(length, 8), np.uint8)
    padded_mask[:length] = full_mask
    padded_expected = np.zeros(max(length, 8), np.uint8)
    padded_expected[:length] = full_expected
    words = length // 8
    last = slice(max(length, 8) - 8, max(length, 8))
    return (
        padded_mask[: words * 8].view("<u8").copy(),
        padded_expected[: words * 8].view("<u8").copy(),
        padded_mask[last].view("<u8")[0],
        padded_expected[last].view("<u8")[0],
    )


def _head(tpl: _Template, width: int) -> _Template:
    """The template of the records' bytes before ``last_update_ts_sec`` (its tag and
    varint are the last bytes of a record): the part that a timestamp of another
    length does not move; ``width`` bytes long, the bytes past it unchecked."""
    at, _ = tpl.values[-1]
    head = at - len(_TS_TAG)
    mask = np.zeros(width, np.uint8)
    expected = np.zeros(width, np.uint8)
    mask[:head], expected[:head] = tpl.mask[:head], tpl.expected[:head]
    return _Template(
        width, tpl.has_id, mask, expected, _words(mask, expected), tpl.floats, tpl.values[:-1],
        _row_words(mask, expected, tpl.floats),
    )


def _fitting(tpl: _Template, rec: Buffer) -> npt.NDArray[np.bool_] | None:
    """Which rows of ``rec`` ``[m, tpl.length]`` fit the template; None if all do."""
    if tpl.length < 8:  # too short for words: compare bytes
        checks: list[npt.NDArray[np.bool_]] = [(rec & tpl.mask) == tpl.expected]
        for at, tag, width in tpl.floats:
            step = len(tag) + 4
            for j, byte in enumerate(tag):
                checks.append(_strided(rec, at + j, width, step, "u1") == byte)
    else:
        m, length = rec.shape
        if length % 4 == 0 and rec.flags.c_contiguous:
            # The usual case, all rows fitting, in one pass: the block as 4-byte words
            # against the template repeated.
            tile_mask, tile_expected = _tiles(tpl)
            flat = rec.reshape(-1).view("<u4")
            whole = flat.size // tile_mask.size * tile_mask.size
            tiled = flat[:whole].reshape(-1, tile_mask.size)
            rest = flat[whole:]
            if bool((np.bitwise_and(tiled, tile_mask) == tile_expected).all()) and bool(
                (np.bitwise_and(rest, tile_mask[: rest.size]) == tile_expected[: rest.size]).all()
            ):
                return None
        # Every checked byte at once: the rows as 8-byte words (unaligned views).
        word_mask, word_expected, last_mask, last_expected = tpl.row_words
        words = np.ndarray((m, length // 8), "<u8", buffer=rec, strides=(length, 8))
        masked = np.bitwise_and(words, word_mask)
        checks = [masked == word_expected]
        if length % 8:
            last = _strided(rec, length - 8, 1, 8, "<u8")[:, 0]
            checks.append((last & last_mask) == last_expected)
    good: npt.NDArray[np.bool_] | None = None
    for eq in checks:
        if not eq.all():
            rows = eq if eq.ndim == 1 else np.all(eq, axis=1)
            good = rows if good is None else good & rows
    return good


def _read_runs(
    buffer: Buffer, offsets: Offsets, codecs: list[_SegmentCodec], dim: int, sinks: _Sinks
) -> npt.NDArray[np.bool_]:
    """Decode long runs of equal-length records through templates, in place.

    Returns the records left for the walk (short runs, records not fitting).
    """
    n = offsets.size - 1
    todo = np.ones(n, np.bool_)
    lengths = np.diff(offsets)
    cuts = np.flatnonzero(lengths[1:] != lengths[:-1]) + 1
    run_starts = np.concatenate(([0], cuts))
    run_stops = np.concatenate((cuts, [n]))
    long = np.flatnonzero(run_stops - run_starts >= _MIN_RUN)
    templates: dict[int, _Template | None] = {}
    for r in long.tolist():
        a, b = int(run_starts[r]), int(run_stops[r])
        length = int(lengths[a])
        first = buffer[offsets[a] : offsets[a] + length].reshape(1, length)
        tpl = templates.get(length)
        if length == 0 or tpl is None or _fitting(tpl, first) is not None:
            tpl = _template(buffer, int(offsets[a]), length, codecs, dim) if length else None
            templates[length] = tpl
        if tpl is None:
            continue
        most = max(1, _BLOCK_BYTES // length)
        for c in range(a, b, most):
            d = min(b, c + most)
            rec = buffer[offsets[c] : offsets[d]].reshape(d - c, length)
            good = _fitting(tpl, rec)
            if good is None:
                _take(tpl, rec, slice(None), slice(c, d), sinks)
                todo[c:d] = False
            else:
                rows = np.flatnonzero(good)
                if rows.size:
                    _take(tpl, rec, rows, c + rows, sinks)
                todo[c:d] = ~good
    _read_heads(buffer, offsets, codecs, dim, sinks, todo)
    _read_scattered(buffer, offsets, codecs, dim, sinks, todo, templates)
    return todo


def _read_heads(
    buffer: Buffer,
    offsets: Offsets,
    codecs: list[_SegmentCodec],
    dim: int,
    sinks: _Sinks,
    todo: npt.NDArray[np.bool_],
) -> None:
    """Decode the records still ``todo`` that differ from the first of them only in
    the length of their timestamp (the usual mix: 0 beside real times).

    Their bytes before the timestamp (the *head*, all of one length) are gathered in
    record order as one ``[m, head]`` matrix and read through the head of the first
    record's template; each tail (tag and varint) is checked and read per length.
    Records that do not fit stay ``todo``.
    """
    rest = np.flatnonzero(todo)
    if rest.size < _MIN_GROUP:
        return
    first = int(rest[0])
    tpl = _template(buffer, int(offsets[first]), int(offsets[first + 1] - offsets[first]),
                    codecs, dim)
    if tpl is None:
        return
    size = tpl.values[-1][0] - len(_TS_TAG)
    # Heads are gathered a multiple of 4 bytes wide (checked as 4-byte words), the
    # bytes past them (their tail, maybe the next record) unchecked.
    width = size if size < 8 else -(-size // 4) * 4
    head = _head(tpl, width)
    tails = offsets[rest + 1] - offsets[rest] - size
    # Tails of up to 8 bytes are read as the 8-byte word ending their record.
    cand = rest[(tails >= len(_TS_TAG) + 1) & (tails <= 8) & (offsets[rest + 1] >= 8)
                & (offsets[rest] + width <= buffer.size)]
    windows = _windows(buffer, width)
    words = np.ndarray((buffer.size - 7,), "<u8", buffer=buffer, strides=(1,))
    most = max(1, _BLOCK_BYTES // max(size, 1))
    for c in range(0, cand.size, most):
        idx = cand[c : c + most]
        starts = offsets[idx]
        rec = windows[starts]
        fit = _fitting(head, rec)
        good = np.ones(idx.size, np.bool_) if fit is None else fit
        ends = offsets[idx + 1]
        lens = ends - starts - size
        # The tail's bytes at the top of the word, shifted down: tag, then the varint.
        tail = words[ends - 8] >> ((8 - lens) * 8).astype(np.uint64)
        good &= (tail & np.uint64(0xFF)) == _TS_TAG[0]
        raw = tail >> np.uint64(8)
        good &= (raw & np.uint64(_HIGH_BITS)) == _VARINT_HIGH[lens - len(_TS_TAG)]
        ts = raw & np.uint64(0x7F)
        for j in range(1, 7):
            ts |= ((raw >> np.uint64(8 * j)) & np.uint64(0x7F)) << np.uint64(7 * j)
        rows: slice | Ids
        if good.all():
            rows = slice(None)
            whole = int(idx[-1]) - int(idx[0]) + 1 == idx.size
            dest: slice | Ids = slice(int(idx[0]), int(idx[-1]) + 1) if whole else idx
        else:
            rows = np.flatnonzero(good)
            dest = idx[rows]
        _take(head, rec, rows, dest, sinks)
        if sinks.ints is not None:
            sinks.ints[-1][dest] = ts[rows].view(np.int64)
        todo[dest] = False


def _read_scattered(
    buffer: Buffer,
    offsets: Offsets,
    codecs: list[_SegmentCodec],
    dim: int,
    sinks: _Sinks,
    todo: npt.NDArray[np.bool_],
    templates: dict[int, _Template | None],
) -> None:
    """Decode the records still ``todo`` grouped by length (mixed layouts interleave).

    Each length's records are gathered into a ``[m, length]`` matrix and read through
    the template of their first record; records that do not fit stay ``todo``.
    """
    rest = np.flatnonzero(todo)
    if rest.size < _MIN_GROUP:
        return
    starts = offsets[rest]
    lengths = offsets[rest + 1] - starts
    distinct, inverse = np.unique(lengths, return_inverse=True)
    if distinct.size > 16:  # not a few layouts: leave them to the walk
        return
    for g, length in enumerate(distinct.tolist()):
        idx = rest[inverse == g]
        if length == 0 or idx.size < _MIN_GROUP:
            continue
        tpl = templates.get(length)
        first = buffer[offsets[idx[0]] : offsets[idx[0]] + length].reshape(1, length)
        if tpl is None or _fitting(tpl, first) is not None:
            tpl = _template(buffer, int(offsets[idx[0]]), length, codecs, dim)
            templates[length] = tpl
        if tpl is None:
            continue
        windows = _windows(buffer, length)
        most = max(1, _BLOCK_BYTES // length)
        for c in range(0, idx.size, most):
            dest = idx[c : c + most]
            rec = windows[offsets[dest]]
            good = _fitting(tpl, rec)
            if good is None:
                _take(tpl, rec, slice(None), dest, sinks)
                todo[dest] = False
            else:
                rows = np.flatnonzero(good)
                if rows.size:
                    _take(tpl, rec, rows, dest[rows], sinks)
                todo[dest] = ~good


def _take(tpl: _Template, rec: Buffer, rows: slice | Ids, dest: slice | Ids, sinks: _Sinks
          ) -> None:
    """Copy the fields of the fitting rows ``rows`` of ``rec`` to records ``dest``."""
    if tpl.has_id:
        sinks.ids[dest] = _strided(rec, tpl.id_at, 1, 8, "<i8")[rows, 0]
    if sinks.floats is None or sinks.ints is None:
        return
    for (at, tag, width), target in zip(tpl.floats, sinks.floats, strict=True):
        target[dest] = _rows(_strided(rec, at + len(tag), width, len(tag) + 4, "<f4"), rows)
    for (at, k), target in zip(tpl.values, sinks.ints[: len(tpl.values)], strict=True):
        target[dest] = varint_values(_rows(rec[:, at : at + k], rows)).view(np.int64)


def _rows(a: npt.NDArray[Any], rows: slice | Ids) -> npt.NDArray[Any]:
    """``a[rows]``; whole rows taken with ``np.take``, much faster than fancy indexing."""
    return a[rows] if isinstance(rows, slice) else np.take(a, rows, axis=0)


def decode_entry_dumps(
    buffer: Buffer,
    offsets: Offsets,
    segment_optimizers: Sequence[Optimizer],
    dim: int,
) -> DecodedEntries:
    """Parse ``n`` ``EntryDump`` records into columns.

    Records laid out as :func:`encode_entry_dumps` writes them (with or without
    ``id``) are read with numpy, in groups; any other valid encoding is parsed with
    protobuf. ``opt.dump[k]`` belongs to the k-th segment that has a ``dump_field``
    (Monolith splits the list by position). A scalar slot missing from a dump that
    is present reads as the proto default 0, as Monolith's restore reads it.

    :param buffer: ``uint8`` bytes holding the records.
    :param offsets: ``int64[n + 1]``; record ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``.
    :param segment_optimizers: the table's optimizers, one per segment, in order.
    :param dim: the table's total dim.
    :raises CheckpointCorruptError: a record is not a valid ``EntryDump``, or
        ``offsets`` do not fit ``buffer``.
    :raises ConfigMismatchError: a record has more than ``dim`` values, other
        optimizer dumps than the segments, or a slot of the wrong width.
    :raises DimMismatchError: the segment dims do not add up to ``dim``.
    """
    n = max(0, np.asarray(offsets).size - 1)
    # Values and dumped state are left uninitialized: every record's are written,
    # the protobuf path starting from init_state (see _decode_walked).
    out = _new_entries(n, segment_optimizers, dim)
    _decode(buffer, offsets, segment_optimizers, dim, out)
    return out


def decode_framed_entry_dumps(
    buf: Buffer,
    runs: Sequence[tuple[int, int, int]],
    margins: tuple[int, int],
    segment_optimizers: Sequence[Optimizer],
    dim: int,
    *,
    columns: bool,
    templates: dict[int, Any] | None = None,
) -> tuple[Ids, DecodedEntries | None] | None:
    """Decode TFRecord-framed records in their frames, without copying them out first.

    Only the common case is taken: every run (``(position of the first frame, record
    length, count)``, frames back to back, ``margins`` = framing bytes before and after
    each record) is at least ``_MIN_RUN`` records long and every record fits the
    template of the run's first record, read exactly as :func:`decode_entry_dumps`
    reads such runs. Anything else (short runs, a record not fitting, any error)
    returns None and nothing is reported: the caller decodes a copy of the records
    with :func:`decode_entry_dumps` / :func:`check_entry_dumps`, which decide and
    word every error. The frames' CRCs are not looked at (the reader checked them).

    :param templates: kept by the caller between calls on chunks of one file for one
        table (same ``margins``, optimizers and dim): the templates found so far, by
        record length. One is reused only if the run's first record fits it (as
        :func:`decode_entry_dumps` reuses them between runs).
    :returns: the ids and, with ``columns``, the decoded entries (None without).
    """
    before, after = margins
    n = sum(count for _, _, count in runs)
    if n == 0 or any(count < _MIN_RUN or length == 0 for _, length, count in runs):
        return None
    try:
        _check_dims(segment_optimizers, dim)
        codecs = [_segment_codec(k, opt) for k, opt in enumerate(segment_optimizers)]
        out = _new_entries(n, segment_optimizers, dim) if columns else None
        ids = out.ids if out is not None else np.zeros(n, np.int64)
        sinks = _sinks(codecs, ids, out)
        done = 0
        for start, length, count in runs:
            period = before + length + after
            framed = templates.get(length) if templates is not None else None
            first = buf[start : start + period].reshape(1, period)
            if framed is None or _fitting(framed, first) is not None:
                tpl = _template(buf, start + before, length, codecs, dim)
                if tpl is None:
                    return None
                framed = _framed_template(tpl, before, period)
                if templates is not None:
                    templates[length] = framed
            most = max(1, _BLOCK_BYTES // period)
            for c in range(0, count, most):
                d = min(count, c + most)
                rec = buf[start + c * period : start + d * period].reshape(d - c, period)
                if _fitting(framed, rec) is not None:
                    return None
                _take(framed, rec, slice(None), slice(done + c, done + d), sinks)
            done += count
    except Exception:  # the copying path decides and reports
        return None
    return ids, out


def _framed_template(tpl: _Template, before: int, period: int) -> _Template:
    """``tpl`` for records read in their frames: ``before`` unchecked bytes ahead of
    each record and the rest of ``period`` after it unchecked (the framing)."""
    mask = np.zeros(period, np.uint8)
    expected = np.zeros(period, np.uint8)
    mask[before : before + tpl.length] = tpl.mask
    expected[before : before + tpl.length] = tpl.expected
    floats = tuple((at + before, tag, width) for at, tag, width in tpl.floats)
    values = tuple((at + before, k) for at, k in tpl.values)
    return _Template(
        period, tpl.has_id, mask, expected, _words(mask, expected), floats, values,
        _row_words(mask, expected, floats), id_at=tpl.id_at + before,
    )


def _new_entries(n: int, segment_optimizers: Sequence[Optimizer], dim: int) -> DecodedEntries:
    """Columns for ``n`` decoded records (values and dumped state uninitialized)."""
    return DecodedEntries(
        ids=np.zeros(n, np.int64),
        values=np.empty((n, dim), np.float32),
        num_lengths=np.full(n, dim, np.int64),
        states=[_unset_state(opt, n) for opt in segment_optimizers],
        has_state=np.ones(n, np.bool_),
        timestamps=np.empty(n, np.int64),
    )


def _unset_state(opt: Optimizer, n: int) -> State:
    """State rows for ``n`` records: uninitialized if the dump holds every slot."""
    init = opt.init_state(0)
    dumped = {slot.name for slot in opt.slots()} if opt.dump_field is not None else set()
    if not init.keys() <= dumped:
        return opt.init_state(n)
    return {k: np.empty((n, *a.shape[1:]), a.dtype) for k, a in init.items()}


def check_entry_dumps(
    buffer: Buffer,
    offsets: Offsets,
    segment_optimizers: Sequence[Optimizer],
    dim: int,
) -> Ids:
    """Check ``n`` records as :func:`decode_entry_dumps` would, keeping only their ids.

    Raises exactly what decoding the same records raises, but reads no values,
    state or timestamps of records in our own layout (foreign records are still
    parsed with protobuf), so it is several times faster.

    :returns: ``int64[n]`` ids, 0 where a record has no ``id``.
    :raises: as :func:`decode_entry_dumps`.
    """
    return _decode(buffer, offsets, segment_optimizers, dim, None)


def _decode(
    buffer: Buffer,
    offsets: Offsets,
    segment_optimizers: Sequence[Optimizer],
    dim: int,
    out: DecodedEntries | None,
) -> Ids:
    """Decode into ``out`` (None: only check and return the ids)."""
    buffer = np.ascontiguousarray(buffer, dtype=np.uint8).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64)
    _check_dims(segment_optimizers, dim)
    if (
        offsets.ndim != 1
        or offsets.size == 0
        or offsets[0] < 0
        or offsets[-1] > buffer.size
        or bool((np.diff(offsets) < 0).any())
    ):
        raise CheckpointCorruptError(
            f"record offsets do not describe a buffer of {buffer.size} bytes"
        )
    n = offsets.size - 1
    codecs = [_segment_codec(k, opt) for k, opt in enumerate(segment_optimizers)]
    ids = out.ids if out is not None else np.zeros(n, np.int64)
    if n == 0:
        return ids
    sinks = _sinks(codecs, ids, out)
    todo = _read_runs(buffer, offsets, codecs, dim, sinks)
    rest = np.flatnonzero(todo)
    if rest.size:
        _decode_walked(buffer, offsets, rest, codecs, dim, sinks, out)
    return ids


def _decode_walked(
    buffer: Buffer,
    offsets: Offsets,
    rest: Ids,
    codecs: list[_SegmentCodec],
    dim: int,
    sinks: _Sinks,
    out: DecodedEntries | None,
) -> None:
    """Decode the records ``rest`` by walking their framing; foreign ones go to protobuf."""
    n = offsets.size - 1
    framing = _walk(buffer, offsets[rest], offsets[rest + 1], codecs, dim)
    # Per record of the batch (records outside `rest` are never fast here).
    fast = np.zeros(n, np.bool_)
    fast[rest] = framing.ok
    has_id = np.zeros(n, np.bool_)
    has_id[rest] = framing.has_id
    local = np.stack([framing.has_id, *framing.lens], axis=1).astype(np.uint8)
    local[~framing.ok] = 255  # not walked or foreign: a group of their own, not read here
    signature = np.full((n, local.shape[1]), 255, np.uint8)
    signature[rest] = local
    pieces = []
    for k, (rel, tag, width) in enumerate(framing.floats):
        at = np.zeros(n, np.int64)
        at[rest] = rel
        target = None if sinks.floats is None else sinks.floats[k]
        pieces.append(_FloatPiece(at, tag, width, target))
    sizes = np.diff(offsets)

    def read(rec: Buffer, sel: slice | Ids) -> None:
        _read_records(rec, sel, pieces, bool(has_id[_first(sel)]), sinks.ids, fast)

    # A uniform range is read in place; a mixed one is first spread into a matrix
    # with one padded row per record (records not read here left out).
    row_bytes = int(sizes[fast].max()) if fast.any() else 1
    for a, b in _spans(offsets, row_bytes):
        chunk_fast = fast[a:b]
        if not chunk_fast.any():
            continue
        region = buffer[offsets[a] : offsets[b]]
        groups = _groups(signature[a:b])
        if len(groups) == 1:
            read(region.reshape(b - a, -1), slice(a, b))
            continue
        row_lens = sizes[a:b]
        if not chunk_fast.all():
            region = region[np.repeat(chunk_fast, row_lens)]
            row_lens = row_lens * chunk_fast
        padded = np.zeros((b - a, int(row_lens.max())), np.uint8)
        padded[_row_mask(row_lens, padded.shape[1])] = region
        for grp in groups:
            if chunk_fast[grp[0]]:
                read(padded[grp, : int(row_lens[grp[0]])], grp + a)
    done = fast[rest]
    if sinks.ints is not None:
        for (_, raw, _), target in zip(framing.values, sinks.ints, strict=True):
            target[rest[done]] = raw[done].view(np.int64)
    slow = rest[~done]
    if slow.size:
        sinks.ids[slow] = 0
        if out is not None:
            for codec in codecs:
                if codec.dump_name is not None:
                    for name, init in codec.optimizer.init_state(slow.size).items():
                        out.states[codec.index][name][slow] = init
            _decode_slow(buffer, offsets, slow, codecs, dim, out, slow)
        else:
            scratch = DecodedEntries(
                ids=np.zeros(slow.size, np.int64),
                values=np.zeros((slow.size, dim), np.float32),
                num_lengths=np.full(slow.size, dim, np.int64),
                states=[c.optimizer.init_state(slow.size) for c in codecs],
                has_state=np.ones(slow.size, np.bool_),
                timestamps=np.zeros(slow.size, np.int64),
            )
            _decode_slow(buffer, offsets, slow, codecs, dim, scratch, np.arange(slow.size))
            sinks.ids[slow] = scratch.ids


@dataclass
class _FloatPiece:
    rel: Offsets  # per record: the piece's position relative to the record start
    tag: bytes
    width: int
    target: npt.NDArray[Any] | None  # where the floats go, [n, width]; None: check only


def _first(sel: slice | Ids) -> int:
    return int(sel.start) if isinstance(sel, slice) else int(sel[0])


def _read_records(
    rec: Buffer,
    sel: slice | Ids,
    pieces: list[_FloatPiece],
    has_id: bool,
    ids: Ids,
    fast: npt.NDArray[np.bool_],
) -> None:
    """Read the float pieces (and ids) of the records ``sel``, all of one layout.

    ``rec`` is their C-contiguous ``[m, record_len]`` bytes. A record whose float
    tags differ from ours is cleared from ``fast``.
    """
    rec = np.ascontiguousarray(rec)
    first = _first(sel)
    m = rec.shape[0]
    good = np.ones(m, np.bool_)
    for piece in pieces:
        at, step = int(piece.rel[first]), len(piece.tag) + 4
        for j, byte in enumerate(piece.tag):
            good &= (_strided(rec, at + j, piece.width, step, "u1") == byte).all(axis=1)
    if has_id:
        ids[sel] = _strided(rec, len(_ID_TAG), 1, 8, "<i8")[:, 0]
    rows: slice | Ids = slice(None)
    dest: slice | Ids = sel
    if not good.all():
        every = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel
        fast[every[~good]] = False
        rows = np.flatnonzero(good)
        dest = every[good]
    for piece in pieces:
        if piece.target is not None:
            at, step = int(piece.rel[first]) + len(piece.tag), len(piece.tag) + 4
            piece.target[dest] = _rows(_strided(rec, at, piece.width, step, "<f4"), rows)


def _decode_slow(
    buffer: Buffer,
    offsets: Offsets,
    rows: Ids,
    codecs: list[_SegmentCodec],
    dim: int,
    out: DecodedEntries,
    dest: Ids,
) -> None:
    """Parse the records ``rows`` one by one with protobuf (any valid encoding).

    Record ``rows[k]`` is written to row ``dest[k]`` of ``out``; errors name ``rows[k]``.
    """
    view = buffer.data
    dumping = [c for c in codecs if c.dump_name is not None]
    for i, o in zip(rows.tolist(), dest.tolist(), strict=True):
        try:
            msg = eht.EntryDump.FromString(view[offsets[i] : offsets[i + 1]].tobytes())
        except DecodeError as e:
            raise CheckpointCorruptError(f"record {i} is not a valid EntryDump: {e}") from e
        if msg.HasField("id"):
            out.ids[o] = msg.id
        count = len(msg.num)
        if count > dim:
            raise ConfigMismatchError(f"record {i} has {count} values but the table's dim is {dim}")
        out.values[o, :count] = msg.num
        out.values[o, count:] = 0
        out.num_lengths[o] = count
        out.timestamps[o] = msg.last_update_ts_sec
        dumps = msg.opt.dump
        if len(dumps) > len(dumping):
            raise ConfigMismatchError(
                f"record {i} carries {len(dumps)} optimizer dumps, the table's segments "
                f"have {len(dumping)}"
            )
        out.has_state[o] = len(dumps) == len(dumping)
        for single, codec in zip(dumps, dumping, strict=False):
            member = single.WhichOneof("type")
            if member != codec.dump_name:
                raise ConfigMismatchError(
                    f"record {i}: optimizer dump for segment {codec.index} is "
                    f"{member or 'empty'}, the table expects {codec.dump_name}"
                )
            dump = getattr(single, member)
            state = out.states[codec.index]
            for sc in codec.slots:
                got = getattr(dump, sc.slot.name)
                if sc.slot.repeated:
                    if len(got) != sc.slot.width:
                        raise ConfigMismatchError(
                            f"record {i}: {member}.{sc.slot.name} has {len(got)} elements, "
                            f"segment {codec.index} expects {sc.slot.width}"
                        )
                    state[sc.slot.name][o] = got
                else:
                    state[sc.slot.name][o, 0] = got


def encode_selection(selection: EntrySelection) -> list[bytes]:
    """One serialized ``EntryDump`` per answer slot of ``selection`` (``b""`` where no
    entry was picked), encoded in one batch."""
    out = [b""] * selection.count
    if selection.positions.size:
        buf, offsets = encode_entry_dumps(selection.values, selection.segments,
                                          selection.timestamps, selection.ids)
        for i, rec in zip(selection.positions.tolist(), split_records(buf, offsets),
                          strict=True):
            out[i] = rec
    return out


def lookup_entry(table: EmbeddingHashTable, ids: Any) -> list[bytes]:
    """Serialized ``EntryDump`` per id (``id`` unset), ``b""`` for missing ids.

    :raises ServingEntryError: SERVING tables keep no entry dumps.
    """
    return encode_selection(table.select_entries(ids))


def save_as_tensor(
    table: EmbeddingHashTable, shard_idx: int, num_shards: int, limit: int, offset: int
) -> tuple[int, list[bytes]]:
    """Up to ``limit`` entries of part ``shard_idx`` of ``num_shards`` from cursor
    ``offset``, as serialized ``EntryDump`` records with ``id`` set, and the next cursor
    (see :meth:`EmbeddingHashTable.entries_page`)."""
    cursor, selection = table.entries_page(shard_idx, num_shards, limit, offset)
    return cursor, encode_selection(selection)
