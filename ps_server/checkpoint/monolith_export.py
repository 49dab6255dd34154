"""Export to Monolith: a checkpoint a Monolith job with a given parameter-server count restores.

Our own checkpoints (:mod:`~ps_server.checkpoint.checkpoints`) name table parts
``<P>_<i>-…`` after *our* saving shard ``i`` and carry no TensorFlow ``.index``, so a
Monolith job cannot find or route them. An export rewrites a step in the files a
Monolith job with ``num_ps`` parameter servers writes itself
(docs/monolith-migration.md, "Moving back / exporting to Monolith")::

    <model_dir>/checkpoint                          CheckpointState text naming the step (last)
    <model_dir>/model.ckpt-<N>.index                header-only tensor bundle (101 bytes)
    <model_dir>/model.ckpt-<N>.assets/
      layout "monolith-multi" (native MultiHashTable, CpuTraining's default):
        MonolithMultiHashTable_<s>-%05d-of-%05d       SNAPPY container of EntryDump records
        MonolithMultiHashTable_<s>.meta-%05d-of-%05d  one MultiHashTableMetadata per table
      layout "monolith" (one HashTable per table):
        <P><t>-%05d-of-%05d                           plain TFRecord of EntryDump records

The parameter-server suffix follows Monolith's naming: ``num_ps = 0`` is a
single-process job (CpuTraining's ``num_ps=0``: ``MonolithMultiHashTable_`` with its
trailing ``_``, and ``<P>-…``); ``num_ps = P >= 1`` gives every parameter server ``i``
its own resource (``MonolithMultiHashTable_<i>``, ``<P>_<i>-…``; a fused-layout job
also reads ``_0`` with one process). An entry goes to parameter server
``floormod(id, P)``, as Monolith routes it. ``<P>`` is the table's name with ``:``
and ``/`` made ``-`` (Monolith's ``MonolithHashTable_<md5>`` when the table is named
so); a multi-table's sub-tables are our tables' names, in code-point order, each
one contiguous run of records with a meta record (count 0 included) in every file.

Every one of our shards writes, for every Monolith parameter server, file shard
``<our shard index>`` of ``<our shard count>``: the entries it holds that the
parameter server owns (any split into disjoint files is valid for Monolith's
restore, which upserts every record). Expired entries are left out as a save leaves
them out (each table's own clock and ``slot_expire_time_config``); records are
``EntryDump`` exactly as Monolith writes them (the batched codec of
:mod:`~ps_server.checkpoint.entry_dump`). Each file is written under
``<name>-tmp-<random>``, fsynced and renamed; a multi-table data file is renamed
before its meta file, as Monolith does. Hash filters are not exported (their cells
are indexed per saving shard and cannot follow the ids to Monolith's parameter
servers): the Monolith job starts with empty filters.

Then one shard runs :func:`commit_export`: it checks that every expected file of
every parameter server is there, exactly one file-shard count per resource
(Monolith refuses a mixed set), writes ``model.ckpt-<N>.index`` and, last, the
``checkpoint`` index naming the step (TensorFlow's ``latest_checkpoint`` needs
both). The ``.index`` is the header-only bundle of the reference (no tensors):
``latest_checkpoint`` and TF tooling accept it, but a Monolith *trainer* that
restores dense variables from the same prefix needs its own dense checkpoint there.

SNAPPY container (data files of the multi-table layout): the TFRecord stream cut
into blocks exactly where TensorFlow's writer cuts it — each record is three pieces
(12-byte header, payload, 4-byte footer) appended to a 262,144-byte buffer; a piece
that does not fit ends the block (compressed as one ``uint32 BE length`` + raw
snappy block), and a piece longer than the buffer is a block of its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import cramjam
import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.checkpoints import (
    INDEX_NAME,
    MANIFEST_NAME,
    CheckpointResult,
    _index_text,
    _model_dir_lock,
    _resolve,
    _write_atomic,
    asset_dir,
    checkpoint_prefix,
    read_checkpoint_index,
)
from ps_server.checkpoint.entry_dump import encode_entry_dumps
from ps_server.checkpoint.table_files import SAVE_CHUNK_ROWS, _training_optimizers
from ps_server.checkpoint.tfrecord import TFRecordWriter, frame_record_runs
from ps_server.engine.expiry import expire_seconds_by_slot, expired_mask
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.names import file_stem
from ps_server.engine.shard import Shard
from ps_server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ServingEntryError,
)
from ps_server.paths import UNCONFINED, DataRoot

__all__ = [
    "HEADER_ONLY_INDEX",
    "LAYOUTS",
    "MAX_NUM_PS",
    "MULTI_TABLE_STEM",
    "SNAPPY_BLOCK_BYTES",
    "SnappyRecordWriter",
    "commit_export",
    "export_shard",
    "resource_stems",
    "snappy_blocks",
]

#: ``AdminExportRequest.layout`` values.
LAYOUT_SINGLE = "monolith"
LAYOUT_MULTI = "monolith-multi"
LAYOUTS = (LAYOUT_SINGLE, LAYOUT_MULTI)
#: Shared-name stem of Monolith's native MultiHashTable (``_`` + PS index, or nothing).
MULTI_TABLE_STEM = "MonolithMultiHashTable_"
#: TensorFlow's SNAPPY output buffer: the largest block a reader can decompress.
SNAPPY_BLOCK_BYTES = 262_144
#: Highest parameter-server count accepted (file names stay readable, the fan-out sane).
MAX_NUM_PS = 1024
#: A tensor bundle with no tensors (reference §9): ``latest_checkpoint`` needs a
#: ``<prefix>.index``; TensorFlow reads this one as "no variables".
HEADER_ONLY_INDEX = bytes.fromhex(
    "00000608011a020801000000000100000000629457f9000000000100000000c0f2a1b0"
    "0000020011000000000100000000ccbf8b5d1608230d" + "00" * 36 + "57fb808b247547db"
)
_HEADER = 12
_FOOTER = 4
_META = ".meta"

Bytes = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]


# ---------------------------------------------------------------------- SNAPPY container


def snappy_blocks(pieces: Sequence[int], limit: int = SNAPPY_BLOCK_BYTES) -> list[int]:
    """End offsets of the blocks TensorFlow's writer cuts a stream of ``pieces`` into.

    :param pieces: each piece's length, in stream order (a record is 3 pieces).
    :returns: the stream offset where each block ends (the last one included).
    """
    ends = np.cumsum(np.asarray(pieces, dtype=np.int64))
    return _cut(ends, 0, limit, final=True)[0]


def _cut(ends: Offsets, start: int, limit: int, *, final: bool) -> tuple[list[int], int]:
    """Blocks over piece ``ends`` (absolute stream offsets) from ``start``; returns the
    block ends and where the unfinished block starts (only complete blocks unless
    ``final``: a block ends when the following piece is known not to fit)."""
    out: list[int] = []
    k = int(np.searchsorted(ends, start, side="right"))  # first piece after start
    n = ends.size
    while k < n:
        j = int(np.searchsorted(ends, start + limit, side="right"))  # pieces [k, j) fit
        if j == k:  # the piece alone is larger than the buffer: a block of its own
            start = int(ends[k])
            out.append(start)
            k += 1
            continue
        if j == n and not final:
            break  # the next piece may still fit
        start = int(ends[j - 1])
        out.append(start)
        k = j
    return out, start


class SnappyRecordWriter:
    """Atomic writer of a TFRecord stream in TensorFlow's SNAPPY container.

    :meth:`write_frames` takes framed records (:func:`frame_record_runs`) with their
    payload lengths; complete blocks are compressed and written as they form, the rest
    waits for the next records or :meth:`close`. The file is written under a temporary
    name, fsynced and renamed by :meth:`close` (:class:`TFRecordWriter` underneath);
    :meth:`abort` removes it. An empty stream is a 0-byte file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = TFRecordWriter(path)
        self._pending = bytearray()
        self._ends = np.zeros(0, np.int64)  # piece ends, relative to _pending
        self.records_written = 0

    def write_frames(self, framed: bytes, lengths: npt.NDArray[np.int64]) -> None:
        """Append records framed back to back; ``lengths[i]`` is record ``i``'s payload."""
        n = lengths.size
        if n == 0:
            return
        base = len(self._pending)
        span = lengths + (_HEADER + _FOOTER)
        starts = base + np.concatenate(([0], np.cumsum(span)[:-1]))
        ends = np.empty(3 * n, np.int64)
        ends[0::3] = starts + _HEADER
        ends[1::3] = starts + _HEADER + lengths
        ends[2::3] = starts + span
        self._pending += framed
        self._ends = np.concatenate((self._ends, ends))
        self.records_written += n
        self._emit(final=False)

    def _emit(self, *, final: bool) -> None:
        blocks, start = _cut(self._ends, 0, SNAPPY_BLOCK_BYTES, final=final)
        if not blocks:
            return
        out = bytearray()
        lo = 0
        with memoryview(self._pending) as view:  # released before the buffer shrinks
            for hi in blocks:
                block = bytes(cramjam.snappy.compress_raw(view[lo:hi]))
                out += len(block).to_bytes(4, "big")
                out += block
                lo = hi
        self._file.write_frames(bytes(out), 0)
        del self._pending[:start]
        self._ends = self._ends[np.searchsorted(self._ends, start, side="right"):] - start

    def close(self) -> None:
        """Compress what is left, make the file durable under its final name."""
        self._emit(final=True)
        self._file.close()

    def abort(self) -> None:
        """Discard the file (its temporary name)."""
        self._file.abort()


