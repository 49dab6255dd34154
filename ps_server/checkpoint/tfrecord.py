"""TFRecord framing: the container of every checkpoint file (tables and filters).

A TFRecord file is a plain concatenation of records, each framed as::

    uint64 LE  length
    uint32 LE  masked_crc32c(the 8 length bytes)
    bytes      data (length bytes)
    uint32 LE  masked_crc32c(data)

CRC-32C is the Castagnoli polynomial (``crc32c(b"123456789") == 0xE3069283``), computed
by the ``google_crc32c`` package; the mask is ``((c >> 15) | (c << 17)) + 0xA282EAD8``
modulo 2**32. Files are uncompressed (Monolith's single-table and filter files).

Writing is atomic: :class:`TFRecordWriter` writes ``<file>-tmp-<random u64 hex>`` in the
same directory, fsyncs it, renames it over ``<file>`` and fsyncs the directory; on error
the temporary file is removed and ``<file>`` is untouched. Reading verifies both CRCs of
every record and raises :class:`~ps_server.errors.CheckpointCorruptError` naming the
file, the byte offset of the damaged record and what is wrong.

Bulk helpers work on many records at once, as one concatenated ``uint8`` buffer plus
``int64`` offsets (``n + 1`` of them; record ``i`` is ``buffer[offsets[i]:offsets[i+1]]``):
:func:`frame_records` frames them, :func:`read_framed` yields them back chunk by chunk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

import google_crc32c
import numpy as np
import numpy.typing as npt

from ps_server.errors import CheckpointCorruptError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FileFacts",
    "TFRecordWriter",
    "crc32c",
    "file_facts",
    "frame_record",
    "frame_records",
    "masked_crc32c",
    "read_framed",
    "read_records",
]

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_HEADER = struct.Struct("<QI")  # length, masked crc of the length bytes
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_BYTES = 12
_OVERHEAD = 16  # header + data crc

#: Default amount of file read per chunk by :func:`read_framed`.
DEFAULT_CHUNK_BYTES = 64 << 20

Bytes = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]


def crc32c(data: bytes | Bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` (``bytes`` or a contiguous ``uint8`` array)."""
    return int(google_crc32c.value(data))


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def masked_crc32c(data: bytes | Bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``: ``rotate_right(crc, 15) + 0xA282EAD8``."""
    return _mask(int(google_crc32c.value(data)))


def _mask_array(crc: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    c = crc.astype(np.uint32)
    return (((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(_MASK_DELTA)).astype(
        np.uint32
    )


def frame_record(record: bytes) -> bytes:
    """One record with its TFRecord header and footer."""
    length = _LENGTH.pack(len(record))
    return b"".join(
        (length, _CRC.pack(_mask(crc32c(length))), record, _CRC.pack(masked_crc32c(record)))
    )


def _check_buffer(buffer: npt.ArrayLike, offsets: npt.ArrayLike) -> tuple[Bytes, Offsets]:
    buf = np.ascontiguousarray(buffer, dtype=np.uint8)
    offs = np.asarray(offsets, dtype=np.int64)
    if buf.ndim != 1:
        raise ValueError(f"buffer must be a 1-D uint8 array, got shape {buf.shape}")
    if offs.ndim != 1 or offs.size < 1:
        raise ValueError(f"offsets must be a 1-D array of n+1 positions, got shape {offs.shape}")
    if offs[0] < 0 or offs[-1] > buf.size or bool((np.diff(offs) < 0).any()):
        raise ValueError(
            f"offsets must be non-decreasing positions inside the buffer of {buf.size} bytes"
        )
    return buf, offs


def frame_records(buffer: npt.ArrayLike, offsets: npt.ArrayLike) -> bytes:
    """Frame ``n`` records given as one buffer and ``n + 1`` offsets; returns the file bytes.

    :param buffer: ``uint8[m]`` concatenated record payloads.
    :param offsets: ``int64[n + 1]`` non-decreasing; record ``i`` is
        ``buffer[offsets[i]:offsets[i + 1]]``.
    :returns: the ``n`` framed records back to back, ready for
        :meth:`TFRecordWriter.write_frames` (``sum(lengths) + 16 * n`` bytes).
    :raises ValueError: malformed ``buffer``/``offsets``.
    """
    buf, offs = _check_buffer(buffer, offsets)
    n = offs.size - 1
    if n == 0:
        return b""
    lengths = np.diff(offs)
    first = int(offs[0])
    total = int(offs[-1]) - first + _OVERHEAD * n
    # Position of each record's header in the output.
    starts = (offs[:-1] - first) + _OVERHEAD * np.arange(n, dtype=np.int64)

    header = np.empty((n, _HEADER_BYTES), dtype=np.uint8)
    header[:, :8] = lengths.astype("<u8").view(np.uint8).reshape(n, 8)
    uniq, inverse = np.unique(lengths, return_inverse=True)
    uniq_crc = np.array([_mask(crc32c(_LENGTH.pack(int(u)))) for u in uniq], dtype=np.uint32)
    header[:, 8:] = uniq_crc[inverse].astype("<u4").view(np.uint8).reshape(n, 4)

    data = buf[first : int(offs[-1])].tobytes()
    rel = (offs - first).tolist()
    value = google_crc32c.value
    data_crc = np.fromiter(
        (value(data[rel[i] : rel[i + 1]]) for i in range(n)), dtype=np.uint32, count=n
    )
    footer = _mask_array(data_crc).astype("<u4").view(np.uint8).reshape(n, 4)

    out = np.empty(total, dtype=np.uint8)
    header_pos = starts[:, None] + np.arange(_HEADER_BYTES, dtype=np.int64)
    footer_pos = (starts + _HEADER_BYTES + lengths)[:, None] + np.arange(4, dtype=np.int64)
    out[header_pos] = header
    out[footer_pos] = footer
    is_data = np.ones(total, dtype=np.bool_)
    is_data[header_pos] = False
    is_data[footer_pos] = False
    out[is_data] = np.frombuffer(data, dtype=np.uint8)
    return out.tobytes()


@dataclass(frozen=True)
class FileFacts:
    """What a checkpoint manifest records of one TFRecord file.

    :param path: the file.
    :param size: its length in bytes.
    :param records: the records it holds.
    :param crc32c: CRC-32C (unmasked, Castagnoli) of the whole file's bytes.
    """

    path: str
    size: int
    records: int
    crc32c: int


class TFRecordWriter:
    """Streaming, atomic TFRecord writer (a context manager).

    It keeps the facts of what it wrote (:meth:`facts`: bytes, records and the CRC-32C
    of the whole file, extended over each buffer as it is written, never re-read).

    Records go to ``<path>-tmp-<random u64 hex>`` in ``path``'s directory (created if
    missing). :meth:`close` flushes, fsyncs, renames the temporary file to ``path`` and
    fsyncs the directory; :meth:`abort` (called by ``__exit__`` when the block raised)
    removes the temporary file, leaving any existing ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        self.tmp_path = f"{self.path}-tmp-{secrets.randbits(64):016x}"
        self._file: BinaryIO | None = open(self.tmp_path, "xb", buffering=1 << 20)  # noqa: SIM115
        self.records_written = 0
        self.bytes_written = 0
        self.crc32c = 0

    def _out(self) -> BinaryIO:
        if self._file is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        return self._file

    def write(self, record: bytes) -> None:
        """Append one record."""
        framed = frame_record(bytes(record))
        self._out().write(framed)
        self.records_written += 1
        self.bytes_written += len(framed)
        self.crc32c = google_crc32c.extend(self.crc32c, framed)

    def write_many(self, records: Iterable[bytes]) -> None:
        """Append records in order."""
        for record in records:
            self.write(record)

    def write_frames(self, framed: bytes | Bytes, count: int) -> None:
        """Append ``count`` records already framed by :func:`frame_records` (bytes, or a
        contiguous ``uint8`` array such as :func:`frame_record_runs_array` returns)."""
        data = framed.data if isinstance(framed, np.ndarray) else framed
        self._out().write(data)
        self.records_written += count
        self.bytes_written += framed.nbytes if isinstance(framed, np.ndarray) else len(framed)
        self.crc32c = google_crc32c.extend(self.crc32c, framed)

    def facts(self) -> FileFacts:
        """Size, record count and whole-file CRC-32C of what was written (final name)."""
        return FileFacts(self.path, self.bytes_written, self.records_written, self.crc32c)

    def write_buffer(self, buffer: npt.ArrayLike, offsets: npt.ArrayLike) -> None:
        """Append the records ``buffer[offsets[i]:offsets[i+1]]`` (see :func:`frame_records`)."""
        framed = frame_records(buffer, offsets)
        self.write_frames(framed, int(np.asarray(offsets).size) - 1)

    def close(self) -> None:
        """Make the file durable under its final name. Idempotent."""
        if self._file is None:
            return
        f = self._file
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        """Discard everything written; remove the temporary file. Idempotent."""
        f, self._file = self._file, None
        try:
            if f is not None:
                # Closing flushes what is buffered, which fails again on a full disk;
                # that data is being discarded anyway.
                with contextlib.suppress(OSError):
                    f.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _corrupt(path: str, offset: int, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path}: corrupt TFRecord at byte offset {offset}: {problem}")


