"""Monolith's native multi-hash-table files (CpuTraining's default layout): the read side.

One ``MultiHashTable`` resource (shared name ``S``: ``MonolithMultiHashTable_`` for a
local job, ``MonolithMultiHashTable_<i>`` on parameter server ``i``) saves every
sub-table of one process into, per file shard ``k`` of ``n``::

    <assets>/S-%05d-of-%05d        data: SNAPPY container of a TFRecord stream of EntryDumps
    <assets>/S.meta-%05d-of-%05d   meta: plain TFRecord, one MultiHashTableMetadata
                                   {table_name, num_entries} per sub-table, in file order

The data stream holds each sub-table's records as one contiguous run, in meta order
(docs/monolith-migration.md, "Multi-hash-table checkpoints"). The SNAPPY container is a
sequence of blocks, each ``uint32 big-endian compressed length`` + that many bytes of
*raw* snappy (no stream header, trailer or block CRC); the blocks decompress (with
``cramjam``) into the plain TFRecord stream, whose records may straddle blocks.

Reading a data file is done in two steps:

* :func:`index_data_file` (when a checkpoint is planned, before any table changes):
  decompresses every block once, walks every record with both CRCs checked, checks the
  meta's counts against the records, and notes where each sub-table's run starts and
  ends in the decompressed stream and which blocks hold it;
* :meth:`MultiTablePart.framed` (the checking and the loading passes of a restore):
  decompresses only the blocks of one sub-table's run and yields its records in chunks,
  exactly as :func:`~ps_server.checkpoint.tfrecord.read_framed_runs` yields a plain
  file's, so the table code decodes them with the same batched ``EntryDump`` decoder.

A :class:`MultiTablePart` *is* the data file's path (a ``str``) carrying where its
sub-table's records are, so it stands in any list of table files; the table code asks
it for its records instead of opening the path as a plain TFRecord file.

Damage (a truncated block, a block that does not decompress, a bad CRC, a record cut
short, fewer records than the meta declares, an unparsable meta record) raises
:class:`~ps_server.errors.CheckpointCorruptError` (DATA_LOSS) naming the file and the
byte offset: the block's offset in the file, and for records also the offset in the
decompressed stream.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import cramjam
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.tfrecord import (
    DEFAULT_CHUNK_BYTES,
    _check_runs,
    _payloads,
    _RunChecker,
    _scan_runs,
    read_records,
)
from ps_server.errors import CheckpointCorruptError
from ps_server.paths import UNCONFINED, DataRoot

__all__ = [
    "META_INFIX",
    "MultiTableCheckpoint",
    "MultiTablePart",
    "MultiTableSet",
    "index_data_file",
    "multi_table_stems",
    "read_multi_table_set",
    "read_snappy_blocks",
    "stems_of_basename",
]

#: ``<shared name>.meta-NNNNN-of-NNNNN``: the meta file of a multi-table file shard.
META_INFIX = ".meta"
_SHARD = r"-(\d{5})-of-(\d{5})"
_META_NAME = re.compile(r"(.+)" + re.escape(META_INFIX) + _SHARD)
_BLOCK_HEADER = 4  # uint32 big-endian compressed length
_OVERHEAD = 16  # TFRecord framing bytes around a record's data
_OFFSET = re.compile(r"byte offset (\d+)")

Bytes = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]


def _corrupt(path: str, offset: int, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path}: corrupt SNAPPY container at byte offset {offset}: {problem}"
    )


# ---------------------------------------------------------------------- SNAPPY blocks


@dataclass(frozen=True)
class _Blocks:
    """The blocks of one data file: ``file_offset`` (of the 4-byte header), compressed
    ``length``, and ``start`` / ``size`` in the decompressed stream (all ``int64[b]``)."""

    file_offset: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    size: npt.NDArray[np.int64]

    @property
    def total(self) -> int:
        return int(self.start[-1] + self.size[-1]) if self.start.size else 0

    def file_offset_of(self, logical: int) -> int:
        """File offset of the block holding decompressed byte ``logical``."""
        if not self.start.size:
            return 0
        k = max(0, int(np.searchsorted(self.start, logical, side="right")) - 1)
        return int(self.file_offset[k])


def read_snappy_blocks(
    path: str, first_offset: int = 0, *, blocks: _Blocks | None = None, first_block: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(file offset, decompressed bytes)`` for each block of a SNAPPY container.

    Reads from ``first_offset`` (a block boundary) to the end of the file; with
    ``blocks`` (an index already taken) each block's length and size must match it.

    :raises CheckpointCorruptError: a truncated block header or block, or a block that
        is not valid raw snappy (names the file and the block's offset).
    :raises OSError: the file cannot be read.
    """
    decompress = cramjam.snappy.decompress_raw
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(first_offset)
        pos = first_offset
        k = first_block
        while pos < size:
            header = f.read(_BLOCK_HEADER)
            if len(header) < _BLOCK_HEADER:
                raise _corrupt(path, pos, f"truncated block header ({len(header)} of 4 bytes)")
            length = int.from_bytes(header, "big")
            body = f.read(length)
            if len(body) < length:
                raise _corrupt(
                    path, pos, f"truncated block ({length} bytes announced, {len(body)} present)"
                )
            try:
                data = bytes(decompress(body))
            except Exception as e:  # cramjam.DecompressionError and anything it wraps
                raise _corrupt(path, pos, f"block of {length} bytes does not decompress: {e}"
                               ) from None
            if blocks is not None and (
                k >= blocks.length.size or int(blocks.length[k]) != length
                or int(blocks.size[k]) != len(data)
            ):
                raise _corrupt(path, pos, "the file changed since it was checked")
            yield pos, data
            pos += _BLOCK_HEADER + length
            k += 1


