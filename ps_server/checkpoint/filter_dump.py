"""Hash-filter files: one TFRecord file per split, Monolith's layout and bytes.

``save_filter(f, "<dir>/hash_filter_0")`` writes ``hash_filter_0-%05d-of-%05d`` for
each of the filter's ``split_num`` splits. Each file holds one
``HashFilterSplitMetaDump`` record, then ``ceil((total_size + 64) / 10000)``
``HashFilterSplitDataDump`` records ``{offset, data = cells[offset:offset + 10000]}``
(``offset`` always present, ``data`` unpacked as proto2 writes it: ``0x10 <varint>``
per cell). Data records are encoded and decoded with numpy, not per-cell protobuf
objects; the bytes equal protobuf's serialization.

``restore_filter`` lists ``<basename>-*``, keeps names whose suffix is exactly
``-NNNNN-of-NNNNN``, requires one shard count and every shard, reads and validates
everything (CRCs, metas against the live filter, cell ranges), and only then replaces
the filter's state. Filters with ``split_num == 0`` (dummy, probabilistic) write no
file and restore as a no-op.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from protos import embedding_hash_table_pb2 as eht
from protos.wire import WireError, read_varint, varint
from ps_server.checkpoint.tfrecord import FileFacts, TFRecordWriter, read_framed
from ps_server.engine.filters.base import FilterSplit, HashFilter
from ps_server.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigMismatchError,
)
from ps_server.paths import UNCONFINED, DataRoot

__all__ = [
    "CELLS_PER_RECORD",
    "decode_data_records",
    "encode_data_records",
    "filter_file_name",
    "list_filter_files",
    "read_filter",
    "restore_filter",
    "save_filter",
]

#: Cells per ``HashFilterSplitDataDump`` record (Monolith's ``kMaxNumPerTfRecord``).
CELLS_PER_RECORD = 10_000
_RECORDS_PER_BATCH = 100  # data records encoded/framed together (1M cells)
_READ_CHUNK_BYTES = 8 << 20
_SHARD_SUFFIX = re.compile(r"(\d{5})-of-(\d{5})")
_TAG_OFFSET = 0x08  # field 1, varint
_TAG_DATA = 0x10  # field 2, varint

_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]


def filter_file_name(basename: str, index: int, count: int) -> str:
    """``<basename>-%05d-of-%05d``."""
    return f"{basename}-{index:05d}-of-{count:05d}"


# ---------------------------------------------------------------------- encoding


def encode_data_records(
    cells: npt.NDArray[np.uint16], first_cell: int = 0, per_record: int = CELLS_PER_RECORD
) -> tuple[_U8, _I64]:
    """Serialize ``HashFilterSplitDataDump`` records for a run of cells.

    :param cells: ``uint16[m]`` cells starting at split position ``first_cell``
        (a multiple of ``per_record``).
    :returns: ``(buffer, offsets)``: one record per ``per_record`` cells,
        ``offset = first_cell + i * per_record`` (present even when 0), each record
        byte-identical to ``HashFilterSplitDataDump.SerializeToString()``.
    """
    v = np.asarray(cells, dtype=np.uint16).astype(np.int64)
    m = v.shape[0]
    n_rec = -(-m // per_record)
    headers = [
        bytes([_TAG_OFFSET]) + varint(first_cell + r * per_record) for r in range(n_rec)
    ]
    header_len = np.array([len(h) for h in headers], dtype=np.int64)
    size = 2 + (v >= 1 << 7) + (v >= 1 << 14)  # tag byte + 1..3 varint bytes
    record_of_cell = np.arange(m, dtype=np.int64) // per_record
    cell_end = np.cumsum(size)
    cell_pos = cell_end - size + np.cumsum(header_len)[record_of_cell]
    cell_bytes_per_record = np.bincount(record_of_cell, weights=size, minlength=n_rec)
    offsets = np.zeros(n_rec + 1, dtype=np.int64)
    np.cumsum(header_len + cell_bytes_per_record.astype(np.int64), out=offsets[1:])

    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    for r, h in enumerate(headers):
        out[offsets[r] : offsets[r] + len(h)] = np.frombuffer(h, dtype=np.uint8)
    out[cell_pos] = _TAG_DATA
    more1 = size > 2
    out[cell_pos + 1] = (v & 0x7F) | (more1 << 7)
    two = np.flatnonzero(more1)
    more2 = size[two] > 3
    out[cell_pos[two] + 2] = ((v[two] >> 7) & 0x7F) | (more2 << 7)
    three = two[more2]
    out[cell_pos[three] + 3] = v[three] >> 14
    return out, offsets


def decode_data_records(
    buffer: _U8, offsets: _I64, cells: npt.NDArray[np.uint16], where: str
) -> None:
    """Write the cells carried by serialized ``HashFilterSplitDataDump`` records.

    Records laid out as Monolith writes them (``offset`` first, then unpacked ``data``
    varints, records covering consecutive cells) are parsed with numpy; anything else
    goes through protobuf record by record (later records win on overlap).

    :param cells: ``uint16[total_size + 64]`` destination.
    :param where: file name for error messages.
    :raises CheckpointCorruptError: unparsable record, a cell value above 65535, or
        data beyond the split's cells.
    """
    if offsets.shape[0] <= 1:
        return
    decoded = _decode_fast(buffer, offsets)
    if decoded is None:
        _decode_slow(buffer, offsets, cells, where)
        return
    first, values = decoded
    if values.size == 0:
        return
    if first + values.shape[0] > cells.shape[0]:
        raise CheckpointCorruptError(
            f"{where}: data records reach cell {first + values.shape[0] - 1}, beyond the "
            f"split's {cells.shape[0]} cells"
        )
    if int(values.max()) > 0xFFFF:
        raise CheckpointCorruptError(f"{where}: a filter cell value exceeds 16 bits")
    cells[first : first + values.shape[0]] = values


def _decode_fast(buffer: _U8, offsets: _I64) -> tuple[int, npt.NDArray[np.int32]] | None:
    """Parse records of Monolith's exact shape; None if any record differs.

    The shape: every record is ``0x08 <offset varint>`` then ``0x10 <value varint>``
    pairs, values of at most 3 varint bytes, and each record's offset is where the
    previous one ended. Returns ``(first cell, values)``.
    """
    if bool((offsets[1:] == offsets[:-1]).any()) or buffer.size == 0:
        return None  # an empty record carries no offset field
    if buffer[buffer.size - 1] >= 0x80 or bool((buffer[offsets[1:] - 1] >= 0x80).any()):
        return None  # a varint would run across a record boundary
    term = np.flatnonzero(buffer < 0x80)  # last byte of each varint
    if term.shape[0] % 2 or term[0] != 0:
        return None
    # Tags are single bytes: each tag directly follows the previous value's last byte.
    tags_at = term[0::2]
    ends = term[1::2]
    if bool((tags_at[1:] != ends[:-1] + 1).any()):
        return None
    pair_start = np.searchsorted(tags_at, offsets)
    if bool((tags_at[np.minimum(pair_start[:-1], tags_at.shape[0] - 1)] != offsets[:-1]).any()):
        return None  # a record does not start on a tag
    tags = buffer[tags_at]
    is_offset = np.zeros(tags.shape[0], dtype=np.bool_)
    is_offset[pair_start[:-1]] = True
    if bool((tags[is_offset] != _TAG_OFFSET).any()) or bool(
        (tags[~is_offset] != _TAG_DATA).any()
    ):
        return None
    size = ends - tags_at  # varint bytes of each value
    data_at = tags_at[~is_offset]
    data_size = size[~is_offset]
    if data_size.size and int(data_size.max()) > 3:
        return None
    value = (buffer[data_at + 1] & 0x7F).astype(np.int32)
    two = np.flatnonzero(data_size >= 2)
    value[two] |= (buffer[data_at[two] + 2] & 0x7F).astype(np.int32) << 7
    three = two[data_size[two] == 3]
    value[three] |= buffer[data_at[three] + 3].astype(np.int32) << 14
    view = buffer.data
    try:
        record_offset = np.array(
            [read_varint(view, int(at) + 1, len(view))[0] for at in tags_at[is_offset]],
            dtype=np.int64,
        )
    except (WireError, OverflowError):  # over ten bytes, or beyond int64
        return None
    counts = np.diff(pair_start) - 1
    expected = record_offset[0] + np.cumsum(counts) - counts
    if bool((record_offset != expected).any()):
        return None
    return int(record_offset[0]), value


def _store(cells: npt.NDArray[np.uint16], dest: _I64, values: _I64, where: str) -> None:
    if dest.size == 0:
        return
    if int(values.max()) > 0xFFFF:
        raise CheckpointCorruptError(f"{where}: a filter cell value exceeds 16 bits")
    if int(dest.max()) >= cells.shape[0]:
        raise CheckpointCorruptError(
            f"{where}: data records reach cell {int(dest.max())}, beyond the split's "
            f"{cells.shape[0]} cells"
        )
    cells[dest] = values.astype(np.uint16)


def _decode_slow(
    buffer: _U8, offsets: _I64, cells: npt.NDArray[np.uint16], where: str
) -> None:
    for i in range(offsets.shape[0] - 1):
        dump = eht.HashFilterSplitDataDump()
        try:
            dump.ParseFromString(buffer[offsets[i] : offsets[i + 1]].tobytes())
        except DecodeError as e:
            raise CheckpointCorruptError(
                f"{where}: a HashFilterSplitDataDump record does not parse: {e}"
            ) from e
        values = np.asarray(dump.data, dtype=np.int64)
        _store(cells, dump.offset + np.arange(values.shape[0], dtype=np.int64), values, where)


# ---------------------------------------------------------------------- save


def _split_batches(cells: npt.NDArray[np.uint16]) -> Iterator[tuple[_U8, _I64]]:
    step = CELLS_PER_RECORD * _RECORDS_PER_BATCH
    for first in range(0, cells.shape[0], step):
        yield encode_data_records(cells[first : first + step], first)


def save_filter(
    hash_filter: HashFilter,
    basename: str,
    facts: list[FileFacts] | None = None,
    *,
    root: DataRoot = UNCONFINED,
) -> list[str]:
    """Write the filter's splits to ``<basename>-%05d-of-%05d``; returns the paths.

    :param facts: if given, each file's size, record count and CRC-32C (computed while
        writing) are appended to it, in path order.

    Every file is first written completely under a temporary name; the renames happen
    only once all of them are written, so a failed save leaves earlier files in place.
    Parent directories are created. ``split_num == 0`` writes nothing and returns ``[]``.

    :raises OSError: the files cannot be written (temporary files are removed).
    :raises PathOutsideRootError: the files' directory resolves outside ``root``.
    """
    root.check(basename, "filter files")
    splits = hash_filter.export_splits()
    count = len(splits)
    writers: list[TFRecordWriter] = []
    try:
        for i, split in enumerate(splits):
            writer = TFRecordWriter(filter_file_name(basename, i, count))
            writers.append(writer)
            writer.write(split.meta.SerializeToString())
            for buffer, offsets in _split_batches(split.cells):
                writer.write_buffer(buffer, offsets)
        written = [w.facts() for w in writers]
        while writers:
            writers[0].close()
            writers.pop(0)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    if facts is not None:
        facts.extend(written)
    return [filter_file_name(basename, i, count) for i in range(count)]


# ---------------------------------------------------------------------- restore


def list_filter_files(basename: str) -> list[str]:
    """The shard files of ``basename`` in shard order, checked to form a complete set.

    :raises CheckpointNotFoundError: no file named ``<basename>-NNNNN-of-NNNNN``.
    :raises CheckpointCorruptError: files disagree on the shard count, a shard is
        missing, or a shard index is out of range (the message names the files).
    """
    directory = os.path.dirname(basename) or "."
    prefix = os.path.basename(basename) + "-"
    try:
        names = os.listdir(directory)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(
            f"no valid sharded files for {basename}: directory {directory} does not exist"
        ) from e
    found: dict[int, str] = {}
    totals: dict[int, str] = {}
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        match = _SHARD_SUFFIX.fullmatch(name[len(prefix) :])
        if match is None:
            continue
        index, total = int(match.group(1)), int(match.group(2))
        path = os.path.join(directory, name)
        totals.setdefault(total, path)
        if index >= total:
            raise CheckpointCorruptError(f"{path}: shard index {index} is not below {total}")
        found[index] = path
    if not found:
        raise CheckpointNotFoundError(f"no valid sharded files for {basename}")
    if len(totals) > 1:
        listed = ", ".join(f"{path} (of {total})" for total, path in sorted(totals.items()))
        raise CheckpointCorruptError(
            f"filter files of {basename} disagree on the shard count: {listed}"
        )
    (total,) = totals
    missing = [i for i in range(total) if i not in found]
    if missing:
        raise CheckpointCorruptError(
            f"filter checkpoint {basename} is incomplete: missing "
            + ", ".join(filter_file_name(basename, i, total) for i in missing)
        )
    return [found[i] for i in range(total)]


def _read_split(
    hash_filter: HashFilter, index: int, path: str, cells_per_split: int
) -> FilterSplit:
    meta: eht.HashFilterSplitMetaDump | None = None
    cells = np.zeros(cells_per_split, dtype=np.uint16)
    for buffer, offsets in read_framed(path, chunk_bytes=_READ_CHUNK_BYTES):
        if meta is None:
            meta = eht.HashFilterSplitMetaDump()
            try:
                meta.ParseFromString(buffer[offsets[0] : offsets[1]].tobytes())
            except DecodeError as e:
                raise CheckpointCorruptError(
                    f"{path}: the first record is not a HashFilterSplitMetaDump: {e}"
                ) from e
            hash_filter.check_split_meta(index, meta, path)
            buffer = buffer[offsets[1] :]
            offsets = offsets[1:] - offsets[1]
        decode_data_records(buffer, offsets, cells, path)
    if meta is None:
        raise CheckpointCorruptError(f"{path}: empty file, expected a HashFilterSplitMetaDump")
    return FilterSplit(meta, cells)


def read_filter(
    hash_filter: HashFilter, basename: str, *, root: DataRoot = UNCONFINED
) -> tuple[list[FilterSplit], list[str]]:
    """Read and validate a filter checkpoint without touching the filter.

    :returns: ``(splits, paths)`` ready for ``hash_filter.import_splits(splits, paths)``;
        empty lists when ``hash_filter.split_num == 0``.
    :raises CheckpointNotFoundError: no file for ``basename``.
    :raises CheckpointCorruptError: bad names/shard set, CRC or truncation, unparsable
        records, cells out of range, splits disagreeing with each other.
    :raises ConfigMismatchError: shard count or a meta field differs from the live filter.
    :raises PathOutsideRootError: a file resolves outside ``root`` (nothing read).
    """
    if hash_filter.split_num == 0:
        return [], []
    root.check(basename, "filter files")
    paths = list_filter_files(basename)
    root.check_all(paths, "filter file")
    if len(paths) != hash_filter.split_num:
        raise ConfigMismatchError(
            f"{paths[0]}: the checkpoint has {len(paths)} filter split file(s) but the live "
            f"filter has split_num {hash_filter.split_num}"
        )
    cells_per_split = hash_filter.cells_per_split
    splits = [
        _read_split(hash_filter, i, path, cells_per_split) for i, path in enumerate(paths)
    ]
    for i, (split, path) in enumerate(zip(splits, paths, strict=True)):
        hash_filter.check_split(i, split, path)
    return splits, paths


def restore_filter(
    hash_filter: HashFilter,
    basename: str,
    *,
    validate_only: bool = False,
    root: DataRoot = UNCONFINED,
) -> list[str]:
    """Replace the filter's state with the checkpoint at ``basename``, all or nothing.

    A filter with ``split_num == 0`` (dummy, probabilistic) is left as is and no file
    is looked for. Errors as :func:`read_filter` (plus the cross-split checks of
    ``import_splits``); on any error the filter is unchanged.

    :param validate_only: read and check everything but leave the filter as it is.
    :returns: the files read, in split order (``[]`` when ``split_num == 0``).
    """
    splits, paths = read_filter(hash_filter, basename, root=root)
    if splits:
        if validate_only:
            hash_filter.validate_splits(splits, paths)
        else:
            hash_filter.import_splits(splits, paths)
    return paths