# ---------------------------------------------------------------------- names


def check_request(layout: str, num_ps: int) -> None:
    """:raises InvalidArgumentError: an unknown layout or a PS count out of range."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(
            f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}"
        )
    if not 0 <= num_ps <= MAX_NUM_PS:
        raise InvalidArgumentError(
            f"num_ps must be in [0, {MAX_NUM_PS}] (0 = a single-process Monolith job), "
            f"got {num_ps}"
        )


def resource_stems(layout: str, num_ps: int, tables: Sequence[str]) -> list[str]:
    """Every file stem of an export: per parameter server (in order) for the multi
    layout; per table, then per parameter server, for the single-table layout."""
    servers = range(max(1, num_ps))
    if layout == LAYOUT_MULTI:
        return [MULTI_TABLE_STEM + ("" if num_ps == 0 else str(i)) for i in servers]
    return [
        file_stem(t) + ("" if num_ps == 0 else f"_{i}") for t in sorted(tables) for i in servers
    ]


def _data_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index:05d}-of-{count:05d}"


def _meta_name(stem: str, index: int, count: int) -> str:
    return f"{stem}{_META}-{index:05d}-of-{count:05d}"


# ---------------------------------------------------------------------- per shard


def _refuse_own_checkpoint(assets: str) -> None:
    if os.path.exists(os.path.join(assets, MANIFEST_NAME)):
        raise FailedPreconditionError(
            f"{assets} holds a monolith-ps checkpoint ({MANIFEST_NAME}); export into "
            "another model_dir or step, an export would mix its files with that checkpoint's"
        )


def _chunks(table: EmbeddingHashTable, num_ps: int
            ) -> Iterator[tuple[list[int], Bytes, Offsets]]:
    """The table's unexpired entries, encoded, ``SAVE_CHUNK_ROWS`` rows at a time: per
    chunk the records sorted by parameter server and the record index where each
    server's run starts (``max(1, num_ps) + 1`` bounds)."""
    optimizers = _training_optimizers(table)
    clock = table.max_update_ts
    expire_seconds = expire_seconds_by_slot(table.config.slot_expire_time_config)
    servers = max(1, num_ps)
    for start in range(0, table.size(), SAVE_CHUNK_ROWS):
        cols = table.export_columns(start, start + SAVE_CHUNK_ROWS)
        keep = ~expired_mask(cols.ids, cols.timestamps, clock, expire_seconds)
        ps = np.mod(cols.ids, servers)  # floormod: ids < 0 land on [0, servers)
        order = np.flatnonzero(keep)
        order = order[np.argsort(ps[order], kind="stable")]
        if order.size == 0:
            continue
        bounds = np.searchsorted(ps[order], np.arange(servers + 1)).tolist()
        buffer, offsets = encode_entry_dumps(
            cols.values[order],
            [(opt, {name: a[order] for name, a in st.items()})
             for opt, st in zip(optimizers, cols.states, strict=True)],
            cols.timestamps[order],
            cols.ids[order],
        )
        yield bounds, buffer, offsets


