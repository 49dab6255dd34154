"""Decoding table files in their TFRecord frames (no copy of the records) against
decoding the copied-out records: same columns, same ids, and the same errors."""

from __future__ import annotations

import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from ps_server.checkpoint import table_files
from ps_server.checkpoint.entry_dump import (
    check_entry_dumps,
    decode_entry_dumps,
    decode_framed_entry_dumps,
)
from ps_server.checkpoint.table_files import restore_table, save_table
from ps_server.checkpoint.tfrecord import FRAME_MARGINS, read_framed_chunks, run_payloads
from ps_server.engine import configs
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.errors import CheckpointCorruptError


def adagrad_table(n: int, *, seed: int = 3, zero_ts_every: int = 0) -> EmbeddingHashTable:
    table = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(1 << 62), 1 << 62, n, dtype=np.int64)
    table.apply_gradients(ids, rng.standard_normal((n, 4), dtype=np.float32), [0.1],
                          req_time=1_700_000_000)
    if zero_ts_every:
        # Records with timestamp 0 are shorter: runs of one length get short.
        table.assign_add(ids[::zero_ts_every], np.zeros((ids[::zero_ts_every].size, 4),
                                                        np.float32), req_time=0)
    return table


def saved(tmp_path: Path, table: EmbeddingHashTable) -> str:
    (path,) = save_table(table, str(tmp_path / "t"), shard_index=None).files
    return path


def masked_crc(data: bytes) -> int:
    c = int(google_crc32c.value(data))
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records_of(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append(data[pos + 12 : pos + 12 + length])
        pos += 16 + length
    return out


def write_records(path: str, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for rec in records:
            length = struct.pack("<Q", len(rec))
            f.write(length + struct.pack("<I", masked_crc(length)))
            f.write(rec + struct.pack("<I", masked_crc(rec)))


def compare_chunks(table: EmbeddingHashTable, path: str) -> int:
    """Decode every chunk both ways; returns how many chunks were decoded in frames."""
    optimizers = table_files._training_optimizers(table)
    in_frames = 0
    templates: dict[int, object] = {}  # shared across the chunks, as restore does
    for buf, runs in read_framed_chunks(path, 1 << 16):
        payloads, offsets = run_payloads(buf, runs)
        want = decode_entry_dumps(payloads, offsets, optimizers, table.dim)
        got = decode_framed_entry_dumps(buf, runs, FRAME_MARGINS, optimizers, table.dim,
                                        columns=True, templates=templates)
        checked = decode_framed_entry_dumps(buf, runs, FRAME_MARGINS, optimizers, table.dim,
                                            columns=False, templates=templates)
        if got is None:
            assert checked is None
            continue
        in_frames += 1
        assert checked is not None and checked[1] is None
        np.testing.assert_array_equal(checked[0], check_entry_dumps(payloads, offsets,
                                                                    optimizers, table.dim))
        ids, entries = got
        assert entries is not None
        np.testing.assert_array_equal(ids, want.ids)
        np.testing.assert_array_equal(entries.values.view(np.uint32), want.values.view(np.uint32))
        np.testing.assert_array_equal(entries.timestamps, want.timestamps)
        np.testing.assert_array_equal(entries.num_lengths, want.num_lengths)
        np.testing.assert_array_equal(entries.has_state, want.has_state)
        for a, b in zip(entries.states, want.states, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
    return in_frames


def test_uniform_records_decode_in_frames_as_copied(tmp_path: Path) -> None:
    table = adagrad_table(5000)
    assert compare_chunks(table, saved(tmp_path, table)) > 0


def test_mixed_lengths_fall_back_to_copies(tmp_path: Path) -> None:
    table = adagrad_table(5000, zero_ts_every=3)
    compare_chunks(table, saved(tmp_path, table))  # chunks decoded either way agree


def test_templates_kept_between_chunks_follow_layout_changes(tmp_path: Path) -> None:
    """Long runs of one layout, then another (other timestamps, ids and values), then the
    first again: chunks decoded in frames with the templates of earlier chunks agree."""
    table = adagrad_table(3000)
    other = adagrad_table(3000, seed=5)
    other.assign_add(other.export_columns().ids[:1000], np.ones((1000, 4), np.float32),
                     req_time=5)  # a 1-byte timestamp: shorter records
    (tmp_path / "o").mkdir()
    a, b = records_of(saved(tmp_path, table)), records_of(saved(tmp_path / "o", other))
    path = str(tmp_path / "mixed-00000-of-00001")
    write_records(path, a[:1200] + b + a[1200:])
    assert compare_chunks(table, path) > 0


def test_restore_of_mixed_and_uniform_files_matches_the_table(tmp_path: Path) -> None:
    for every in (0, 3, 1000):
        table = adagrad_table(3000, seed=every, zero_ts_every=every)
        base = str(tmp_path / f"t{every}")
        save_table(table, base, shard_index=None)
        fresh = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
        restore_table(fresh, base, shard_index=0, num_shards=1)
        want, got = table.export_columns(), fresh.export_columns()
        order_w, order_g = np.argsort(want.ids), np.argsort(got.ids)
        np.testing.assert_array_equal(want.ids[order_w], got.ids[order_g])
        np.testing.assert_array_equal(want.values[order_w].view(np.uint32),
                                      got.values[order_g].view(np.uint32))
        np.testing.assert_array_equal(want.timestamps[order_w], got.timestamps[order_g])


def test_a_damaged_record_in_a_long_run_is_reported_as_before(tmp_path: Path) -> None:
    """A record with valid CRCs but a broken encoding, in the middle of a run of equal
    lengths: the framed decoder declines and the copied decode names the records."""
    table = adagrad_table(2000)
    path = saved(tmp_path, table)
    records = records_of(path)
    bad = bytearray(records[700])
    bad[0] = 0xFF  # not a valid field tag any more
    records[700] = bytes(bad)
    write_records(path, records)
    optimizers = table_files._training_optimizers(table)
    for buf, runs in read_framed_chunks(path):
        assert decode_framed_entry_dumps(buf, runs, FRAME_MARGINS, optimizers, table.dim,
                                         columns=True) is None
    live = adagrad_table(10, seed=9)
    before = live.export_columns().ids.copy()
    with pytest.raises(CheckpointCorruptError, match=r"t-00000-of-00001: records 0\.\.1999"):
        restore_table(live, str(tmp_path / "t"), shard_index=0, num_shards=1)
    np.testing.assert_array_equal(live.export_columns().ids, before)  # unchanged