# ---------------------------------------------------------------------- records


def _logical_chunks(
    path: str, blocks_iter: Iterable[tuple[int, bytes]], skip: int, length: int, chunk: int
) -> Iterator[bytes]:
    """Decompressed bytes ``[skip, skip + length)`` of the blocks, about ``chunk`` at a time."""
    pending: list[bytes] = []
    have = 0
    left = length
    for _, data in blocks_iter:
        if left <= 0:
            break
        if skip >= len(data):
            skip -= len(data)
            continue
        piece = data[skip : skip + left] if (skip or len(data) - skip > left) else data
        skip = 0
        left -= len(piece)
        pending.append(piece)
        have += len(piece)
        if have >= chunk:
            yield b"".join(pending)
            pending, have = [], 0
    if pending:
        yield b"".join(pending)


def _records(
    path: str, chunks: Iterable[bytes], base: int, end: int, blocks: _Blocks | None,
    *, payloads: bool,
) -> Iterator[tuple[Bytes, Offsets, npt.NDArray[np.int64]]]:
    """Records of the decompressed bytes ``[base, end)`` given as consecutive ``chunks``.

    Yields ``(payload buffer, offsets, start of each record in the stream)`` per chunk
    (an empty buffer when not ``payloads``); both CRCs of every record checked.
    """
    length_crc: dict[int, int] = {}
    checker = _RunChecker()
    carry = b""
    name = f"{path} (decompressed stream)"
    try:
        for piece in chunks:
            data = carry + piece if carry else piece
            buf = np.frombuffer(data, dtype=np.uint8)
            runs, pos, _ = _scan_runs(memoryview(data), buf, base, name, end - base, length_crc)
            if runs:
                _check_runs(buf, runs, base, name, checker)
                counts = np.array([r[2] for r in runs], np.int64)
                period = np.array([r[1] + _OVERHEAD for r in runs], np.int64)
                first = np.array([r[0] for r in runs], np.int64)
                within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
                    np.cumsum(counts) - counts, counts
                )
                starts = base + np.repeat(first, counts) + within * np.repeat(period, counts)
                if payloads:
                    payload, offsets = _payloads(buf, runs)
                else:
                    payload = np.zeros(0, np.uint8)
                    offsets = np.zeros(starts.size + 1, np.int64)
                yield payload, offsets, starts
            carry = data[pos:]
            base += pos
        if carry or base < end:
            missing = end - base - len(carry)
            raise CheckpointCorruptError(
                f"{name}: corrupt TFRecord at byte offset {base}: truncated "
                + ("stream" if missing > 0 else "record")
                + f" ({len(carry)} bytes of an incomplete record at its end)"
            )
    except CheckpointCorruptError as e:
        raise _locate(e, blocks) from None


def _locate(e: CheckpointCorruptError, blocks: _Blocks | None) -> CheckpointCorruptError:
    """Add the file offset of the block holding the damaged record to a record error."""
    text = str(e)
    match = _OFFSET.search(text)
    if blocks is None or match is None or "decompressed stream" not in text:
        return e
    where = blocks.file_offset_of(int(match.group(1)))
    return CheckpointCorruptError(f"{text} (in the SNAPPY block at file offset {where})")


# ---------------------------------------------------------------------- parts