def read_framed(
    path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[Bytes, Offsets]]:
    """Yield the records of a TFRecord file in chunks, all CRCs verified.

    Each item is ``(buffer uint8[m], offsets int64[k + 1])`` for ``k >= 1`` consecutive
    records (``offsets[0] == 0``), about ``chunk_bytes`` of file per chunk (a bigger
    record makes a bigger chunk). An empty file yields nothing.

    :raises CheckpointCorruptError: truncated header or data, bad length CRC or bad data
        CRC; the message names the file and the byte offset of the record. Records
        before the damage have already been yielded: consume everything before acting.
    :raises OSError: the file cannot be opened or read.
    """
    name = os.fspath(path)
    chunk_bytes = max(int(chunk_bytes), _HEADER_BYTES)
    crc = google_crc32c.value
    length_crc: dict[int, int] = {}
    with open(name, "rb", buffering=0) as f:
        pending = b""  # unparsed bytes carried from the previous read
        base = 0  # file offset of pending[0]
        need = chunk_bytes
        while True:
            block = f.read(max(need - len(pending), chunk_bytes))
            eof = not block
            data = pending + block if pending else block
            end = len(data)
            pos = 0
            starts: list[int] = []
            ends: list[int] = []
            need = chunk_bytes
            while end - pos >= _HEADER_BYTES:
                length, stored_lcrc = _HEADER.unpack_from(data, pos)
                expected = length_crc.get(length)
                if expected is None:
                    expected = _mask(crc(data[pos : pos + 8]))
                    length_crc[length] = expected
                if stored_lcrc != expected:
                    raise _corrupt(name, base + pos, "bad length CRC")
                dstart = pos + _HEADER_BYTES
                dend = dstart + length
                if dend + 4 > end:
                    need = dend + 4 - pos
                    break
                (stored_dcrc,) = _CRC.unpack_from(data, dend)
                if _mask(crc(data[dstart:dend])) != stored_dcrc:
                    raise _corrupt(name, base + pos, f"bad data CRC ({length}-byte record)")
                starts.append(dstart)
                ends.append(dend)
                pos = dend + 4
            if starts:
                yield _compact(data, starts, ends)
            pending = data[pos:]
            base += pos
            if eof:
                if pending:
                    if len(pending) < _HEADER_BYTES:
                        problem = f"truncated header ({len(pending)} of 12 bytes)"
                    else:
                        (length,) = _LENGTH.unpack_from(pending, 0)
                        problem = (
                            f"truncated data (record of {length} bytes, "
                            f"{len(pending) - _HEADER_BYTES} bytes present)"
                        )
                    raise _corrupt(name, base, problem)
                return