def _run(chunk: tuple[list[int], Bytes, Offsets], server: int
         ) -> tuple[bytes, Offsets] | None:
    """Parameter server ``server``'s records of a chunk, framed, and their lengths."""
    bounds, buffer, offsets = chunk
    a, b = bounds[server], bounds[server + 1]
    if a == b:
        return None
    offs = offsets[a : b + 1]
    return frame_record_runs(buffer, offs), np.diff(offs)


def export_shard(
    shard: Shard, model_dir: str, global_step: int, *, layout: str, num_ps: int,
    root: DataRoot = UNCONFINED,
) -> CheckpointResult:
    """Write this shard's files of the export of step ``global_step`` (module doc).

    :raises InvalidArgumentError: unknown ``layout``, ``num_ps`` out of range.
    :raises FailedPreconditionError: the step's assets directory holds a monolith-ps
        checkpoint (its manifest); a table has SERVING entries.
    :raises OSError: a file cannot be written (this shard's files written so far
        stay; nothing is committed).
    :raises PathOutsideRootError: the assets directory resolves outside ``root``.
    """
    check_request(layout, num_ps)
    prefix = checkpoint_prefix(model_dir, global_step)
    assets = asset_dir(prefix)
    root.check(assets, "export directory")
    _refuse_own_checkpoint(assets)
    names = sorted(shard.tables)
    for name in names:
        if shard.tables[name].table.layout.serving:
            raise ServingEntryError(
                f"table {name!r} has SERVING entries; exporting needs TRAINING entries"
            )
    os.makedirs(assets, exist_ok=True)
    root.check(assets, "export directory")
    k, count = shard.shard_index, shard.num_shards
    servers = max(1, num_ps)
    files: list[str] = []
    entries = 0
    if layout == LAYOUT_MULTI:
        stems = resource_stems(layout, num_ps, names)
        data = [SnappyRecordWriter(os.path.join(assets, _data_name(s, k, count))) for s in stems]
        counts: list[list[tuple[str, int]]] = [[] for _ in stems]
        try:
            for name in names:
                written = [0] * servers
                for chunk in _chunks(shard.tables[name].table, num_ps):
                    for i in range(servers):
                        if (run := _run(chunk, i)) is not None:
                            data[i].write_frames(*run)
                            written[i] += run[1].size
                for i in range(servers):
                    counts[i].append((name, written[i]))
                entries += sum(written)
            for i, stem in enumerate(stems):
                data[i].close()
                meta_path = os.path.join(assets, _meta_name(stem, k, count))
                with TFRecordWriter(meta_path) as meta:
                    for name, n in counts[i]:
                        meta.write(eht.MultiHashTableMetadata(
                            table_name=name, num_entries=n).SerializeToString())
                files += [data[i].path, meta_path]
        except BaseException:
            for w in data:
                w.abort()
            raise
        return CheckpointResult(prefix, files, entries, names)
    for name in names:
        stems = resource_stems(layout, num_ps, [name])
        writers = [TFRecordWriter(os.path.join(assets, _data_name(s, k, count)))
                   for s in stems]
        try:
            for chunk in _chunks(shard.tables[name].table, num_ps):
                for i in range(servers):
                    if (run := _run(chunk, i)) is not None:
                        writers[i].write_frames(run[0], run[1].size)
                        entries += run[1].size
            for writer in writers:
                writer.close()
                files.append(writer.path)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
    return CheckpointResult(prefix, files, entries, names)