class MultiTablePart(str):
    """One sub-table's records in one data file; its ``str`` value is the file's path.

    :param table_name: the sub-table (a ``MultiHashTableMetadata.table_name``).
    :param records: how many records it has in this file.
    :param start: where its run starts in the decompressed stream; ``end``: where it ends.
    :param meta_path: the meta file that declared it.
    """

    table_name: str
    records: int
    start: int
    end: int
    meta_path: str
    _blocks: _Blocks

    def __new__(
        cls, path: str, table_name: str, records: int, start: int, end: int, meta_path: str,
        blocks: _Blocks,
    ) -> MultiTablePart:
        part = super().__new__(cls, path)
        part.table_name = table_name
        part.records = records
        part.start = start
        part.end = end
        part.meta_path = meta_path
        part._blocks = blocks
        return part

    @property
    def path(self) -> str:
        return str.__str__(self)

    def framed(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[Bytes, Offsets]]:
        """The sub-table's records in chunks ``(buffer, offsets)``, as
        :func:`~ps_server.checkpoint.tfrecord.read_framed_runs` yields a plain file's.

        Only the blocks holding the run are decompressed.

        :raises CheckpointCorruptError: damage (names the file and offsets), or the run
            no longer holds ``records`` records.
        """
        if self.records == 0:
            return
        blocks = self._blocks
        k = max(0, int(np.searchsorted(blocks.start, self.start, side="right")) - 1)
        stream = read_snappy_blocks(
            self.path, int(blocks.file_offset[k]), blocks=blocks, first_block=k
        )
        chunks = _logical_chunks(
            self.path, stream, self.start - int(blocks.start[k]), self.end - self.start,
            max(int(chunk_bytes), 1 << 16),
        )
        seen = 0
        for buffer, offsets, _ in _records(
            self.path, chunks, self.start, self.end, blocks, payloads=True
        ):
            seen += offsets.size - 1
            yield buffer, offsets
        if seen != self.records:
            raise CheckpointCorruptError(
                f"{self.path}: {self.table_name!r} has {seen} records, {self.meta_path} "
                f"declares {self.records} (the file changed since it was checked)"
            )


def index_data_file(
    data_path: str, meta_path: str, declared: Sequence[tuple[str, int]]
) -> list[MultiTablePart]:
    """Check a whole data file and locate each declared sub-table's run in it.

    :param declared: the meta file's ``(table_name, num_entries)`` in file order.
    :returns: one part per declared sub-table, in that order.
    :raises CheckpointCorruptError: any damage of the container or of a record, or
        fewer records than declared (records after the declared ones are checked too,
        then ignored, as Monolith ignores them).
    """
    counts = np.array([n for _, n in declared], dtype=np.int64)
    bounds = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=bounds[1:])
    want = int(bounds[-1])
    # Stream offsets of the records at each bound (and the stream's end).
    at = np.full(bounds.size, -1, dtype=np.int64)
    offsets: list[int] = []
    lengths: list[int] = []
    sizes: list[int] = []

    def blocks_seen() -> Iterator[tuple[int, bytes]]:
        for pos, data in read_snappy_blocks(data_path):
            offsets.append(pos)
            lengths.append(0)
            sizes.append(len(data))
            yield pos, data

    def index_so_far() -> _Blocks:
        sz = np.asarray(sizes, np.int64)
        start = np.zeros(sz.size, np.int64)
        if sz.size:
            np.cumsum(sz[:-1], out=start[1:])
        offs = np.asarray(offsets, np.int64)
        ends = np.append(offs[1:], os.path.getsize(data_path))
        return _Blocks(offs, ends - offs - _BLOCK_HEADER, start, sz)

    total_bytes = _stream_size(data_path)
    seen = 0
    try:
        chunks = _logical_chunks(data_path, blocks_seen(), 0, total_bytes, 8 << 20)
        for _, _, starts in _records(data_path, chunks, 0, total_bytes, None, payloads=False):
            k = starts.size
            hit = (bounds >= seen) & (bounds < seen + k)
            at[hit] = starts[bounds[hit] - seen]
            seen += k
    except CheckpointCorruptError as e:
        raise _locate(e, index_so_far()) from None
    blocks = index_so_far()
    at[bounds >= seen] = blocks.total
    if seen < want:
        raise CheckpointCorruptError(
            f"{data_path}: holds {seen} records but {meta_path} declares {want} "
            f"({', '.join(f'{n}: {c}' for n, c in declared)}): records are missing (the "
            f"file ends at byte offset {os.path.getsize(data_path)})"
        )
    return [
        MultiTablePart(data_path, name, int(counts[j]), int(at[j]), int(at[j + 1]),
                       meta_path, blocks)
        for j, (name, _) in enumerate(declared)
    ]


