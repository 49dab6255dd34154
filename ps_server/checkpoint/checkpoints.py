"""Checkpoint directories: every table and filter of a shard under one step's prefix.

Layout (docs/semantics.md §6.5, docs/api.md "Files")::

    <model_dir>/checkpoint                         TensorFlow CheckpointState text, names the
                                                   highest committed step
    <model_dir>/model.ckpt-<step>.parts-<i>.json   shard i's files: size, records, CRC-32C each
                                                   (until the commit has merged them)
    <model_dir>/model.ckpt-<step>.assets/
        <P>_<i>-%05d-of-%05d                       table parts of shard i (P: name, ':' '/' -> '-')
        hash_filter_<i>-%05d-of-%05d               the filter of shard i
        manifest.json                              what an empty shard needs to rebuild everything

A save is two steps. Every shard runs :func:`save_shard_checkpoint` (its table parts
and its filters' files, each atomic, then ``<prefix>.parts-<i>.json`` with each file's size,
record count and CRC-32C, computed while writing); then one shard runs
:func:`commit_checkpoint`, which merges every shard's part list into ``manifest.json``
(refusing, FAILED_PRECONDITION, when some shards' lists are there and others are
missing, and FAILED_PRECONDITION "nothing was saved at step N" when no shard left one
and no manifest with file lists was committed for the step before) and writes, last,
the ``checkpoint`` index; then the part lists are removed (a repeated commit of a
committed step leaves its manifest as it is, even if tables were created since, and
writes the index again). Until the index is replaced the
previous checkpoint stays the latest, so a crash mid-save loses nothing.

The index lists the kept checkpoints by step, ascending (TensorFlow's order; the step
is parsed from ``model.ckpt-<step>``, other names count as the oldest, in their listed
order), and ``model_checkpoint_path`` is the highest step, whichever committed last.
With ``max_to_keep`` K > 0 the K highest steps are kept and the others deleted whole
(every ``<prefix>.*``, assets included) after the index no longer names them, so the
highest committed checkpoint is never deleted; a commit whose own step would not be
among the K highest is refused (FAILED_PRECONDITION) instead of deleting itself, and
a refused commit deletes nothing. A commit holds an exclusive ``flock`` on the
``model_dir`` directory's own descriptor from reading the part lists to the last
deletion: commits into one directory from several threads or processes of one host
take turns, each reading the index the previous one wrote (no lock file to leave
behind; the kernel releases it when a holder dies).

Filter files: a shard whose tables use exactly one file-saving filter writes it as
``hash_filter_<i>`` (Monolith's name); with several, filter ``F`` is written as
``hash_filter_<P(F)>_<i>``. The manifest records which stem each filter used.

``manifest.json`` (UTF-8 JSON; bytes fields base64)::

    {"format": "monolith-ps-checkpoint", "version": 1, "global_step": 12, "num_shards": 2,
     "tables": {"<name>": {"file_stem": "<P>", "config": "<b64 EmbeddingHashTableConfig>",
                           "hash_filter": "<filter name or ''>",
                           "extra_restore_names": [...], "saver_parallel": -1,
                           "monolith_quirks": true}},   (only when set; absent = false)
     "hash_filters": {"<name>": {"file_stem": "hash_filter", "enable_hash_filter": true,
                                 "filter_type": "sliding_hash_filter",
                                 "occurrence_threshold_config": "<b64>", "capacity": 300000000,
                                 "split_num": 7, "equal_probability": false}}}

``hash_filters`` lists every filter a table uses; ``file_stem`` is null for filters
that write no files (dummy, probabilistic). When part lists were found, the manifest
also has ``"files": {<file name>: {"size", "records", "crc32c"}}``, a ``"files"`` list
per table and filter (reading order: saving shard 0, 1, ...) and ``"manifest_crc32c"``
(CRC-32C of its canonical JSON without that field).

With such a manifest, restore checks the manifest's checksum and then every file it
will read (size, record count, CRC-32C: :func:`~ps_server.checkpoint.tfrecord.file_facts`)
before anything is created or changed, and reads each table from exactly the files
listed for it; the glob of ``<P>_<i>-…`` / ``<P>-…`` serves only manifests without
file lists and Monolith's checkpoints (no manifest).

Restore (:func:`restore_shard_checkpoint`) resolves the prefix and plans every table
of the shard and of the manifest. Tables and filters the shard lacks are created from
the manifest; tables without entries are checked and loaded in one pass; every other
file (tables: all records; filters: metas and cells) is validated before any table
with entries or any filter changes. If anything fails, the tables loaded so far are
emptied again (their clocks put back) and the created tables and filters removed, so
the shard is as it was. Table entries are redistributed to any shard count; filters
are restored only when the checkpoint was written by the same number of shards (a
sliding filter's counts sit in cells indexed by a hash of the id, per saving shard, so
they cannot follow the ids to their new owners). A checkpoint of another shard count
whose filters saved state is refused (FAILED_PRECONDITION naming each such filter,
both shard counts and the opt-in) before anything changes, unless ``reset_filters``:
then the tables are restored and those filters start empty (listed in the result's
``reset_filters``). Filters that save no files (dummy, probabilistic) have nothing to
lose and are never reset. Without a manifest (Monolith's checkpoints) the saving
shard count is the number of distinct ``hash_filter_<i>`` suffixes among the filter
files; with no filter files there is nothing to reset.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint import filter_dump
from ps_server.checkpoint.monolith_multi import MultiTableCheckpoint
from ps_server.checkpoint.table_files import (
    RESTORE_THREADS,
    list_table_parts,
    load_table_files,
    save_table,
    scan_table_parts,
    validate_table_files,
)
from ps_server.checkpoint.tfrecord import FileFacts, file_facts
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.names import FILTER_FILE_STEM, file_stem
from ps_server.engine.shard import FilterOptions, Shard
from ps_server.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from ps_server.paths import UNCONFINED, DataRoot

__all__ = [
    "CHECKPOINT_BASENAME",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "PARTS_PREFIX",
    "CheckpointResult",
    "asset_dir",
    "checkpoint_prefix",
    "commit_checkpoint",
    "file_stem",
    "latest_checkpoint",
    "read_checkpoint_index",
    "restore_shard_checkpoint",
    "save_shard_checkpoint",
]

CHECKPOINT_BASENAME = "model.ckpt"
INDEX_NAME = "checkpoint"
MANIFEST_NAME = "manifest.json"
#: ``<prefix>.parts-<i>.json``: what shard ``i`` wrote for the checkpoint (beside the
#: assets directory, which keeps Monolith's layout plus the manifest; deleted with
#: the checkpoint's other ``<prefix>.*`` files).
PARTS_PREFIX = ".parts-"
_FORMAT = "monolith-ps-checkpoint"
_PARTS_FORMAT = "monolith-ps-checkpoint-parts"
_VERSION = 1
_FILTER_STEM = FILTER_FILE_STEM
_CHECKSUM_KEY = "manifest_crc32c"
_log = logging.getLogger(__name__)
_INDEX_LINE = re.compile(r'\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"\s*')


@dataclass(frozen=True)
class CheckpointResult:
    """Outcome of a checkpoint operation.

    :param prefix: ``<model_dir>/model.ckpt-<step>``; ``""`` when a restore found no
        checkpoint at all.
    :param files: files written, or read/checked.
    :param entries: table entries saved, or held after restore (would hold, when
        validating).
    :param tables: tables saved, or restored (including those created).
    :param reset_filters: a restore with ``reset_filters`` from a checkpoint of another
        shard count: the filters whose saved state was dropped (they start empty);
        validating, those that would be.
    """

    prefix: str
    files: list[str]
    entries: int
    tables: list[str]
    reset_filters: list[str] = field(default_factory=list)


def checkpoint_prefix(model_dir: str, global_step: int) -> str:
    """``<model_dir>/model.ckpt-<global_step>``."""
    return os.path.join(model_dir, f"{CHECKPOINT_BASENAME}-{int(global_step)}")


def asset_dir(prefix: str) -> str:
    """``<prefix>.assets`` (the directory holding a checkpoint's table and filter files)."""
    return prefix + ".assets"


# ---------------------------------------------------------------------- save


def _filter_stems(shard: Shard) -> dict[str, str | None]:
    """Every filter the shard's tables use -> its file stem (None: writes no files)."""
    used = sorted({s.hash_filter for s in shard.tables.values() if s.hash_filter})
    saving = [n for n in used if shard.hash_filter(n).hash_filter.split_num > 0]
    stems: dict[str, str | None] = {n: None for n in used}
    for name in saving:
        stems[name] = _FILTER_STEM if len(saving) == 1 else f"{_FILTER_STEM}_{file_stem(name)}"
    return stems


def save_shard_checkpoint(
    shard: Shard, model_dir: str, global_step: int, *, root: DataRoot = UNCONFINED
) -> CheckpointResult:
    """Write this shard's part of checkpoint ``global_step``: its table parts and filters.

    Each table ``T`` goes to ``<assets>/<P(T)>_<shard_index>-…`` (expired entries left
    out, ``saver_parallel`` files) and each file-saving filter to
    ``<assets>/<stem>_<shard_index>-…``. The checkpoint is not visible until
    :func:`commit_checkpoint`.

    :raises ServingEntryError: a table has SERVING entries.
    :raises OSError: files cannot be written (files already renamed stay; the
        checkpoint is not committed).
    :raises PathOutsideRootError: the assets directory or the part list resolves
        outside ``root`` (a symbolic link; nothing is written).
    """
    prefix = checkpoint_prefix(model_dir, global_step)
    assets = asset_dir(prefix)
    parts_path = root.check(_parts_path(prefix, shard.shard_index), "part list")
    _make_dirs(assets, root)
    files: list[str] = []
    entries = 0
    names = sorted(shard.tables)
    facts: dict[str, FileFacts] = {}
    table_files: dict[str, list[str]] = {}
    filter_files: dict[str, list[str]] = {}
    for name in names:
        slot = shard.tables[name]
        result = save_table(
            slot.table,
            os.path.join(assets, file_stem(name)),
            shard_index=shard.shard_index,
            nshards=slot.saver_parallel,
            root=root,
        )
        files += result.files
        entries += result.entries
        table_files[name] = [os.path.basename(f.path) for f in result.facts]
        facts.update((os.path.basename(f.path), f) for f in result.facts)
    for name, stem in sorted(_filter_stems(shard).items()):
        if stem is not None:
            basename = os.path.join(assets, f"{stem}_{shard.shard_index}")
            written: list[FileFacts] = []
            files += filter_dump.save_filter(
                shard.hash_filter(name).hash_filter, basename, written, root=root
            )
            filter_files[name] = [os.path.basename(f.path) for f in written]
            facts.update((os.path.basename(f.path), f) for f in written)
    parts = {
        "format": _PARTS_FORMAT,
        "version": _VERSION,
        "global_step": int(global_step),
        "shard_index": shard.shard_index,
        "num_shards": shard.num_shards,
        "tables": table_files,
        "hash_filters": filter_files,
        "files": {n: _facts_json(f) for n, f in sorted(facts.items())},
    }
    _write_atomic(parts_path, _json_bytes(parts))
    return CheckpointResult(prefix, files, entries, names)


def _make_dirs(directory: str, root: DataRoot) -> None:
    """``os.makedirs(directory)``, refused before and checked after if it resolves
    outside ``root`` (a symbolic link at any level)."""
    root.check(directory, "checkpoint directory")
    os.makedirs(directory, exist_ok=True)
    root.check(directory, "checkpoint directory")


def _parts_path(prefix: str, shard_index: int) -> str:
    return f"{prefix}{PARTS_PREFIX}{shard_index}.json"


def _facts_json(facts: FileFacts) -> dict[str, int]:
    return {"size": facts.size, "records": facts.records, "crc32c": facts.crc32c}


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _manifest_checksum(manifest: Mapping[str, Any]) -> int:
    """CRC-32C of the manifest's canonical JSON, without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != _CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return int(google_crc32c.value(canonical.encode("ascii")))


def _read_parts(
    prefix: str, shard: Shard, global_step: int, root: DataRoot
) -> list[dict[str, Any]]:
    """Every shard's part list of this checkpoint, checked.

    ``[]`` when no shard left one (nothing was saved at this step through
    :func:`save_shard_checkpoint`): the manifest then lists no files, as before part
    lists existed.

    :raises FailedPreconditionError: some shards' lists are there and others missing
        (a save that did not reach every shard).
    :raises CheckpointCorruptError: a list is unreadable or belongs to another save.
    """
    lists: list[dict[str, Any]] = []
    missing: list[int] = []
    for i in range(shard.num_shards):
        path = root.check(_parts_path(prefix, i), "part list")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            missing.append(i)
            continue
        try:
            parts = json.loads(raw.decode("utf-8"))
            if parts.get("format") != _PARTS_FORMAT:
                raise ValueError("not a monolith-ps part list")
            if (int(parts["shard_index"]), int(parts["num_shards"]),
                    int(parts["global_step"])) != (i, shard.num_shards, int(global_step)):
                raise ValueError(
                    f"it is shard {parts['shard_index']} of {parts['num_shards']}'s list for "
                    f"step {parts['global_step']}, expected shard {i} of {shard.num_shards} "
                    f"for step {global_step}"
                )
            names = _check_file_names(parts["files"])
            for what in ("tables", "hash_filters"):
                for listed in parts[what].values():
                    unknown = set(listed) - names
                    if unknown:
                        raise ValueError(f"{what} name files it has no facts of: {unknown}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorruptError(f"{path}: unreadable part list: {e}") from e
        parts["_source"] = os.path.basename(path)  # for messages; never written
        lists.append(parts)
    if missing and lists:
        raise FailedPreconditionError(
            f"checkpoint {prefix} is incomplete: shard(s) {', '.join(map(str, missing))} of "
            f"{shard.num_shards} did not save their part (no "
            f"{', '.join(os.path.basename(_parts_path(prefix, i)) for i in missing)}); "
            "nothing was committed: save on every shard, then commit"
        )
    return lists


def _committed_with_files(assets: str, root: DataRoot) -> bool:
    """Whether a readable manifest with file lists was committed in ``assets`` (the part
    lists are removed once a commit completes, so a repeated commit finds only it)."""
    try:
        previous = _read_manifest(assets, root)
    except CheckpointCorruptError:
        return False
    return previous is not None and "files" in previous


def _remove_part_lists(prefix: str) -> None:
    """Delete ``<prefix>.parts-<i>.json`` once the manifest holds what they said."""
    pattern = re.compile(re.escape(os.path.basename(prefix) + PARTS_PREFIX) + r"\d+\.json")
    directory = os.path.dirname(prefix) or "."
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if pattern.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _check_file_names(files: Mapping[str, Any]) -> set[str]:
    """The names of a ``files`` map, each a plain file name with integer facts."""
    names = set()
    for name, facts in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise ValueError(f"file name {name!r} is not a plain file name")
        for key in ("size", "records", "crc32c"):
            value = facts[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"file {name!r}: {key} is not a non-negative integer")
        names.add(name)
    return names


def _manifest(shard: Shard, global_step: int, parts: list[dict[str, Any]]) -> dict[str, Any]:
    stems = _filter_stems(shard)
    tables: dict[str, dict[str, Any]] = {
        name: {
            "file_stem": file_stem(name),
            "config": base64.b64encode(slot.config_bytes).decode("ascii"),
            "hash_filter": slot.hash_filter,
            "extra_restore_names": list(slot.extra_restore_names),
            "saver_parallel": slot.saver_parallel,
            # Written only when set, so other tables' declarations stay as before.
            **({"monolith_quirks": True} if slot.table.monolith_quirks else {}),
        }
        for name, slot in sorted(shard.tables.items())
    }
    filters: dict[str, dict[str, Any]] = {}
    for name, stem in sorted(stems.items()):
        options = shard.hash_filter(name).options
        filters[name] = {
            "file_stem": stem,
            "enable_hash_filter": options.enable_hash_filter,
            "filter_type": options.filter_type,
            "occurrence_threshold_config": base64.b64encode(
                options.occurrence_threshold_config
            ).decode("ascii"),
            "capacity": options.capacity,
            "split_num": options.split_num,
            "equal_probability": options.equal_probability,
        }
    manifest: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        "global_step": int(global_step),
        "num_shards": shard.num_shards,
        "tables": tables,
        "hash_filters": filters,
    }
    if not parts:
        return manifest  # no shard saved this step: nothing to list
    for part in parts:
        absent = sorted(set(tables) - set(part["tables"])) + sorted(
            n for n, st in stems.items() if st is not None and n not in part["hash_filters"]
        )
        if absent:
            raise FailedPreconditionError(
                f"shard {part['shard_index']} saved no files for {', '.join(map(repr, absent))} "
                f"at step {global_step} (its {part['_source']} lists none; created after the "
                "save?); nothing was committed: "
                "save again on every shard, then commit"
            )
    files: dict[str, Any] = {}
    for part in parts:  # shard order: each table's files in reading order
        files.update(part["files"])
        for name, decl in tables.items():
            decl.setdefault("files", []).extend(part["tables"].get(name, []))
        for name, decl in filters.items():
            decl.setdefault("files", []).extend(part["hash_filters"].get(name, []))
    manifest["files"] = files
    manifest[_CHECKSUM_KEY] = _manifest_checksum(manifest)
    return manifest


def commit_checkpoint(
    shard: Shard, model_dir: str, global_step: int, max_to_keep: int,
    *, root: DataRoot = UNCONFINED,
) -> CheckpointResult:
    """Make checkpoint ``global_step`` committed: manifest, then the ``checkpoint`` index.

    Run once (on one shard) after every shard's :func:`save_shard_checkpoint`. The
    manifest describes this shard's tables and filters (every shard holds the same
    declarations). The index lists the kept checkpoints by step, ascending, relative
    to ``model_dir``, and names the highest as the latest (whichever committed last);
    with ``max_to_keep > 0`` only the ``max_to_keep`` highest steps are kept, the
    others are dropped from it and then deleted (every ``<prefix>.*``).

    The whole commit holds an exclusive ``flock`` on ``model_dir`` (see
    :func:`_model_dir_lock`), so commits into one directory from several threads or
    processes update the index one after the other, each from what the previous wrote.

    :returns: the prefix, the manifest and index paths, 0 entries, the table names.
    :raises FailedPreconditionError: nothing was saved at this step (no shard's part
        list and no committed manifest with file lists), some shards' part lists are
        missing, or the step is below the ``max_to_keep`` highest committed steps
        (it would be deleted at once); nothing is written or deleted.
    :raises OSError: the manifest or the index cannot be written.
    :raises PathOutsideRootError: a file or directory it would read, write or delete
        (the assets directory, a part list, the manifest, the index, a dropped
        checkpoint's directory) resolves outside ``root``; nothing is written.
    """
    if max_to_keep < 0:
        raise InvalidArgumentError(f"max_to_keep must be >= 0 (0 keeps all), got {max_to_keep}")
    prefix = checkpoint_prefix(model_dir, global_step)
    root.check(model_dir, "model_dir")
    with _model_dir_lock(model_dir, global_step):
        return _commit_locked(shard, model_dir, prefix, int(global_step), max_to_keep, root)


def _commit_locked(
    shard: Shard, model_dir: str, prefix: str, global_step: int, max_to_keep: int,
    root: DataRoot,
) -> CheckpointResult:
    assets = asset_dir(prefix)
    name = os.path.basename(prefix)
    latest, listed = read_checkpoint_index(model_dir, root=root)
    if latest and latest not in listed:
        listed = [*listed, latest]  # an index naming only its latest (TensorFlow allows it)
    kept = _by_step([p for p in listed if _resolve(model_dir, p) != prefix] + [name])
    dropped: list[str] = []
    if max_to_keep and len(kept) > max_to_keep:
        dropped, kept = kept[:-max_to_keep], kept[-max_to_keep:]
    for old in dropped:
        # The index is just a file: what it names is deleted only inside the root.
        root.check(os.path.dirname(_resolve(model_dir, old)) or ".",
                   f"the directory of checkpoint {old!r} (to be deleted)")
    index_path = root.check(os.path.join(model_dir, INDEX_NAME), "checkpoint index")
    manifest_path = root.check(os.path.join(assets, MANIFEST_NAME), "manifest")
    parts = _read_parts(prefix, shard, global_step, root)
    # A repeated commit of a committed step (its answer was lost) keeps that manifest as
    # it is, whatever tables were created since: it only writes the index again.
    if not parts and not _committed_with_files(assets, root):
        raise FailedPreconditionError(
            f"nothing was saved at step {global_step} in {model_dir}: no shard left a part "
            f"list ({os.path.basename(_parts_path(prefix, 0))}, ...) and no checkpoint of "
            "that step with file lists was committed before; nothing was committed: save "
            "on every shard first (SaveCheckpoint), then commit"
        )
    if name in dropped:
        higher = ", ".join(str(_step_of(p)) for p in kept)
        raise FailedPreconditionError(
            f"checkpoint {prefix} is not among the {max_to_keep} highest committed steps "
            f"(kept: {higher}): committing it with max_to_keep={max_to_keep} would delete it "
            "at once; nothing was committed or deleted: commit it with max_to_keep=0 (keep "
            "all) or a larger one, save into another model_dir, or delete the higher "
            "checkpoints first"
        )
    if parts:
        _make_dirs(assets, root)
        _write_atomic(manifest_path, _json_bytes(_manifest(shard, global_step, parts)))

    _write_atomic(index_path, _index_text(kept[-1], kept).encode("utf-8"))
    _remove_part_lists(prefix)
    for old in dropped:
        _delete_checkpoint(_resolve(model_dir, old), root)
    return CheckpointResult(prefix, [manifest_path, index_path], 0, sorted(shard.tables))


_STEP_NAME = re.compile(re.escape(CHECKPOINT_BASENAME) + r"-(\d+)")


def _step_of(path: str) -> int | None:
    """The step of an index entry named ``[...]/model.ckpt-<step>``, else None."""
    match = _STEP_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def _by_step(paths: list[str]) -> list[str]:
    """Index entries by step, ascending (TensorFlow's order, the latest last); entries
    whose name carries no step come first (the oldest), in their listed order."""
    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        position, path = item
        step = _step_of(path)
        return (0, position, 0) if step is None else (1, step, position)

    return [p for _, p in sorted(enumerate(paths), key=key)]


@contextlib.contextmanager
def _model_dir_lock(model_dir: str, global_step: int) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the ``model_dir`` directory itself.

    The lock is on the directory's own file descriptor, so it adds no file to the
    checkpoint directory and is released by the kernel when the holder exits, even
    if it crashes (no stale lock file). ``flock`` serializes threads and processes of
    one machine (each acquisition opens its own descriptor); on filesystems without
    ``flock`` support (some network filesystems) the commit runs unlocked after a
    WARNING. A ``model_dir`` that does not exist has nothing saved in it.

    :raises FailedPreconditionError: ``model_dir`` does not exist.
    """
    try:
        fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise FailedPreconditionError(
            f"nothing was saved at step {global_step} in {model_dir}: the directory does not "
            "exist; nothing was committed: save on every shard first (SaveCheckpoint), "
            "then commit"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _log.warning("cannot lock %s (%s): committing step %d without serializing "
                         "against other commits into it", model_dir, e, global_step)
        yield
    finally:
        os.close(fd)  # releases the lock


def _index_text(latest: str, paths: list[str]) -> str:
    lines = [f"model_checkpoint_path: {_quote(latest)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in paths]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _resolve(model_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(model_dir, path)


def _delete_checkpoint(prefix: str, root: DataRoot) -> None:
    """Remove everything named ``<prefix>.*`` (TF files and the assets directory).

    Its directory must resolve inside ``root``; a symbolic link among the files is
    removed itself, never followed.
    """
    root.check(os.path.dirname(prefix) or ".", "checkpoint directory")
    for path in glob.glob(glob.escape(prefix) + ".*"):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``path`` via a temporary file, fsync, rename, directory fsync."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}-tmp-{secrets.randbits(64):016x}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- index


def read_checkpoint_index(
    model_dir: str, *, root: DataRoot = UNCONFINED
) -> tuple[str | None, list[str]]:
    """``(model_checkpoint_path, all_model_checkpoint_paths)`` as written in the index.

    Paths are as recorded (usually relative to ``model_dir``). No index gives
    ``(None, [])``; unknown fields are ignored.

    :raises CheckpointCorruptError: a line is not ``key: "value"``, or the file is not
        UTF-8 (the message names the file and the line, never quotes its content).
    :raises PathOutsideRootError: the index resolves outside ``root`` (nothing read).
    """
    path = root.check(os.path.join(model_dir, INDEX_NAME), "checkpoint index")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None, []
    except UnicodeDecodeError as e:
        raise CheckpointCorruptError(
            f"{path}: the checkpoint index is not UTF-8 text (byte {e.start})"
        ) from None
    latest: str | None = None
    listed: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _INDEX_LINE.fullmatch(line)
        if match is None:
            if re.fullmatch(r"\s*\w+\s*:\s*[-+0-9.eE]+\s*", line):
                continue  # numeric fields (TF's timestamps)
            raise CheckpointCorruptError(
                f"{path}: line {number} is not `key: \"value\"` (not a TensorFlow "
                "CheckpointState text file)"
            )
        key, value = match.group(1), _unquote(match.group(2))
        if key == "model_checkpoint_path":
            latest = value
        elif key == "all_model_checkpoint_paths":
            listed.append(value)
    return latest, listed


def latest_checkpoint(model_dir: str, *, root: DataRoot = UNCONFINED) -> str | None:
    """The latest checkpoint prefix named by ``<model_dir>/checkpoint``, or None.

    A relative path in the index is taken relative to ``model_dir``.
    """
    latest, _ = read_checkpoint_index(model_dir, root=root)
    if not latest:
        return None
    return _resolve(model_dir, latest)


def _resolve_prefix(model_dir: str, prefix: str | None, root: DataRoot) -> str | None:
    if prefix:
        return prefix if os.path.dirname(prefix) else os.path.join(model_dir, prefix)
    latest = latest_checkpoint(model_dir, root=root)
    if latest is not None:
        return latest
    found = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.assets")))
    dirs = [d for d in found if os.path.isdir(d)]
    if len(dirs) == 1:
        return dirs[0][: -len(".assets")]
    return None


# ---------------------------------------------------------------------- restore


@dataclass
class _TablePlan:
    name: str
    table: EmbeddingHashTable  # the live table, or a stand-in to validate against
    paths: list[str]
    declaration: dict[str, Any] | None  # manifest entry when the table must be created


@dataclass
class _FilterPlan:
    name: str
    options: FilterOptions
    basename: str | None  # None: nothing to restore
    create: bool
    #: saved by another shard count: ``(saving shards, filter type)``; its state cannot
    #: be carried over (reset with ``reset_filters``, else the restore is refused)
    other_layout: tuple[int, str] | None = None


def _read_manifest(assets: str, root: DataRoot) -> dict[str, Any] | None:
    path = root.check(os.path.join(assets, MANIFEST_NAME), "manifest")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
        if manifest.get("format") != _FORMAT or not isinstance(manifest.get("tables"), dict):
            raise ValueError("not a monolith-ps checkpoint manifest")
        if int(manifest.get("version", 0)) > _VERSION:
            raise ValueError(f"version {manifest['version']} is newer than this reader")
        int(manifest["num_shards"])
        if not isinstance(manifest.get("hash_filters"), dict):
            raise ValueError("it has no hash_filters object")
        for name, decl in manifest["tables"].items():
            _check_table_declaration(name, decl)
            if decl["hash_filter"] and decl["hash_filter"] not in manifest["hash_filters"]:
                raise ValueError(
                    f"table {name!r} uses hash filter {decl['hash_filter']!r}, which it "
                    "does not declare"
                )
        for name, decl in manifest.get("hash_filters", {}).items():
            options = _filter_options(decl)
            stem = decl["file_stem"]
            if stem is not None and (not isinstance(stem, str) or stem in (".", "..")
                                     or os.path.basename(stem) != stem):
                raise ValueError("a hash filter's file_stem is not a plain file name")
            # A sliding filter always saves its splits; the others never save anything.
            saves = options.enable_hash_filter and options.filter_type == "sliding_hash_filter"
            if saves != (stem is not None):
                raise ValueError(
                    f"hash filter {name!r} is a {options.filter_type} "
                    f"({'enabled' if options.enable_hash_filter else 'disabled'}) but its "
                    f"file_stem says it saved {'files' if stem is not None else 'none'}"
                )
        if _CHECKSUM_KEY in manifest:
            _check_checksum(manifest)
        if "files" in manifest:
            _check_listing(manifest)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path}: unreadable manifest: {e}") from e
    result: dict[str, Any] = manifest
    return result


def _check_table_declaration(name: Any, decl: Any) -> None:
    """A manifest's table entry has every field, each of its type.

    :raises ValueError, KeyError: a field is missing or of another type (a value of the
        wrong type would otherwise fail deep in the restore, or be taken apart: a string
        read as a list of names is a list of its characters).
    """
    if not isinstance(name, str) or not isinstance(decl, dict):
        raise ValueError(f"table {name!r} is not declared as an object")
    missing = {"config", "hash_filter", "extra_restore_names", "saver_parallel"} - set(decl)
    if missing:
        raise KeyError(f"table {name!r} lacks {', '.join(sorted(missing))}")
    if not isinstance(decl["config"], str):
        raise ValueError(f"table {name!r}: config is not a base64 string")
    base64.b64decode(decl["config"], validate=True)
    if not isinstance(decl["hash_filter"], str):
        raise ValueError(f"table {name!r}: hash_filter is not a string")
    extra = decl["extra_restore_names"]
    if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
        raise ValueError(f"table {name!r}: extra_restore_names is not a list of strings")
    parallel = decl["saver_parallel"]
    if not isinstance(parallel, int) or isinstance(parallel, bool):
        raise ValueError(f"table {name!r}: saver_parallel is not an integer")
    if not isinstance(decl.get("monolith_quirks", False), bool):
        raise ValueError(f"table {name!r}: monolith_quirks is not a boolean")
    stem = decl.get("file_stem")
    if stem is not None and stem != file_stem(name):
        raise ValueError(
            f"table {name!r}: file_stem {stem!r} is not its name's ({file_stem(name)!r})"
        )


def _check_checksum(manifest: dict[str, Any]) -> None:
    """A manifest's own checksum matches its content (checked whenever it has one, so
    a manifest cannot lose its file lists to pass for one written before them)."""
    recorded = manifest[_CHECKSUM_KEY]
    computed = _manifest_checksum(manifest)
    if recorded != computed:
        raise ValueError(
            f"its checksum differs ({_CHECKSUM_KEY} records {recorded!r}, its content has "
            f"{computed}): the manifest was changed or damaged"
        )


def _check_listing(manifest: dict[str, Any]) -> None:
    """A manifest that lists files: it has a checksum, and every listed file has facts."""
    if _CHECKSUM_KEY not in manifest:
        raise ValueError(f"it lists files but has no {_CHECKSUM_KEY}")
    names = _check_file_names(manifest["files"])
    readers: dict[str, str] = {}
    for what in ("tables", "hash_filters"):
        for name, decl in manifest.get(what, {}).items():
            listed = decl.get("files", [])
            if not isinstance(listed, list) or set(listed) - names:
                raise ValueError(f"{what} {name!r} lists files the manifest has no facts of")
            for file in listed:
                if file in readers:
                    raise ValueError(f"{file} is listed by both {readers[file]} and {name!r}")
                readers[file] = repr(name)
    orphans = sorted(names - set(readers))
    if orphans:
        # A file saved for a table or filter the manifest no longer declares.
        raise ValueError(f"no table or filter lists {', '.join(orphans)}")


def _filter_options(decl: dict[str, Any]) -> FilterOptions:
    """A manifest's filter declaration as options, each field of its JSON type.

    :raises ValueError, KeyError, TypeError: a field is missing or of another type (a
        number where a flag belongs, a flag where a number does, would be taken as
        another configuration).
    """
    def field(key: str, kind: type) -> Any:
        value = decl[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"hash filter field {key!r} is not a{'n' if kind is int else ''} "
                             f"{kind.__name__}")
        return value

    return FilterOptions(
        enable_hash_filter=field("enable_hash_filter", bool),
        filter_type=field("filter_type", str),
        occurrence_threshold_config=base64.b64decode(
            field("occurrence_threshold_config", str), validate=True
        ),
        capacity=field("capacity", int),
        split_num=field("split_num", int),
        equal_probability=field("equal_probability", bool),
    )


def _table_paths(
    assets: str, name: str, candidates: list[str], saving_shards: int | None = None,
    root: DataRoot = UNCONFINED,
) -> list[str]:
    """Parts of the first candidate with files (``P_<i>-…`` or ``P-…``, not ``P*``).

    :param saving_shards: the manifest's shard count: parts of every saving shard
        ``0 .. saving_shards - 1`` must be there (a shard whose whole part is gone
        would otherwise be restored as if it had no entries).
    """
    for candidate in candidates:
        basename = os.path.join(assets, file_stem(candidate))
        if scan_table_parts(basename):
            parts = list_table_parts(basename)
            present = {p.saving_shard for p in parts}
            if saving_shards is not None and present != {None}:
                missing = [i for i in range(saving_shards) if i not in present]
                if missing:
                    expected = ", ".join(f"{basename}_{i}-NNNNN-of-NNNNN" for i in missing)
                    raise CheckpointCorruptError(
                        f"table {name!r} in checkpoint {assets} is incomplete: it was saved "
                        f"by {saving_shards} shards but the files of saving shard(s) "
                        f"{', '.join(map(str, missing))} are missing (expected {expected})"
                    )
            paths = [p.path for p in parts]
            root.check_all(paths, "table part")
            return paths
    tried = ", ".join(repr(file_stem(c)) for c in candidates)
    raise ConfigMismatchError(
        f"table {name!r} has no files in checkpoint {assets} (looked for {tried} as "
        "<P>_<i>-NNNNN-of-NNNNN or <P>-NNNNN-of-NNNNN)"
    )


def _plan(
    shard: Shard, manifest: dict[str, Any] | None, assets: str, root: DataRoot
) -> tuple[list[_TablePlan], list[_FilterPlan]]:
    filters: dict[str, _FilterPlan] = {}
    same_layout = manifest is not None and int(manifest["num_shards"]) == shard.num_shards
    if manifest is not None:
        for name, decl in manifest.get("hash_filters", {}).items():
            options = _filter_options(decl)
            stem = decl.get("file_stem")
            basename = (
                os.path.join(assets, f"{stem}_{shard.shard_index}")
                if stem and same_layout
                else None
            )
            other = (
                (int(manifest["num_shards"]), options.filter_type)
                if stem and not same_layout else None
            )
            filters[name] = _FilterPlan(name, options, basename, name not in shard.filters,
                                        other)
    else:
        # A checkpoint without manifest (Monolith's): its one filter file set, if any,
        # belongs to the shard's one file-saving filter. The saving shard count is the
        # number of distinct ``hash_filter_<i>`` suffixes among its files.
        stems = {n: s for n, s in _filter_stems(shard).items() if s is not None}
        basename = os.path.join(assets, f"{_FILTER_STEM}_{shard.shard_index}")
        if len(stems) == 1:
            (name,) = stems
            options = shard.hash_filter(name).options
            saving = _filter_saving_shards(assets)
            if saving and len(saving) != shard.num_shards:
                filters[name] = _FilterPlan(name, options, None, False,
                                            (len(saving), options.filter_type))
            elif _has_files(basename):
                filters[name] = _FilterPlan(name, options, basename, False)

    saving_shards = int(manifest["num_shards"]) if manifest is not None else None
    # Monolith's multi-hash-table files (no manifest): every file checked and indexed now.
    multi = MultiTableCheckpoint.of_assets(assets, root) if manifest is None else None

    def table_paths(name: str, candidates: list[str]) -> list[str]:
        if multi is not None and (parts := multi.parts(candidates)) is not None:
            return parts
        if manifest is None or "files" not in manifest:
            return _table_paths(assets, name, candidates, saving_shards, root)
        return _listed_table_paths(manifest, assets, name, candidates, root)

    tables: list[_TablePlan] = []
    for name in sorted(shard.tables):
        slot = shard.tables[name]
        paths = table_paths(name, [name, *slot.extra_restore_names])
        tables.append(_TablePlan(name, slot.table, paths, None))
    declared = manifest["tables"] if manifest is not None else {}
    for name in sorted(set(declared) - set(shard.tables)):
        decl = declared[name]
        flt = decl["hash_filter"]
        if flt and flt not in shard.filters and flt not in filters:
            raise CheckpointCorruptError(
                f"{assets}/{MANIFEST_NAME}: table {name!r} uses hash filter {flt!r}, which "
                "the manifest does not declare"
            )
        try:
            stand_in = EmbeddingHashTable(
                _parse_config(decl["config"]), hash_filter=None, name=name
            )
        except ConfigError as e:
            raise CheckpointCorruptError(
                f"{assets}/{MANIFEST_NAME}: table {name!r} has an unusable config: {e}"
            ) from e
        paths = table_paths(name, [name, *decl["extra_restore_names"]])
        tables.append(_TablePlan(name, stand_in, paths, decl))
    return tables, list(filters.values())


def _listed_table_paths(
    manifest: dict[str, Any], assets: str, name: str, candidates: list[str], root: DataRoot
) -> list[str]:
    """The files the manifest lists for the first of ``candidates`` it declares."""
    for candidate in candidates:
        decl = manifest["tables"].get(candidate)
        if decl is not None:
            paths = [os.path.join(assets, f) for f in decl.get("files", [])]
            root.check_all(paths, "table part")
            _check_listed_parts_exist(assets, name, file_stem(candidate), paths)
            return paths
    tried = ", ".join(repr(c) for c in candidates)
    raise ConfigMismatchError(
        f"table {name!r} has no files in checkpoint {assets}: its manifest declares no "
        f"table named {tried}"
    )


def _check_listed_parts_exist(assets: str, name: str, stem: str, paths: list[str]) -> None:
    """Refuse (naming the table, the saving shards and the files) when listed parts
    are gone: a saving shard without files would otherwise restore as empty."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return
    pattern = re.compile(re.escape(stem) + r"_(\d+)-\d{5,}-of-\d{5,}")
    shards = sorted({
        m.group(1) if (m := pattern.fullmatch(os.path.basename(p))) else "?" for p in missing
    }, key=lambda x: (len(x), x))
    basename = os.path.join(assets, stem)
    expected = ", ".join(f"{basename}_{i}-NNNNN-of-NNNNN" for i in shards)
    raise CheckpointCorruptError(
        f"table {name!r} in checkpoint {assets} is incomplete: files of saving shard(s) "
        f"{', '.join(shards)} listed in its manifest are missing: "
        f"{', '.join(os.path.basename(p) for p in missing)} (expected {expected})"
    )


def _listed_filter_files(manifest: dict[str, Any], fp: _FilterPlan, root: DataRoot) -> list[str]:
    """This shard's files of filter ``fp`` as the manifest lists them; the files on disk
    under its basename must be exactly these."""
    assert fp.basename is not None
    assets = os.path.dirname(fp.basename)
    start = os.path.basename(fp.basename) + "-"
    listed = sorted(
        os.path.join(assets, f)
        for f in manifest["hash_filters"][fp.name].get("files", [])
        if f.startswith(start)
    )
    try:
        found = sorted(filter_dump.list_filter_files(fp.basename))
    except CheckpointNotFoundError:
        found = []
    if found != listed:
        extra = sorted(set(found) - set(listed))
        absent = sorted(set(listed) - set(found))
        raise CheckpointCorruptError(
            f"hash filter {fp.name!r}: the files of {fp.basename} differ from the manifest"
            + (f"; not listed in it: {', '.join(extra)}" if extra else "")
            + (f"; listed but missing: {', '.join(absent)}" if absent else "")
        )
    root.check_all(listed, "filter file")
    return listed


def _verify_files(manifest: dict[str, Any], paths: list[str]) -> None:
    """Check each file's size, record count and CRC-32C against the manifest.

    Sizes first (a stat each), then every file is read once (on up to
    ``RESTORE_THREADS`` threads); the error reported is that of the first file in
    ``paths`` order that disagrees.

    :raises CheckpointCorruptError: a file is missing or differs (names it and what
        differs).
    """
    facts = manifest["files"]
    unique = list(dict.fromkeys(paths))
    for path in unique:
        expected = facts[os.path.basename(path)]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{path}: listed in the checkpoint's manifest but missing"
            ) from None
        if size != expected["size"]:
            raise _differs(path, f"it has {size} bytes, the manifest records {expected['size']}")

    def check(path: str) -> None:
        expected = facts[os.path.basename(path)]
        try:
            got = file_facts(path)
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{path}: listed in the checkpoint's manifest but missing"
            ) from None
        if got.size != expected["size"]:
            raise _differs(path, f"it has {got.size} bytes, the manifest records "
                                 f"{expected['size']}")
        if got.records != expected["records"]:
            raise _differs(path, f"it holds {got.records} records, the manifest records "
                                 f"{expected['records']}")
        if got.crc32c != expected["crc32c"]:
            raise _differs(path, f"its CRC-32C is {got.crc32c:#010x}, the manifest records "
                                 f"{expected['crc32c']:#010x}")

    workers = min(RESTORE_THREADS, len(unique))
    if workers <= 1:
        for path in unique:
            check(path)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-verify") as pool:
        futures = [pool.submit(check, path) for path in unique]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()


def _differs(path: str, detail: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} does not match the checkpoint's manifest: {detail} (the file was changed, "
        "truncated or replaced after the checkpoint was written); nothing was restored"
    )


def _filter_saving_shards(assets: str) -> set[int]:
    """The shard suffixes ``i`` of Monolith's filter files ``hash_filter_<i>-NNNNN-of-NNNNN``
    in ``assets``."""
    pattern = re.compile(re.escape(_FILTER_STEM) + r"_(\d+)-\d{5}-of-\d{5}")
    try:
        names = os.listdir(assets)
    except FileNotFoundError:
        return set()
    return {int(m.group(1)) for n in names if (m := pattern.fullmatch(n))}


def _check_filter_layout(
    shard: Shard, resolved: str, filters: list[_FilterPlan], reset_filters: bool
) -> list[str]:
    """The filters whose saved state a restore into this shard count drops.

    :raises FailedPreconditionError: there are some and ``reset_filters`` is False
        (nothing changed).
    """
    other = [fp for fp in filters if fp.other_layout is not None]
    if not other or reset_filters:
        return sorted(fp.name for fp in other)
    described = "; ".join(
        f"{fp.name!r} ({fp.other_layout[1]}, saved by {fp.other_layout[0]} shards)"
        for fp in sorted(other, key=lambda f: f.name) if fp.other_layout is not None
    )
    raise FailedPreconditionError(
        f"checkpoint {resolved} holds hash filter state saved by another shard count than "
        f"this cluster's {shard.num_shards}: {described}. A filter's counts are kept in "
        "cells indexed by a hash of the id, per saving shard, so they cannot move to the "
        "ids' new owner shards; nothing was restored: restore with reset_filters "
        "(restore_checkpoint(..., reset_filters=True), ps-admin restore --reset_filters) "
        "to restore the tables and start these filters empty, or restore into "
        "the saving shard count"
    )


def _has_files(basename: str) -> bool:
    directory = os.path.dirname(basename) or "."
    prefix = os.path.basename(basename) + "-"
    try:
        return any(
            n.startswith(prefix) and re.fullmatch(r"\d{5}-of-\d{5}", n[len(prefix) :])
            for n in os.listdir(directory)
        )
    except FileNotFoundError:
        return False


def _parse_config(b64: str) -> eht.EmbeddingHashTableConfig:
    try:
        return eht.EmbeddingHashTableConfig.FromString(base64.b64decode(b64, validate=True))
    except Exception as e:
        raise ConfigError(f"config does not parse: {e}") from e


def restore_shard_checkpoint(
    shard: Shard, model_dir: str, prefix: str | None = None, validate_only: bool = False,
    *, root: DataRoot = UNCONFINED, reset_filters: bool = False,
) -> CheckpointResult:
    """Restore every table and filter of a checkpoint into this shard, all or nothing.

    :param prefix: ``<model_dir>/model.ckpt-<step>`` (a bare ``model.ckpt-<step>`` is
        taken inside ``model_dir``); None or ``""``: the latest in the index, else the
        only ``*.assets`` directory of ``model_dir``, else nothing.
    :param validate_only: check every file (and the manifest) and change nothing.
    :param reset_filters: when the checkpoint was saved by another shard count, restore
        its tables anyway and empty the filters whose state was saved (a live filter's
        state is cleared, a created one starts new); without it such a restore is
        refused. Filters that save no files (dummy, probabilistic) are never reset.
    :returns: the restored prefix (``""`` and nothing else when there is no
        checkpoint), the files read, the entries the shard holds (would hold), the
        tables restored (including those created from the manifest) and the filters
        reset (would be, validating).
    :raises FailedPreconditionError: filter state saved by another shard count and no
        ``reset_filters`` (nothing changes); a Monolith checkpoint into a shard
        without tables.
    :raises CheckpointNotFoundError: the prefix has no assets directory, or filter
        files the manifest promises are missing.
    :raises CheckpointCorruptError: damaged or incomplete files, unreadable manifest.
    :raises ConfigMismatchError: a table has no files under any of its names, or files
        do not fit a table (dims, optimizer state) or a filter (split count, metas).
    :raises PathOutsideRootError: a file or directory it would read (the index, the
        assets directory, the manifest, a part) resolves outside ``root``; nothing is
        read there and nothing changes.
    """
    resolved = _resolve_prefix(model_dir, prefix, root)
    if resolved is None:
        return CheckpointResult("", [], 0, [])
    assets = root.check(asset_dir(resolved), "assets directory")
    if not os.path.isdir(assets):
        raise CheckpointNotFoundError(f"checkpoint {resolved} not found: no directory {assets}")
    manifest = _read_manifest(assets, root)
    if manifest is None and not shard.tables:
        # A Monolith checkpoint has no manifest, so nothing says which tables to
        # build; restoring "nothing" successfully would hide the mistake.
        raise FailedPreconditionError(
            f"{assets} has no {MANIFEST_NAME} (a Monolith checkpoint?) and shard "
            f"{shard.shard_index} has no tables: create the tables first (with the names "
            "their files use, e.g. MonolithHashTable_<merged>), then restore"
        )
    tables, filters = _plan(shard, manifest, assets, root)
    reset = _check_filter_layout(shard, resolved, filters, reset_filters)
    if manifest is not None and "files" in manifest:
        # Every file is checked against the manifest before anything changes.
        listed = [p for tp in tables for p in tp.paths]
        for fp in filters:
            if fp.basename is not None:
                listed += _listed_filter_files(manifest, fp, root)
        _verify_files(manifest, listed)

    names = [tp.name for tp in tables]
    try:
        if validate_only:
            files, entries = _check_all(shard, tables, filters, root)
            return CheckpointResult(resolved, files, entries, names, reset)
        return _restore_all(shard, resolved, tables, filters, root, reset)
    except ConfigError as e:
        # Only the manifest's declarations are built here (a filter the shard lacks):
        # a config they cannot build means the manifest is damaged.
        raise CheckpointCorruptError(
            f"{assets}/{MANIFEST_NAME}: declares a hash filter that cannot be built: {e}"
        ) from e


def _check_filters(shard: Shard, filters: list[_FilterPlan], root: DataRoot) -> list[str]:
    files: list[str] = []
    for fp in filters:
        if fp.basename is None:
            continue
        flt = fp.options.build() if fp.name not in shard.filters else (
            shard.filters[fp.name].hash_filter
        )
        _, paths = filter_dump.read_filter(flt, fp.basename, root=root)
        files += paths
    return files


def _check_all(
    shard: Shard, tables: list[_TablePlan], filters: list[_FilterPlan], root: DataRoot
) -> tuple[list[str], int]:
    """Validate every file against the live (or stand-in) tables and filters."""
    files = _check_filters(shard, filters, root)
    entries = 0
    for tp in tables:
        entries += validate_table_files(
            tp.table, tp.paths, shard_index=shard.shard_index, num_shards=shard.num_shards
        )
        files += tp.paths
    return files, entries


def _restore_all(
    shard: Shard, resolved: str, tables: list[_TablePlan], filters: list[_FilterPlan],
    root: DataRoot, reset: list[str],
) -> CheckpointResult:
    """Create what is missing, check everything, then load; undo everything on failure.

    Tables without entries (new ones included) are checked and loaded in one pass;
    the others are checked first and loaded only when every file passed.
    """
    created_filters: list[str] = []
    created_tables: list[str] = []
    emptied: list[tuple[EmbeddingHashTable, int]] = []  # one-pass tables and their clocks
    try:
        for fp in filters:
            if fp.create:
                shard.create_hash_filter(fp.name, fp.options)
                created_filters.append(fp.name)
        for tp in tables:
            if tp.declaration is not None:
                decl = tp.declaration
                shard.create_table(
                    tp.name,
                    base64.b64decode(decl["config"]),
                    hash_filter=decl["hash_filter"],
                    extra_restore_names=tuple(decl["extra_restore_names"]),
                    saver_parallel=int(decl["saver_parallel"]),
                    monolith_quirks=bool(decl.get("monolith_quirks", False)),
                )
                created_tables.append(tp.name)
        files = _check_filters(shard, filters, root)
        later: list[tuple[EmbeddingHashTable, list[str]]] = []
        for tp in tables:
            table = shard.table(tp.name)
            files += tp.paths
            if table.size() == 0:
                emptied.append((table, table.max_update_ts))
                load_table_files(
                    table, tp.paths, shard_index=shard.shard_index, num_shards=shard.num_shards
                )
            else:
                validate_table_files(
                    table, tp.paths, shard_index=shard.shard_index, num_shards=shard.num_shards
                )
                later.append((table, tp.paths))
        for table, paths in later:
            load_table_files(
                table, paths, shard_index=shard.shard_index, num_shards=shard.num_shards
            )
        for fp in filters:
            if fp.basename is not None:
                filter_dump.restore_filter(
                    shard.hash_filter(fp.name).hash_filter, fp.basename, root=root
                )
        for name in reset:
            if name not in created_filters:  # a created filter is new already
                live = shard.hash_filter(name)
                live.hash_filter.import_splits(live.options.build().export_splits())
    except BaseException:
        for table, clock in emptied:
            table.clear()
            table.max_update_ts = clock
        for name in created_tables:
            shard.tables.pop(name, None)
        for name in created_filters:
            shard.filters.pop(name, None)
        raise
    entries = sum(shard.table(tp.name).size() for tp in tables)
    return CheckpointResult(resolved, files, entries, [tp.name for tp in tables], reset)