# ---------------------------------------------------------------------- commit


def _check_complete(assets: str, stems: list[str], count: int, multi: bool) -> list[str]:
    """Every stem has exactly the files ``0 .. count-1`` of ``count`` (and their metas)."""
    try:
        present = set(os.listdir(assets))
    except FileNotFoundError:
        present = set()
    problems: list[str] = []
    files: list[str] = []
    for stem in stems:
        pattern = re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})")
        other = sorted(
            n for n in present if (m := pattern.fullmatch(n)) and int(m.group(2)) != count
        )
        if other:
            problems.append(f"{', '.join(other)} (another file count: a previous export?)")
        for i in range(count):
            want = [_data_name(stem, i, count)] + ([_meta_name(stem, i, count)] if multi else [])
            missing = [w for w in want if w not in present]
            problems += missing
            files += [os.path.join(assets, w) for w in want]
    if problems:
        raise FailedPreconditionError(
            f"export {assets} is not complete, nothing was committed: "
            f"{'; '.join(problems[:8])}{' …' if len(problems) > 8 else ''} — every shard "
            "must export (ExportCheckpoint) before the commit, into a fresh step"
        )
    return files


def commit_export(
    shard: Shard, model_dir: str, global_step: int, *, layout: str, num_ps: int,
    root: DataRoot = UNCONFINED,
) -> CheckpointResult:
    """Check every shard's files, then write ``model.ckpt-<N>.index`` and, last, the
    ``checkpoint`` index naming ``model.ckpt-<N>`` (appended to the paths it lists,
    relative to ``model_dir``).

    :raises FailedPreconditionError: a file of some shard or parameter server is
        missing, or a resource has files of another count; nothing is written.
    :raises OSError: the index files cannot be written.
    :raises PathOutsideRootError: a file resolves outside ``root``.
    """
    check_request(layout, num_ps)
    prefix = checkpoint_prefix(model_dir, global_step)
    assets = asset_dir(prefix)
    root.check(assets, "export directory")
    _refuse_own_checkpoint(assets)
    names = sorted(shard.tables)
    files = _check_complete(assets, resource_stems(layout, num_ps, names), shard.num_shards,
                            layout == LAYOUT_MULTI)
    bundle = root.check(prefix + ".index", "tensor bundle index")
    index_path = root.check(os.path.join(model_dir, INDEX_NAME), "checkpoint index")
    with _model_dir_lock(model_dir, global_step):
        _write_atomic(bundle, HEADER_ONLY_INDEX)
        latest, listed = read_checkpoint_index(model_dir, root=root)
        if latest and latest not in listed:
            listed = [*listed, latest]
        name = os.path.basename(prefix)
        kept = [p for p in listed if _resolve(model_dir, p) != prefix] + [name]
        _write_atomic(index_path, _index_text(name, kept).encode())
    return CheckpointResult(prefix, [*files, bundle, index_path], 0, names)