def _stream_size(path: str) -> int:
    """Decompressed size of a SNAPPY container, from each block's length preamble
    (only the block headers and preambles are read)."""
    total = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(_BLOCK_HEADER + 5)
            if len(head) < _BLOCK_HEADER:
                raise _corrupt(path, pos, f"truncated block header ({len(head)} of 4 bytes)")
            length = int.from_bytes(head[:_BLOCK_HEADER], "big")
            if pos + _BLOCK_HEADER + length > size:
                raise _corrupt(
                    path, pos,
                    f"truncated block ({length} bytes announced, "
                    f"{size - pos - _BLOCK_HEADER} present)",
                )
            value = shift = 0
            for byte in head[_BLOCK_HEADER:]:
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                raise _corrupt(path, pos, "block has no valid snappy length preamble")
            total += value
            pos += _BLOCK_HEADER + length
    return total


# ---------------------------------------------------------------------- file sets


@dataclass(frozen=True)
class MultiTableSet:
    """The files of one MultiHashTable resource (one saving process), checked.

    :param basename: ``<assets>/<shared name>``.
    :param data: the data file of each file shard, in shard order; ``meta`` likewise.
    :param parts: per file shard, one :class:`MultiTablePart` per meta record.
    """

    basename: str
    data: list[str]
    meta: list[str]
    parts: list[list[MultiTablePart]]


