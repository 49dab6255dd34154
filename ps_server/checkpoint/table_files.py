"""Table files: one shard's embedding table as TFRecord files of ``EntryDump`` records.

Saving shard ``i`` writes ``<basename>_<i>-%05d-of-%05d`` (``<basename>-%05d-of-%05d``,
Monolith's single-table layout, when no shard index is given). Each record is
``EntryDump{id, num, opt, last_update_ts_sec}`` with all four fields present, byte
for byte what Monolith writes (docs/semantics.md §6.1, §6.2). The number of files is the
table's ``saver_parallel`` when it is >= 0 (0 is taken as 1 so a save always leaves
a file to find), else ``min(4, max(1, size // 1_000_000))``; file ``k`` holds the
``k``-th contiguous range of the table's rows, encoded ``SAVE_CHUNK_ROWS`` at a time
(a helper thread frames and writes one chunk while the next is encoded), so a save
never holds a second copy of the table. Each file is written under a temporary name, fsynced and
renamed only when every file of the save is complete; the saving shard's older parts
with another file count are then removed. Use a fresh basename per save when the
number of saving shards changes: parts of shards that no longer exist are not removed.

Expiry on save (§6.3): with ``clock`` the table's ``max_update_ts`` read when the save
starts, a record is left out iff ``clock - ts >= expire_days(slot_v2(id)) * 86400``.
The live table is not changed.

Restoring ``basename`` reads every part: ``<basename>_<i>-NNNNN-of-NNNNN`` for any
saving shard ``i`` and ``<basename>-NNNNN-of-NNNNN``; other names (``-tmp-`` files,
``<basename>_x``) are ignored. Each saving shard's parts must agree on the file count
and all be present. Files are read in order: the single layout first, then saving
shard 0, 1, ... and within each its files in order; an id present in two files takes
the later one. Restore runs in two passes over the files, so memory stays bounded by
a chunk: the first checks everything (CRCs, framing, every record's encoding, dims)
without building columns or touching the table; only then the second clears the
table, sizes its storage for the checked record count and loads the entries whose
``floormod(id, num_shards) == shard_index``. An empty table is loaded in one pass
instead (storage sized from the file sizes) and emptied again on any error (the same
all-or-nothing outcome). Files are read ``READ_CHUNK_BYTES`` at a time; the checking
pass works on up to ``RESTORE_THREADS`` files at once and the loading pass reads,
decodes and selects one chunk ahead on a helper thread while the calling thread
writes the table. Nothing expires on restore; the table clock rises to the newest
loaded timestamp (each shard's own records).

Naming caveat: ``<basename>_<i>-…`` of saving shard ``i`` and Monolith's single layout
of a table literally named ``<basename>_<i>`` look the same; restore reads both as
parts of ``<basename>``. Checkpoints avoid this: their manifest lists each table's
files, and only manifest-less (Monolith) checkpoints are globbed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.entry_dump import (
    DecodedEntries,
    check_entry_dumps,
    decode_entry_dumps,
    decode_framed_entry_dumps,
    encode_entry_dump_rows,
)
from ps_server.checkpoint.monolith_multi import MultiTableCheckpoint, MultiTablePart
from ps_server.checkpoint.tfrecord import (
    FRAME_MARGINS,
    FileFacts,
    TFRecordWriter,
    frame_record_runs_array,
    frame_rows,
    read_framed_chunks,
    read_framed_runs,
    run_payloads,
)
from ps_server.engine.expiry import expire_seconds_by_slot, expired_mask
from ps_server.engine.hash_table import EmbeddingHashTable, EntryColumns
from ps_server.engine.optimizers import optimizer_from_config
from ps_server.engine.optimizers.base import Optimizer, State, has_duplicates
from ps_server.engine.types import Ids
from ps_server.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigMismatchError,
    InvalidArgumentError,
    ServingEntryError,
)
from ps_server.paths import UNCONFINED, DataRoot

__all__ = [
    "READ_CHUNK_BYTES",
    "RESTORE_THREADS",
    "SAVE_CHUNK_ROWS",
    "RestoreResult",
    "SaveResult",
    "TablePart",
    "default_nshards",
    "list_table_parts",
    "load_into_empty_table",
    "load_table_files",
    "part_name",
    "restore_table",
    "save_table",
    "scan_table_parts",
    "validate_table_files",
]

#: Table rows encoded and written per step of a save.
SAVE_CHUNK_ROWS = 1 << 14
#: File bytes read and decoded per step of a restore.
READ_CHUNK_BYTES = 4 << 20
#: Threads checking files in parallel during a restore's first pass.
RESTORE_THREADS = max(1, min(2, os.cpu_count() or 1))

_PART = r"-(\d{5,})-of-(\d{5,})"
# TFRecord framing around each record: length, its CRC, the data's CRC.
_FRAMING_BYTES = 16
# float32's smallest normal: a squared norm below it is a zero vector (as the table does).
_FLT_MIN = np.float32(1.17549435e-38)


@dataclass(frozen=True)
class SaveResult:
    """What a save wrote: the files (in part order) and the number of records.

    ``facts``: per file (same order), its size, record count and whole-file CRC-32C,
    computed while writing (for the checkpoint manifest).
    """

    files: list[str]
    entries: int
    facts: list[FileFacts] = field(default_factory=list)


@dataclass(frozen=True)
class RestoreResult:
    """What a restore read: the files (in reading order) and the number of entries.

    ``entries`` is the table's size after a restore; with ``validate_only`` it is the
    number of records the shard would load (an id repeated across files counts once
    per record).
    """

    files: list[str]
    entries: int


@dataclass(frozen=True)
class TablePart:
    """One file of a saved table.

    :param saving_shard: the ``i`` of ``<basename>_<i>-…``; None for ``<basename>-…``.
    """

    path: str
    saving_shard: int | None
    index: int
    count: int


def part_name(basename: str, shard_index: int | None, index: int, count: int) -> str:
    """``<basename>_<shard_index>-%05d-of-%05d`` (``<basename>-%05d-of-%05d`` for None)."""
    stem = basename if shard_index is None else f"{basename}_{shard_index}"
    return f"{stem}-{index:05d}-of-{count:05d}"


def default_nshards(size: int) -> int:
    """Monolith's file count for ``size`` entries: ``min(4, max(1, size // 1_000_000))``."""
    return min(4, max(1, size // 1_000_000))


# ---------------------------------------------------------------------- save


def save_table(
    table: EmbeddingHashTable,
    basename: str,
    *,
    shard_index: int | None,
    nshards: int = -1,
    root: DataRoot = UNCONFINED,
) -> SaveResult:
    """Write the table's unexpired entries to ``nshards`` files (see the module docstring).

    :param shard_index: the saving shard's index (``<basename>_<i>-…``), or None for
        Monolith's single-table layout ``<basename>-…``.
    :param nshards: the table's ``saver_parallel``: the file count when >= 0 (0 counts
        as 1), else Monolith's rule :func:`default_nshards`.
    :returns: the files written and the number of records in them.
    :raises ServingEntryError: SERVING tables keep no optimizer state to save.
    :raises ConfigError: the table's expire config names a slot >= 32768.
    :raises OSError: a file cannot be written (every file of this save is removed and
        existing files are unchanged).
    :raises PathOutsideRootError: the files' directory resolves outside ``root``.
    """
    root.check(basename, "table files")
    if table.layout.serving:
        raise ServingEntryError(
            f"table {table.name!r} has SERVING entries; saving needs TRAINING entries"
        )
    if shard_index is not None and shard_index < 0:
        raise InvalidArgumentError(f"shard_index must be >= 0 or None, got {shard_index}")
    size = table.size()
    count = max(1, nshards) if nshards >= 0 else default_nshards(size)
    clock = table.max_update_ts
    expire_seconds = expire_seconds_by_slot(table.config.slot_expire_time_config)
    shortest = int(expire_seconds.min())
    optimizers = _training_optimizers(table)
    bounds = [size * k // count for k in range(count + 1)]
    paths = [part_name(basename, shard_index, k, count) for k in range(count)]
    writers: list[TFRecordWriter] = []
    entries = 0
    behind = _WriteBehind()
    try:
        for k, path in enumerate(paths):
            writer = TFRecordWriter(path)
            writers.append(writer)
            for start in range(bounds[k], bounds[k + 1], SAVE_CHUNK_ROWS):
                cols = table.export_columns(start, min(start + SAVE_CHUNK_ROWS, bounds[k + 1]))
                if _may_expire(cols.timestamps, clock, shortest):
                    expired = expired_mask(cols.ids, cols.timestamps, clock, expire_seconds)
                    if expired.any():
                        cols = _select(cols, ~expired)
                n = cols.ids.shape[0]
                if n == 0:
                    continue
                # Records of one length come back framed in place but for their
                # headers and CRCs (written by the write-behind thread).
                buffer, offsets = encode_entry_dump_rows(
                    cols.values,
                    list(zip(optimizers, cols.states, strict=True)),
                    cols.timestamps,
                    cols.ids,
                    FRAME_MARGINS,
                )
                behind.write(writer, buffer, offsets, n)
                entries += n
            behind.written(writer)
        behind.finish()
        facts = [w.facts() for w in writers]
        while writers:
            writers[0].close()
            writers.pop(0)
    except BaseException:
        behind.abandon()
        for writer in writers:
            writer.abort()
        raise
    _remove_stale_parts(basename, shard_index, count)
    return SaveResult(paths, entries, facts)


def _may_expire(timestamps: npt.NDArray[np.int64], clock: int, shortest: int) -> bool:
    """Whether any of these entries could be expired at ``clock`` (else the per-id
    expiry test is skipped): the oldest one's age reaches the shortest expire time.

    Ages are taken as :func:`expired_mask` takes them (int64 ``clock - ts``); when that
    could wrap around for a timestamp of the chunk, the answer is yes.
    """
    if timestamps.size == 0:
        return False
    oldest, newest = int(timestamps.min()), int(timestamps.max())
    lo, hi = -(1 << 63), (1 << 63) - 1
    if not (lo <= clock - oldest <= hi and lo <= clock - newest <= hi):
        return True
    return clock - oldest >= shortest


class _WriteBehind:
    """Frames (CRCs) and writes encoded chunks on a helper thread, overlapping encoding.

    At most ``depth`` chunks wait; an error is raised by the next :meth:`write` or by
    :meth:`finish`. A file reported complete (:meth:`written`) starts flushing to the
    device on a thread of its own while the next file is encoded, so the final
    ``close`` (which fsyncs) finds little left to write.
    """

    def __init__(self, depth: int = 1) -> None:
        self._pending: queue.Queue[_Chunk | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._syncs: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="ckpt-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            if self._error is None:
                writer, buffer, offsets, n = item
                try:
                    if buffer is None:
                        self._start_sync(writer.tmp_path)
                    elif offsets is None:
                        writer.write_frames(frame_rows(buffer), n)
                    else:
                        writer.write_frames(frame_record_runs_array(buffer, offsets), n)
                except BaseException as e:  # handed to the saving thread
                    self._error = e

    def _start_sync(self, path: str) -> None:
        thread = threading.Thread(target=_fsync_quietly, args=(path,), name="ckpt-sync",
                                  daemon=True)
        thread.start()
        self._syncs.append(thread)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, writer: TFRecordWriter, buffer: npt.NDArray[np.uint8],
              offsets: npt.NDArray[np.int64] | None, n: int) -> None:
        """Queue ``n`` encoded records for ``writer``: ``buffer``/``offsets``, or with
        ``offsets`` None rows to frame in place (see :func:`encode_entry_dump_rows`)."""
        self._raise()
        self._pending.put((writer, buffer, offsets, n))

    def written(self, writer: TFRecordWriter) -> None:
        """Everything of ``writer`` is queued: flush it early once it is written."""
        self._raise()
        self._pending.put((writer, None, None, 0))

    def finish(self) -> None:
        """Wait until everything is written; raise the first error."""
        self._pending.put(None)
        self._thread.join()
        self._join_syncs()
        self._raise()

    def abandon(self) -> None:
        """Stop after the queued chunks (their writers are about to be aborted)."""
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()
        self._join_syncs()

    def _join_syncs(self) -> None:
        for thread in self._syncs:
            thread.join()
        self._syncs.clear()


_Chunk = tuple[TFRecordWriter, npt.NDArray[np.uint8] | None, npt.NDArray[np.int64] | None, int]


def _fsync_quietly(path: str) -> None:
    """Flush ``path``'s written data to the device, ignoring errors (a performance hint:
    the writer's own fsync on close still reports them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _training_optimizers(table: EmbeddingHashTable) -> list[Optimizer]:
    optimizers = []
    for seg in table.layout.segments:
        assert seg.optimizer is not None, "TRAINING segments have optimizers"
        optimizers.append(seg.optimizer)
    return optimizers


def _select(cols: EntryColumns, keep: npt.NDArray[np.bool_]) -> EntryColumns:
    def pick(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.compress(keep, a, axis=0)  # whole rows, faster than a[keep]

    return EntryColumns(
        ids=pick(cols.ids),
        values=pick(cols.values),
        states=[{k: pick(a) for k, a in st.items()} for st in cols.states],
        timestamps=pick(cols.timestamps),
    )


def _remove_stale_parts(basename: str, shard_index: int | None, count: int) -> None:
    """Delete this saving shard's parts of ``basename`` written with another file count."""
    for part in scan_table_parts(basename):
        if part.saving_shard == shard_index and part.count != count:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part.path)


# ---------------------------------------------------------------------- restore


def scan_table_parts(basename: str) -> list[TablePart]:
    """Files named ``<basename>_<i>-NNNNN-of-NNNNN`` or ``<basename>-NNNNN-of-NNNNN``,
    unordered and unchecked (``[]`` when the directory does not exist)."""
    directory = os.path.dirname(basename) or "."
    stem = os.path.basename(basename)
    pattern = re.compile(re.escape(stem) + r"(?:_(\d+))?" + _PART)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    parts = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        shard = None if match.group(1) is None else int(match.group(1))
        parts.append(
            TablePart(
                os.path.join(directory, name), shard, int(match.group(2)), int(match.group(3))
            )
        )
    return parts


def list_table_parts(basename: str) -> list[TablePart]:
    """Every part of ``basename``, checked to form complete sets, in reading order.

    Reading order: saving shards ``0, 1, …``, files in index order within each. The
    single-table layout ``<basename>-…`` is read only when no ``<basename>_<i>-…``
    part exists: beside them it is another table's part (``x`` saved at ``pt/x``
    writes ``pt/x_0-…``, which is also the single-table name of ``pt/x_0``).

    :raises CheckpointNotFoundError: no file of either layout (names the basename).
    :raises CheckpointCorruptError: a saving shard's files disagree on the count, have
        an index beyond it, or miss one (names the files).
    """
    parts = scan_table_parts(basename)
    if not parts:
        raise CheckpointNotFoundError(
            f"no table files for {basename}: expected {basename}_<i>-NNNNN-of-NNNNN or "
            f"{basename}-NNNNN-of-NNNNN"
        )
    groups: dict[int | None, list[TablePart]] = {}
    for part in parts:
        groups.setdefault(part.saving_shard, []).append(part)
    if len(groups) > 1:
        # ``<basename>-…`` beside ``<basename>_<i>-…`` is another table's shard part
        # (table ``x`` saved at ``x`` writes ``x_0-…``, the single-table layout of
        # ``x_0``): the saving-shard layout is this basename's own.
        groups.pop(None, None)
    ordered: list[TablePart] = []
    for shard in sorted(groups, key=lambda s: -1 if s is None else s):
        group = groups[shard]
        counts = sorted({p.count for p in group})
        if len(counts) > 1:
            listed = ", ".join(sorted(p.path for p in group))
            raise CheckpointCorruptError(
                f"table files of {basename} from one saving shard disagree on the file "
                f"count ({', '.join(map(str, counts))}): {listed}"
            )
        (count,) = counts
        by_index = {p.index: p for p in group}
        beyond = sorted(p.path for p in group if p.index >= count)
        if beyond:
            raise CheckpointCorruptError(f"{beyond[0]}: part index is not below {count}")
        missing = [part_name(basename, shard, i, count) for i in range(count) if i not in by_index]
        if missing:
            raise CheckpointCorruptError(
                f"table checkpoint {basename} is incomplete: missing {', '.join(missing)}"
            )
        ordered.extend(by_index[i] for i in range(count))
    return ordered


def restore_table(
    table: EmbeddingHashTable,
    basename: str,
    *,
    shard_index: int,
    num_shards: int,
    validate_only: bool = False,
    root: DataRoot = UNCONFINED,
) -> RestoreResult:
    """Replace the table's entries with this shard's entries of ``basename``, all or nothing.

    Keeps the records with ``floormod(id, num_shards) == shard_index`` from every part
    (any saving layout and shard count); with ``skip_zero_embedding`` records whose
    values are all zero are skipped. Optimizer state and timestamps are restored as
    written; the clock becomes ``max(clock, newest loaded timestamp)``. SERVING tables
    take the values only (their optimizer dumps are parsed and dropped).

    When ``basename`` names Monolith multi-hash-table files (``<basename>.meta-…`` beside
    SNAPPY data files, or those of every PS ``<basename>_<i>`` / ``<basename><i>`` for
    a basename ending in ``_``), the records of the sub-table named like the table are
    read from them instead (:mod:`ps_server.checkpoint.monolith_multi`); every file is
    checked first.

    :param validate_only: only run the checking pass; the table is not touched.
    :raises InvalidArgumentError: bad ``shard_index``/``num_shards``.
    :raises CheckpointNotFoundError: no file for ``basename``.
    :raises CheckpointCorruptError: incomplete file set, bad CRC, truncated or
        unparsable record (names the file and the record's byte offset or position).
    :raises ConfigMismatchError: a record holds more values than the table's dim or
        optimizer state the table's segments do not have (names the file); no meta
        file of a multi-table basename names the table.
    :raises PathOutsideRootError: a part file resolves outside ``root`` (nothing read).
    """
    _check_shard(shard_index, num_shards)
    root.check(basename, "table files")
    multi = MultiTableCheckpoint.of_basename(basename, root)
    if multi is not None:
        # Monolith's multi-hash-table files: this table's records in each of them.
        found = multi.parts([table.name])
        if found is None:
            raise ConfigMismatchError(
                f"table {table.name!r} has no entries in multi-table checkpoint {basename}: "
                f"its meta files name {', '.join(map(repr, multi.table_names()))}"
            )
        paths: list[str] = found
    else:
        paths = [p.path for p in list_table_parts(basename)]
    root.check_all(paths, "table part")
    if not validate_only and table.size() == 0:
        # Nothing to protect: one pass, emptied again if anything fails.
        entries = load_into_empty_table(
            table, paths, shard_index=shard_index, num_shards=num_shards
        )
        return RestoreResult(paths, entries)
    kept = validate_table_files(table, paths, shard_index=shard_index, num_shards=num_shards)
    if validate_only:
        return RestoreResult(paths, kept)
    entries = load_table_files(
        table, paths, shard_index=shard_index, num_shards=num_shards, expected=kept
    )
    return RestoreResult(paths, entries)


def validate_table_files(
    table: EmbeddingHashTable, paths: Sequence[str], *, shard_index: int, num_shards: int
) -> int:
    """The checking pass of a restore: check every record, change nothing.

    Checks what loading would (CRCs, framing, every record's encoding, dims and
    optimizer dumps) without building the records' columns. For callers that check
    several tables before loading any (checkpoint restore). Files are checked on up
    to :data:`RESTORE_THREADS` threads; the error reported is that of the first
    damaged file in ``paths`` order.

    :returns: how many records this shard would load.
    :raises: as :func:`restore_table`.
    """
    _check_shard(shard_index, num_shards)
    need_values = bool(table.config.skip_zero_embedding)

    def count(path: str) -> int:
        kept = 0
        for ids, entries in _file_chunks(table, path, columns=need_values):
            keep = _in_shard(ids, shard_index, num_shards)
            if entries is not None:
                keep &= _nonzero_values(entries.values)
            kept += int(np.count_nonzero(keep))
        return kept

    workers = min(RESTORE_THREADS, len(paths))
    if workers <= 1:
        return sum(count(path) for path in paths)
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-check") as pool:
        futures = [pool.submit(count, path) for path in paths]
        try:
            return sum(f.result() for f in futures)
        finally:
            for f in futures:
                f.cancel()


def load_table_files(
    table: EmbeddingHashTable,
    paths: Sequence[str],
    *,
    shard_index: int,
    num_shards: int,
    expected: int | None = None,
) -> int:
    """The loading pass of a restore: clear the table and load this shard's records.

    Call it only after :func:`validate_table_files` passed on the same files: an error
    here (a file changed in between, an I/O error) leaves the table partly loaded.
    Reading, decoding and picking this shard's records run on a helper thread, one
    chunk ahead; the table is written by the calling thread only, in file order.

    :param expected: the number of records to load if known (what
        :func:`validate_table_files` returned); storage is sized for it up front.
        Otherwise it is estimated from the file sizes.
    :returns: the table's size afterwards.
    """
    _check_shard(shard_index, num_shards)
    table.clear()
    table.reserve(expected if expected is not None else _estimate(table, paths, num_shards))
    for cols, num_lengths in _prefetched(_loadable(table, paths, shard_index, num_shards)):
        table.upsert_columns(cols, num_lengths)
    return table.size()


def load_into_empty_table(
    table: EmbeddingHashTable, paths: Sequence[str], *, shard_index: int, num_shards: int
) -> int:
    """Checking and loading in one pass, for a table with no entries.

    On any error the table is emptied again and its clock put back, which is exactly
    the state it had, so the restore is still all or nothing.

    :returns: the table's size afterwards.
    :raises InvalidArgumentError: the table is not empty.
    :raises: as :func:`restore_table`.
    """
    if table.size():
        raise InvalidArgumentError(
            f"table {table.name!r} holds {table.size()} entries; a one-pass load needs "
            "an empty table"
        )
    clock = table.max_update_ts
    try:
        return load_table_files(table, paths, shard_index=shard_index, num_shards=num_shards)
    except BaseException:
        table.clear()
        table.max_update_ts = clock
        raise


_T = TypeVar("_T")
_DONE = object()


def _prefetched(items: Iterator[_T], depth: int = 1) -> Iterator[_T]:
    """Iterate ``items`` on a helper thread, at most ``depth`` items ahead.

    Exceptions of the producer are re-raised here, in order; if the consumer stops
    early the producer is stopped at its next item.
    """
    slots: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer
            put((None, e))

    thread = threading.Thread(target=produce, name="ckpt-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield cast(_T, item)
    finally:
        stop.set()
        thread.join()


def _check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InvalidArgumentError(
            f"restore needs 0 <= shard_index < num_shards, got {shard_index} of {num_shards}"
        )


def _estimate(table: EmbeddingHashTable, paths: Sequence[str], num_shards: int) -> int:
    """About how many records of ``paths`` this shard keeps, from the files' sizes.

    Each file is taken to hold records as long as its first one, but no shorter than
    a record of the table's own with its values only (so a short foreign first
    record cannot inflate the estimate), and floormod to spread ids evenly (plus
    three standard deviations, so a slightly uneven spread does not regrow storage).
    """
    least = table.dim * (len(b"\x15") + 4) + len(b"\x1a\x00\x20\x00")
    records = 0
    for path in paths:
        if isinstance(path, MultiTablePart):
            records += path.records
            continue
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
        except OSError:
            continue  # reported by the reading itself
        if len(head) < 8:
            continue
        length = max(int.from_bytes(head, "little"), least)
        records += size // (length + _FRAMING_BYTES)
    if num_shards == 1:
        return records
    mean = records / num_shards
    return min(records, int(mean + 3 * np.sqrt(mean)) + 1)


def _file_chunks(
    table: EmbeddingHashTable, path: str, *, columns: bool
) -> Iterator[tuple[Ids, DecodedEntries | None]]:
    """The records of ``path`` chunk by chunk: their ids and, with ``columns``, all of
    them decoded (else only checked); errors name the file."""
    training = None if table.layout.serving else _training_optimizers(table)
    if training is not None and not isinstance(path, MultiTablePart):
        yield from _framed_file_chunks(table, path, training, columns=columns)
        return
    framed = (
        path.framed(READ_CHUNK_BYTES) if isinstance(path, MultiTablePart)
        else read_framed_runs(path, READ_CHUNK_BYTES)
    )
    yield from _decoded_chunks(table, path, framed, training, columns=columns)


def _framed_file_chunks(
    table: EmbeddingHashTable, path: str, training: list[Optimizer], *, columns: bool
) -> Iterator[tuple[Ids, DecodedEntries | None]]:
    """:func:`_file_chunks` of a table file for a TRAINING table: records are decoded
    in their frames where :func:`decode_framed_entry_dumps` can; any other chunk is
    copied out of its frames and decoded (and its errors reported) as before."""
    first = 0
    templates: dict[int, Any] = {}  # record layouts seen in this file, by length
    for buf, runs in read_framed_chunks(path, READ_CHUNK_BYTES):
        n = sum(count for _, _, count in runs)
        got = decode_framed_entry_dumps(buf, runs, FRAME_MARGINS, training, table.dim,
                                        columns=columns, templates=templates)
        if got is None:
            # Decoded (and any error reported) from a copy, before the next read.
            yield from _decoded_chunks(table, path, iter([run_payloads(buf, runs)]), training,
                                       columns=columns, first=first)
        else:
            yield got
        first += n


def _decoded_chunks(
    table: EmbeddingHashTable,
    path: str,
    framed: Iterator[tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]],
    training: list[Optimizer] | None,
    *,
    columns: bool,
    first: int = 0,
) -> Iterator[tuple[Ids, DecodedEntries | None]]:
    """The chunks ``framed`` (record data and offsets) of ``path`` decoded (or, without
    ``columns``, checked); errors name the file and the records (``first`` is the
    position of the first record of ``framed`` in the file)."""
    for buffer, offsets in framed:
        n = offsets.shape[0] - 1
        where = f"{path}: records {first}..{first + n - 1}"
        entries = None
        try:
            if training is None:
                optimizers = _serving_optimizers(table, buffer, offsets)
            else:
                optimizers = training
            if columns:
                entries = decode_entry_dumps(buffer, offsets, optimizers, table.dim)
                ids = entries.ids
            else:
                ids = check_entry_dumps(buffer, offsets, optimizers, table.dim)
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(f"{where}: {e}") from e
        except (ConfigMismatchError, ConfigError) as e:
            raise ConfigMismatchError(f"{where} do not fit table {table.name!r}: {e}") from e
        del buffer, offsets
        yield ids, entries
        first += n


def _serving_optimizers(
    table: EmbeddingHashTable, buffer: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64]
) -> list[Optimizer]:
    """Stand-in optimizers to decode a chunk into a SERVING table, whose entries have none.

    Saved records carry the trainer's optimizer dumps; the first record of the chunk
    tells which, and the decoder needs matching slots to step over them. Segments past
    the record's dumps get a no-dump optimizer. The state read is discarded.
    """
    first = eht.EntryDump()
    try:
        first.ParseFromString(buffer[offsets[0] : offsets[1]].tobytes())
    except DecodeError as e:
        raise CheckpointCorruptError(f"the first record is not a valid EntryDump: {e}") from e
    dumps = [d.WhichOneof("type") for d in first.opt.dump]
    optimizers = []
    for k, seg in enumerate(table.layout.segments):
        kind = dumps[k] if k < len(dumps) and dumps[k] else "moving_average"
        config = eht.OptimizerConfig()
        getattr(config, kind).SetInParent()
        optimizers.append(optimizer_from_config(config, seg.dim))
    return optimizers


def _in_shard(ids: Ids, shard_index: int, num_shards: int) -> npt.NDArray[np.bool_]:
    """``floormod(ids, num_shards) == shard_index`` (an int64 division only if needed)."""
    if num_shards == 1:
        return np.ones(ids.shape, np.bool_)
    if num_shards & (num_shards - 1) == 0:  # floormod by a power of two is a mask
        keep: npt.NDArray[np.bool_] = (ids & (num_shards - 1)) == shard_index
        return keep
    mod: npt.NDArray[np.bool_] = np.mod(ids, num_shards) == shard_index
    return mod


def _nonzero_values(values: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """skip_zero_embedding's test, as the table applies it: squared norm >= FLT_MIN."""
    sq = np.einsum("ij,ij->i", values, values)
    keep: npt.NDArray[np.bool_] = sq >= _FLT_MIN
    return keep


def _loadable(
    table: EmbeddingHashTable, paths: Sequence[str], shard_index: int, num_shards: int
) -> Iterator[tuple[EntryColumns, npt.NDArray[np.int64]]]:
    """Per chunk of the files, in order: this shard's records as distinct-id columns
    ready for ``upsert_columns`` (of equal ids in a chunk the later record wins)."""
    for path in paths:
        for ids, entries in _file_chunks(table, path, columns=True):
            assert entries is not None
            keep = _in_shard(ids, shard_index, num_shards)
            if table.config.skip_zero_embedding:
                keep &= _nonzero_values(entries.values)
            rows = np.flatnonzero(keep)
            if rows.size:
                yield _distinct(table, entries, rows)


def _distinct(table: EmbeddingHashTable, entries: DecodedEntries, rows: Ids
              ) -> tuple[EntryColumns, npt.NDArray[np.int64]]:
    """Columns of the records ``rows``, keeping the last record of each id."""
    ids = entries.ids[rows]
    if has_duplicates(ids):
        # Keep the last record of each id (files of one table never repeat an id).
        _, last_in_reversed = np.unique(ids[::-1], return_index=True)
        rows = np.sort(rows[rows.size - 1 - last_in_reversed])
        ids = entries.ids[rows]
    whole = rows.size == entries.ids.shape[0]

    def pick(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return a if whole else np.take(a, rows, axis=0)  # whole rows, faster than a[rows]

    if table.layout.serving:
        states: list[State] = [{} for _ in table.layout.segments]
    else:
        states = [{k: pick(a) for k, a in st.items()} for st in entries.states]
    cols = EntryColumns(ids, pick(entries.values), states, pick(entries.timestamps))
    return cols, pick(entries.num_lengths)