def _compact(data: bytes, starts: list[int], ends: list[int]) -> tuple[Bytes, Offsets]:
    raw = np.frombuffer(data, dtype=np.uint8)
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    lengths = e - s
    offsets = np.zeros(s.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if s.size == 1:
        return raw[s[0] : e[0]].copy(), offsets
    # Mark the payload bytes: +1 where a payload starts, -1 where it ends.
    marks = np.zeros(len(data) + 1, dtype=np.int8)
    np.add.at(marks, s, 1)
    np.add.at(marks, e, -1)
    keep = np.cumsum(marks[:-1], dtype=np.int8).astype(np.bool_)
    return raw[keep], offsets


def read_records(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Yield each record's payload in file order, both CRCs verified.

    :raises CheckpointCorruptError: as :func:`read_framed` (records before the damage
        have been yielded already).
    :raises OSError: the file cannot be opened or read.
    """
    for buffer, offsets in read_framed(path, chunk_bytes=1 << 20):
        data = buffer.tobytes()
        bounds = offsets.tolist()
        for i in range(len(bounds) - 1):
            yield data[bounds[i] : bounds[i + 1]]


# =====================================================================================
# Bulk framing of runs of equal-length records (added by the checkpoint engineer for
# table files; independent of everything above except the small primitives it reuses).
#
# A table file holds millions of records whose lengths rarely differ (only varints
# change a record's length), so records are handled in *runs*: consecutive records of
# one length ``L`` are an ``[m, L + 16]`` byte matrix in the file. Writing fills the
# matrix's columns. Reading finds a run by comparing whole 12-byte headers at the run's
# stride, and checks all data CRCs of a long run with a single CRC pass over the run's
# bytes: CRC-32C without its pre/post inversion is linear over GF(2), so the CRC of
# the run's bytes is determined by the stored per-record CRCs (see :class:`_RunChecker`).
# A mismatch is then located record by record so the error names the damaged record.
# =====================================================================================

__all__ += ["FRAME_MARGINS", "FramedRun", "frame_record_runs", "frame_record_runs_array",
            "frame_rows", "read_framed_chunks", "read_framed_runs", "run_payloads"]

#: Bytes of TFRecord framing before and after each record's data (header; data CRC).
FRAME_MARGINS = (_HEADER_BYTES, _OVERHEAD - _HEADER_BYTES)

_ALL_ONES = 0xFFFFFFFF
_UNIT = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.bool_)  # [256, 8]
_BULK_CHECK_MIN = 32  # shorter runs are checked one record at a time
_MAX_WINDOW = 1 << 16  # headers compared per step while scanning a run
_SCALAR_STEPS = 32  # after a short run, records scanned one by one before trying again
_EOF_PROBE = 1 << 16  # bytes asked for once the file's size has been read


class _Linear:
    """A GF(2)-linear map on 32-bit CRC registers, applied to arrays by byte tables.

    :param columns: ``uint32[32]``, the images of ``1 << j``.
    """

    __slots__ = ("tables",)

    def __init__(self, columns: npt.NDArray[np.uint32]) -> None:
        cols = np.asarray(columns, dtype=np.uint32).reshape(4, 1, 8)
        picked = np.where(_BYTE_BITS[None, :, :], cols, np.uint32(0))  # [4, 256, 8]
        self.tables: npt.NDArray[np.uint32] = np.bitwise_xor.reduce(picked, axis=2)

    def __call__(self, v: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        t = self.tables
        out: npt.NDArray[np.uint32] = (
            t[0][v & 0xFF] ^ t[1][(v >> 8) & 0xFF] ^ t[2][(v >> 16) & 0xFF] ^ t[3][v >> 24]
        )
        return out

    def squared(self) -> _Linear:
        """The map applied twice."""
        return _Linear(self(self(_UNIT)))


def _register_after_zeros(state: int, nbytes: int) -> int:
    """The CRC register (no inversions) after ``nbytes`` zero bytes starting from ``state``."""
    zeros = np.zeros(nbytes, dtype=np.uint8)
    return int(google_crc32c.extend(state ^ _ALL_ONES, zeros)) ^ _ALL_ONES


def _zeros_map(nbytes: int) -> _Linear:
    """``Z_k``: register -> register after ``nbytes`` zero bytes (a linear map)."""
    zeros = np.zeros(nbytes, dtype=np.uint8)
    extend = google_crc32c.extend
    cols = [int(extend(int(u) ^ _ALL_ONES, zeros)) ^ _ALL_ONES for u in _UNIT]
    return _Linear(np.array(cols, dtype=np.uint32))


def _raw_register(data: Bytes) -> int:
    """The CRC register after ``data`` starting from 0 (no pre/post inversion)."""
    return int(google_crc32c.extend(_ALL_ONES, data)) ^ _ALL_ONES


def _unmask_array(masked: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    c = (masked - np.uint32(_MASK_DELTA)).astype(np.uint32)
    return ((c << np.uint32(15)) | (c >> np.uint32(17))).astype(np.uint32)


class _RunChecker:
    """Verifies every data CRC of a run of equal-length records at once.

    With ``R(s, m)`` the register after bytes ``m`` from ``s`` (no inversions), ``Z_k``
    the linear map of ``k`` zero bytes and ``~`` xor with ``0xFFFFFFFF``:
    ``R(0, a || b) = Z_|b|(R(0, a)) ^ R(0, b)``, ``R(0, d) = ~crc(d) ^ Z_|d|(~0)`` and
    ``R(0, le32(w)) = Z_4(w)``. A framed record ``header || d || le32(c)`` with
    ``crc(d) = unmask(c)`` thus has ``R(0, record) = Z_4(~unmask(c) ^ c) ^ K(L)``
    where ``K(L) = Z_{L+4}(~R(0, header))`` depends only on the length, and a run of
    ``m`` records has ``R(0, run) = XOR_i Z_P^(m-1-i)(R(0, record_i))`` with period
    ``P = L + 16``, evaluated as a balanced tree with the maps ``Z_P^(2^l)``. If any
    record's data does not match its stored CRC the two sides differ (each ``Z`` is
    invertible, so a single bad record always shows; several cancel with chance 2^-32).
    """

    def __init__(self) -> None:
        self._z4 = _zeros_map(4)
        self._by_length: dict[int, tuple[int, list[_Linear]]] = {}

    def _for_length(self, length: int) -> tuple[int, list[_Linear]]:
        got = self._by_length.get(length)
        if got is None:
            header = _LENGTH.pack(length) + _CRC.pack(_mask(crc32c(_LENGTH.pack(length))))
            h = _raw_register(np.frombuffer(header, dtype=np.uint8))
            k = _register_after_zeros(h ^ _ALL_ONES, length + 4)
            got = (k, [_zeros_map(length + _OVERHEAD)])
            self._by_length[length] = got
        return got

    def run_ok(self, run: Bytes, length: int, count: int) -> bool:
        """Whether every record of ``run`` (``count`` framed records of ``length``) is intact.

        The headers must already be known to be ``length`` with a valid length CRC.
        """
        k, powers = self._for_length(length)
        period = length + _OVERHEAD
        footers = run.reshape(count, period)[:, period - 4 :]
        stored = np.ascontiguousarray(footers).view("<u4").reshape(count).astype(np.uint32)
        v = self._z4(~_unmask_array(stored) ^ stored) ^ np.uint32(k)
        levels = max(0, int(count - 1).bit_length())
        if (1 << levels) != count:
            padded = np.zeros(1 << levels, dtype=np.uint32)
            padded[(1 << levels) - count :] = v
            v = padded
        for level in range(levels):
            while len(powers) <= level:
                powers.append(powers[-1].squared())
            v = powers[level](v[0::2]) ^ v[1::2]
        return int(v[0]) == _raw_register(run)


def frame_rows(rows: Bytes) -> Bytes:
    """Frame records of one length held in place, ``rows`` ``uint8[n, length + 16]``
    with record ``i`` at ``rows[i, 12:12 + length]``: writes each row's header and data
    CRC, so that ``rows`` holds the same bytes :func:`frame_record_runs_array` gives
    for the records. Returns ``rows`` flattened (a view)."""
    n, period = rows.shape
    length = period - _OVERHEAD
    if length < 0:
        raise ValueError(f"rows of {period} bytes cannot hold a framed record")
    length_bytes = _LENGTH.pack(length)
    head = length_bytes + _CRC.pack(_mask(crc32c(length_bytes)))
    rows[:, :_HEADER_BYTES] = np.frombuffer(head, dtype=np.uint8)
    data = rows[:, _HEADER_BYTES : _HEADER_BYTES + length]
    # One CRC call per record, on row views (no copy of the records).
    data_crc = np.fromiter(map(google_crc32c.value, data), dtype=np.uint32, count=n)
    rows[:, _HEADER_BYTES + length :] = (
        _mask_array(data_crc).astype("<u4").view(np.uint8).reshape(n, 4)
    )
    return rows.reshape(-1)


def frame_record_runs(buffer: npt.ArrayLike, offsets: npt.ArrayLike) -> bytes:
    """Frame records like :func:`frame_records` (same bytes), faster for runs of one length.

    Consecutive records of equal length are framed as one matrix; the data CRC is still
    one CRC-32C call per record. Falls back to :func:`frame_records` when lengths change
    often (more than one run per 64 records).

    :raises ValueError: malformed ``buffer``/``offsets``.
    """
    return frame_record_runs_array(buffer, offsets).tobytes()


def frame_record_runs_array(buffer: npt.ArrayLike, offsets: npt.ArrayLike) -> Bytes:
    """:func:`frame_record_runs` as a ``uint8`` array (no copy into a ``bytes``), for
    :meth:`TFRecordWriter.write_frames`."""
    buf, offs = _check_buffer(buffer, offsets)
    n = offs.size - 1
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offs)
    cuts = np.flatnonzero(lengths[1:] != lengths[:-1]) + 1
    if cuts.size > max(16, n // 64):
        return np.frombuffer(frame_records(buf, offs), dtype=np.uint8)
    value = google_crc32c.value
    bounds = offs.tolist()
    out = np.empty(int(offs[-1] - offs[0]) + _OVERHEAD * n, dtype=np.uint8)
    starts = [0, *cuts.tolist()]
    ends = [*cuts.tolist(), n]
    pos = 0
    for a, b in zip(starts, ends, strict=True):
        length = int(lengths[a])
        count = b - a
        period = length + _OVERHEAD
        length_bytes = _LENGTH.pack(length)
        head = length_bytes + _CRC.pack(_mask(crc32c(length_bytes)))
        data = buf[bounds[a] : bounds[b]].reshape(count, length)
        # One CRC call per record, on row views (no copy of the records).
        data_crc = np.fromiter(map(value, data), dtype=np.uint32, count=count)
        mat = out[pos : pos + count * period].reshape(count, period)
        mat[:, :_HEADER_BYTES] = np.frombuffer(head, dtype=np.uint8)
        mat[:, _HEADER_BYTES : _HEADER_BYTES + length] = data
        mat[:, _HEADER_BYTES + length :] = (
            _mask_array(data_crc).astype("<u4").view(np.uint8).reshape(count, 4)
        )
        pos += count * period
    return out


_Run = tuple[int, int, int]  # (byte position of the first header, data length, count)


def _scan_runs(
    data: memoryview, buf: Bytes, base: int, name: str, remaining: int, length_crc: dict[int, int]
) -> tuple[list[_Run], int, int]:
    """Find the complete records at the start of ``buf`` as runs of one length.

    ``data`` is a memoryview of the same bytes (for ``struct``).

    :param remaining: bytes of the file from ``base`` on (a length reaching past it is a
        truncated record, reported at once instead of read for).
    :returns: ``(runs, bytes consumed, bytes needed from the first unconsumed byte)``.
    :raises CheckpointCorruptError: bad length CRC, or a record longer than the file.
    """
    end = len(data)
    pos = 0
    need = 0
    runs: list[_Run] = []
    window = 64
    scalar = 0
    while end - pos >= _HEADER_BYTES:
        length, stored = _HEADER.unpack_from(data, pos)
        expected = length_crc.get(length)
        if expected is None:
            expected = _mask(crc32c(buf[pos : pos + 8]))
            length_crc[length] = expected
        if stored != expected:
            raise _corrupt(name, base + pos, "bad length CRC")
        period = length + _OVERHEAD
        if pos + period > remaining:
            raise _corrupt(
                name,
                base + pos,
                f"truncated data (record of {length} bytes, "
                f"{max(0, remaining - pos - _HEADER_BYTES)} bytes present)",
            )
        fit = (end - pos) // period
        if fit == 0:
            need = period
            break
        count = 1
        if scalar:
            scalar -= 1
        elif fit > 1:
            w = min(fit, window)
            # The next w - 1 headers, read in place at the run's stride: same length
            # and same length CRC as this one?
            nxt = pos + period
            lens = np.ndarray((w - 1,), "<u8", buffer=buf, offset=nxt, strides=(period,))
            crcs = np.ndarray((w - 1,), "<u4", buffer=buf, offset=nxt + 8, strides=(period,))
            differ = np.flatnonzero((lens != length) | (crcs != stored))
            count = 1 + (int(differ[0]) if differ.size else w - 1)
            if count == w:
                window = min(2 * window, _MAX_WINDOW)
            elif count < 8:
                scalar, window = _SCALAR_STEPS, 64
        last = runs[-1] if runs else None
        if last is not None and last[1] == length and last[0] + last[2] * period == pos:
            runs[-1] = (last[0], length, last[2] + count)
        else:
            runs.append((pos, length, count))
        pos += count * period
    return runs, pos, need


def _check_runs(buf: Bytes, runs: list[_Run], base: int, name: str, checker: _RunChecker
                ) -> None:
    value = google_crc32c.value
    for start, length, count in runs:
        period = length + _OVERHEAD
        run = buf[start : start + count * period]
        if count >= _BULK_CHECK_MIN and checker.run_ok(run, length, count):
            continue
        mat = run.reshape(count, period)
        for i in range(count):
            (stored,) = _CRC.unpack_from(mat[i, period - 4 :].tobytes())
            if _mask(int(value(mat[i, _HEADER_BYTES : _HEADER_BYTES + length]))) != stored:
                raise _corrupt(
                    name, base + start + i * period, f"bad data CRC ({length}-byte record)"
                )
        if count >= _BULK_CHECK_MIN:
            raise AssertionError(f"{name}: run CRC check disagrees with per-record checks")


def _payloads(buf: Bytes, runs: list[_Run]) -> tuple[Bytes, Offsets]:
    """The data of the records of ``runs`` in ``buf``, concatenated (a copy), and offsets."""
    lengths = np.array([r[1] for r in runs], dtype=np.int64)
    counts = np.array([r[2] for r in runs], dtype=np.int64)
    rec_lengths = np.repeat(lengths, counts)
    offsets = np.zeros(rec_lengths.size + 1, dtype=np.int64)
    np.cumsum(rec_lengths, out=offsets[1:])
    if len(runs) > 64:
        first = np.repeat(np.array([r[0] for r in runs], dtype=np.int64), counts)
        within = np.arange(rec_lengths.size, dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        starts = first + within * (rec_lengths + _OVERHEAD) + _HEADER_BYTES
        # Mark the data bytes: +1 where a record's data starts, -1 where it ends.
        marks = np.zeros(buf.size + 1, dtype=np.int8)
        np.add.at(marks, starts, 1)
        np.add.at(marks, starts + rec_lengths, -1)
        return buf[np.cumsum(marks[:-1], dtype=np.int8).astype(np.bool_)], offsets
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    pos = 0
    for start, length, count in runs:
        period = length + _OVERHEAD
        mat = buf[start : start + count * period].reshape(count, period)
        out[pos : pos + count * length].reshape(count, length)[:] = mat[
            :, _HEADER_BYTES : _HEADER_BYTES + length
        ]
        pos += count * length
    return out, offsets


def read_framed_runs(
    path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[Bytes, Offsets]]:
    """Like :func:`read_framed` (same items, same errors), parsing runs of one length at once.

    Headers of a run are compared as a matrix and a run's data CRCs are verified by one
    CRC pass over its bytes (:class:`_RunChecker`); files whose record length changes
    every few records are walked record by record. The file is read into one reused
    buffer (the records yielded are copies), so no memory is allocated per read. Peak
    memory is about three times ``chunk_bytes``.

    :raises CheckpointCorruptError: truncated header or data, bad length CRC or bad data
        CRC; the message names the file and the byte offset of the record. Records
        before the damage may have been yielded already: consume everything before acting.
    :raises OSError: the file cannot be opened or read.
    """
    for data, runs in read_framed_chunks(path, chunk_bytes):
        yield _payloads(data, runs)


FramedRun = tuple[int, int, int]
"""A run of framed records of one data length: (byte position of the first record's
header in the chunk, data length, record count); records follow each other at a
stride of the data length plus :data:`FRAME_MARGINS`."""


def read_framed_chunks(
    path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[Bytes, list[FramedRun]]]:
    """:func:`read_framed_runs` without copying the records out of their frames.

    Yields each chunk's bytes as read (frames included) with its complete records as
    :data:`FramedRun` runs, every CRC already verified (same checks, same errors).
    The bytes are a view of a buffer that the next read overwrites: use them before
    asking for the next chunk. :func:`run_payloads` copies a chunk's record data out.
    """
    name = os.fspath(path)
    chunk_bytes = max(int(chunk_bytes), _HEADER_BYTES)
    length_crc: dict[int, int] = {}
    checker = _RunChecker()
    with open(name, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(0, dtype=np.uint8)
        have = 0  # unparsed bytes at the start of buf, carried from the previous read
        base = 0  # file offset of buf[0]
        need = 0
        while True:
            left = size - base - have  # not read yet, as far as the size seen at open
            step = min(chunk_bytes, left) if left > 0 else min(chunk_bytes, _EOF_PROBE)
            want = max(need, have + step)
            if want > buf.size:
                # Slack for the partial record carried to the next read.
                grown = np.empty(want + _EOF_PROBE, dtype=np.uint8)
                grown[:have] = buf[:have]
                buf = grown
            got = f.readinto(buf[have:want].data)
            eof = not got
            end = have + (got or 0)
            data = buf[:end]
            runs, pos, need = _scan_runs(data.data, data, base, name, max(size - base, end),
                                         length_crc)
            if runs:
                _check_runs(data, runs, base, name, checker)
                yield data, runs
            have = end - pos
            buf[:have] = buf[pos:end]
            base += pos
            if eof:
                if have:
                    pending = buf[:have].tobytes()
                    if have < _HEADER_BYTES:
                        problem = f"truncated header ({have} of 12 bytes)"
                    else:
                        (length,) = _LENGTH.unpack_from(pending, 0)
                        problem = (
                            f"truncated data (record of {length} bytes, "
                            f"{have - _HEADER_BYTES} bytes present)"
                        )
                    raise _corrupt(name, base, problem)
                return


def run_payloads(buf: Bytes, runs: list[FramedRun]) -> tuple[Bytes, Offsets]:
    """The data of the records of ``runs`` in ``buf`` (a chunk of
    :func:`read_framed_chunks`), concatenated (a copy), and their offsets."""
    return _payloads(buf, runs)


def file_facts(path: str | os.PathLike[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES
               ) -> FileFacts:
    """Size, record count and whole-file CRC-32C of a TFRecord file, in one read.

    Records are counted by walking the headers (length CRCs checked, runs of one
    length at once, as :func:`read_framed_runs` does); data CRCs are not checked and
    no record is copied. Compare the result with what the writer's
    :meth:`TFRecordWriter.facts` recorded.

    :raises CheckpointCorruptError: bad length CRC, truncated header or data.
    :raises OSError: the file cannot be opened or read.
    """
    name = os.fspath(path)
    chunk_bytes = max(int(chunk_bytes), _HEADER_BYTES)
    length_crc: dict[int, int] = {}
    crc = 0
    records = 0
    with open(name, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(min(chunk_bytes, size) + _EOF_PROBE, dtype=np.uint8)
        have = 0  # unparsed bytes at the start of buf
        base = 0  # file offset of buf[0]
        need = 0
        while True:
            want = max(need, have + chunk_bytes)
            if want > buf.size:
                grown = np.empty(want + _EOF_PROBE, dtype=np.uint8)
                grown[:have] = buf[:have]
                buf = grown
            got = f.readinto(buf[have:want].data) or 0
            if got:
                crc = google_crc32c.extend(crc, buf[have : have + got])
            end = have + got
            data = buf[:end]
            runs, pos, need = _scan_runs(data.data, data, base, name, max(size - base, end),
                                         length_crc)
            records += sum(r[2] for r in runs)
            have = end - pos
            buf[:have] = buf[pos:end]
            base += pos
            if not got:
                if have:
                    problem = (
                        f"truncated header ({have} of 12 bytes)" if have < _HEADER_BYTES
                        else "truncated data"
                    )
                    raise _corrupt(name, base, problem)
                return FileFacts(name, base, records, crc)