def multi_table_stems(directory: str) -> list[str]:
    """Shared names ``S`` with a ``S.meta-NNNNN-of-NNNNN`` file in ``directory``, sorted."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({m.group(1) for n in names if (m := _META_NAME.fullmatch(n))})


def stems_of_basename(basename: str) -> list[str]:
    """The resources a per-table restore of ``basename`` reads (shared names, in order).

    ``basename`` itself when it is a resource (``…/MonolithMultiHashTable_``,
    ``…/MonolithMultiHashTable_3``); else every parameter server's resource
    ``<stem><i>`` (when the stem ends with ``_``) or ``<stem>_<i>``, which must be
    ``0 … P-1``. ``[]``: no multi-table files.

    :raises CheckpointCorruptError: some parameter servers' files are missing.
    """
    directory = os.path.dirname(basename) or "."
    stem = os.path.basename(basename)
    stems = multi_table_stems(directory)
    if stem in stems:
        return [stem]
    pattern = re.compile(re.escape(stem) + (r"(\d+)" if stem.endswith("_") else r"_(\d+)"))
    found = {int(m.group(1)): s for s in stems if (m := pattern.fullmatch(s))}
    if not found:
        return []
    ps = len(found)
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing or set(found) != set(range(ps)):
        raise CheckpointCorruptError(
            f"multi-table checkpoint {basename} is incomplete: the files of parameter "
            f"server(s) {', '.join(map(str, missing))} are missing (found "
            f"{', '.join(found[i] for i in sorted(found))})"
        )
    return [found[i] for i in range(ps)]


def _complete_groups(directory: str, stems: list[str]) -> None:
    """Per-PS resources ``<x><i>`` of one stem ``x`` must be ``0 … P-1`` (a missing
    one would silently drop its ids)."""
    groups: dict[str, set[int]] = {}
    for s in stems:
        m = re.fullmatch(r"(.*\D)(\d+)", s)
        if m is not None:
            groups.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, indices in groups.items():
        missing = [i for i in range(max(indices) + 1) if i not in indices]
        for i in missing:
            data = re.compile(re.escape(f"{prefix}{i}") + _SHARD)
            found = sorted(n for n in os.listdir(directory) if data.fullmatch(n))
            if found:
                raise CheckpointCorruptError(
                    f"multi-table checkpoint {directory} is incomplete: {', '.join(found)} "
                    f"has no meta file {prefix}{i}{META_INFIX}-NNNNN-of-NNNNN"
                )
        if missing:
            names = ", ".join(prefix + str(i) for i in missing)
            raise CheckpointCorruptError(
                f"multi-table checkpoint {directory} is incomplete: the files of parameter "
                f"server(s) {', '.join(map(str, missing))} ({names}) are missing"
            )


def _file_sets(basename: str) -> tuple[list[str], list[str]]:
    """Data and meta files of ``basename``, checked as Monolith checks them (§7.2)."""
    directory = os.path.dirname(basename) or "."
    stem = os.path.basename(basename)
    pattern = re.compile(re.escape(stem) + _SHARD)
    by_shard: dict[int, str] = {}
    counts: set[int] = set()
    for name in sorted(os.listdir(directory)):
        m = pattern.fullmatch(name)
        if m is None:
            continue
        by_shard[int(m.group(1))] = os.path.join(directory, name)
        counts.add(int(m.group(2)))
    if not by_shard:
        raise CheckpointCorruptError(
            f"multi-table checkpoint {basename} has meta files but no data file "
            f"{stem}-NNNNN-of-NNNNN"
        )
    if len(counts) > 1:
        raise CheckpointCorruptError(
            f"data files of {basename} disagree on the file count ({sorted(counts)}): "
            + ", ".join(by_shard[i] for i in sorted(by_shard))
        )
    (n,) = counts
    beyond = [by_shard[i] for i in by_shard if i >= n]
    if beyond or n == 0:
        raise CheckpointCorruptError(f"{beyond[0] if beyond else basename}: shard is not below {n}")
    missing = [f"{basename}-{i:05d}-of-{n:05d}" for i in range(n) if i not in by_shard]
    if missing:
        raise CheckpointCorruptError(
            f"multi-table checkpoint {basename} is incomplete: missing {', '.join(missing)}"
        )
    data = [by_shard[i] for i in range(n)]
    meta = [f"{basename}{META_INFIX}-{i:05d}-of-{n:05d}" for i in range(n)]
    absent = [m for m in meta if not os.path.isfile(m)]
    if absent:
        raise CheckpointCorruptError(
            f"multi-table checkpoint {basename} is incomplete: missing meta file(s) "
            f"{', '.join(absent)}"
        )
    return data, meta


def _read_meta(path: str) -> list[tuple[str, int]]:
    """``(table_name, num_entries)`` of every record of a meta file, in order."""
    out: list[tuple[str, int]] = []
    offset = 0
    for record in read_records(path):
        meta = eht.MultiHashTableMetadata()
        try:
            meta.ParseFromString(record)
        except DecodeError as e:
            raise CheckpointCorruptError(
                f"{path}: record at byte offset {offset} is not a MultiHashTableMetadata: {e}"
            ) from None
        if not meta.table_name:
            raise CheckpointCorruptError(
                f"{path}: record at byte offset {offset} names no table"
            )
        out.append((meta.table_name, int(meta.num_entries)))
        offset += len(record) + _OVERHEAD
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise CheckpointCorruptError(f"{path}: a table is declared twice: {names}")
    return out


def read_multi_table_set(basename: str, root: DataRoot = UNCONFINED) -> MultiTableSet:
    """Check every file of one resource and index its data files (see module doc).

    :raises CheckpointCorruptError: incomplete file set, damaged data or meta file.
    :raises PathOutsideRootError: a file resolves outside ``root`` (nothing read).
    """
    data, meta = _file_sets(basename)
    root.check_all([*data, *meta], "multi-table file")
    parts = [
        index_data_file(d, m, _read_meta(m)) for d, m in zip(data, meta, strict=True)
    ]
    return MultiTableSet(basename, data, meta, parts)


class MultiTableCheckpoint:
    """Every MultiHashTable resource of a checkpoint (or of one basename), indexed.

    :param sets: the resources, each checked and indexed when this was built.
    """

    def __init__(self, sets: list[MultiTableSet]) -> None:
        self.sets = sets

    @classmethod
    def of_assets(cls, assets: str, root: DataRoot = UNCONFINED) -> MultiTableCheckpoint | None:
        """All resources of an assets directory; None when it has no multi-table files."""
        stems = multi_table_stems(assets)
        if not stems:
            return None
        _complete_groups(assets, stems)
        return cls([read_multi_table_set(os.path.join(assets, s), root) for s in stems])

    @classmethod
    def of_basename(cls, basename: str, root: DataRoot = UNCONFINED
                    ) -> MultiTableCheckpoint | None:
        """The resources of a per-table restore's basename (:func:`stems_of_basename`)."""
        directory = os.path.dirname(basename) or "."
        stems = stems_of_basename(basename)
        if not stems:
            return None
        return cls([read_multi_table_set(os.path.join(directory, s), root) for s in stems])

    def table_names(self) -> list[str]:
        """Every sub-table named in some meta file, sorted."""
        return sorted({p.table_name for s in self.sets for shard in s.parts for p in shard})

    def parts(self, candidates: Sequence[str]) -> list[str] | None:
        """The parts of the first of ``candidates`` some meta file names, in reading
        order (resource, then file shard); parts without records are left out. None:
        no meta file names any of them."""
        names = set(self.table_names())
        for candidate in candidates:
            if candidate in names:
                return [
                    p for s in self.sets for shard in s.parts for p in shard
                    if p.table_name == candidate and p.records
                ]
        return None

    def files(self) -> list[str]:
        """Every data and meta file read."""
        return [f for s in self.sets for f in (*s.data, *s.meta)]
