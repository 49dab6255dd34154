"""Table files (docs/semantics.md §6): save/restore, expiry on save, resharding, damage, interop.

Expected values are worked out by hand from the formulas of docs/semantics.md; files from and
for other TFRecord implementations are written/read here with ``struct`` and
``google_crc32c`` directly.
"""

from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint import table_files
from ps_server.checkpoint.entry_dump import lookup_entry
from ps_server.checkpoint.table_files import (
    default_nshards,
    list_table_parts,
    restore_table,
    save_table,
)
from ps_server.checkpoint.tfrecord import (
    frame_record_runs,
    frame_record_runs_array,
    frame_records,
    read_framed,
    read_framed_runs,
)
from ps_server.engine import configs
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.shard import Shard
from ps_server.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigMismatchError,
    InvalidArgumentError,
    ServingEntryError,
)

f32 = np.float32
DAY = 86_400


# ---------------------------------------------------------------- helpers


def sgd_table(dim: int = 2, **kw: object) -> EmbeddingHashTable:
    return EmbeddingHashTable(configs.table_config(dim, **kw))  # type: ignore[arg-type]


def v2(slot: int, sig: int) -> int:
    return (slot << 48) | sig


def masked_crc(data: bytes) -> int:
    c = int(google_crc32c.value(data))
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecords(path: Path, records: list[bytes]) -> None:
    """An independent TFRecord writer: length, masked crc(length), data, masked crc(data)."""
    with open(path, "wb") as f:
        for rec in records:
            length = struct.pack("<Q", len(rec))
            f.write(length + struct.pack("<I", masked_crc(length)))
            f.write(rec + struct.pack("<I", masked_crc(rec)))


def read_tfrecords(path: str) -> list[bytes]:
    """An independent TFRecord reader that checks both CRCs."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (lcrc,) = struct.unpack_from("<I", data, pos + 8)
        assert lcrc == masked_crc(data[pos : pos + 8])
        rec = data[pos + 12 : pos + 12 + length]
        (dcrc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert dcrc == masked_crc(rec)
        out.append(rec)
        pos += 16 + length
    return out


def dump_of(table: EmbeddingHashTable, fid: int) -> eht.EntryDump:
    (raw,) = lookup_entry(table, [fid])
    assert raw, f"id {fid} missing"
    return eht.EntryDump.FromString(raw)


def entries_of(table: EmbeddingHashTable) -> dict[int, bytes]:
    ids = table.export_columns().ids.copy()
    return dict(zip(ids.tolist(), lookup_entry(table, ids), strict=True))


# ---------------------------------------------------------------- round trips


def test_round_trip_assign_add_with_negative_id(tmp_path: Path) -> None:
    table = sgd_table(2)
    table.assign_add([-1, 1], [[1.0, 2.0], [3.0, 4.0]])
    table.assign_add([-1, 1], [[0.5, 0.5], [-1.0, 1.0]])
    # -1: (1 + 0.5, 2 + 0.5); 1: (3 - 1, 4 + 1)
    result = save_table(table, str(tmp_path / "table"), shard_index=None)
    assert result.entries == 2
    assert result.files == [str(tmp_path / "table-00000-of-00001")]
    fresh = sgd_table(2)
    got = restore_table(fresh, str(tmp_path / "table"), shard_index=0, num_shards=1)
    assert got.entries == 2 and got.files == result.files
    np.testing.assert_array_equal(fresh.lookup([-1, 1]), [[1.5, 2.5], [2.0, 5.0]])


def test_save_names_and_file_counts(tmp_path: Path) -> None:
    assert [default_nshards(n) for n in (0, 999_999, 1_000_000, 2_500_000, 9_000_000)] == [
        1, 1, 1, 2, 4,
    ]
    table = sgd_table(1)
    table.assign(np.arange(10), np.arange(10, dtype=f32).reshape(-1, 1))
    result = save_table(table, str(tmp_path / "t"), shard_index=3, nshards=3)
    assert [os.path.basename(p) for p in result.files] == [
        "t_3-00000-of-00003", "t_3-00001-of-00003", "t_3-00002-of-00003",
    ]
    # contiguous row ranges of 10 rows: 3, 3, 4 records
    assert [len(read_tfrecords(p)) for p in result.files] == [3, 3, 4]
    # saving again with another count replaces this shard's old parts
    again = save_table(table, str(tmp_path / "t"), shard_index=3)
    assert sorted(os.listdir(tmp_path)) == ["t_3-00000-of-00001"]
    assert again.entries == 10
    # saver_parallel 0 still writes one file
    assert len(save_table(table, str(tmp_path / "z"), shard_index=0, nshards=0).files) == 1


def test_failed_save_leaves_previous_files_and_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = sgd_table(1)
    table.assign(np.arange(4), np.ones((4, 1), dtype=f32))
    (first,) = save_table(table, str(tmp_path / "t"), shard_index=0).files
    before = Path(first).read_bytes()
    table.assign(np.arange(4), np.full((4, 1), 2.0, dtype=f32))
    calls = []

    def failing(self: object, framed: bytes, count: int) -> None:
        calls.append(count)
        raise OSError("disk full")

    monkeypatch.setattr(table_files.TFRecordWriter, "write_frames", failing)
    with pytest.raises(OSError, match="disk full"):
        save_table(table, str(tmp_path / "t"), shard_index=0, nshards=2)
    assert calls
    assert sorted(os.listdir(tmp_path)) == ["t_0-00000-of-00001"]
    assert Path(first).read_bytes() == before


def test_empty_table_writes_one_empty_file(tmp_path: Path) -> None:
    result = save_table(sgd_table(1), str(tmp_path / "e"), shard_index=0)
    assert result.entries == 0
    assert [os.path.basename(p) for p in result.files] == ["e_0-00000-of-00001"]
    assert os.path.getsize(result.files[0]) == 0
    target = sgd_table(1)
    target.assign([4], [[4.0]])
    assert restore_table(target, str(tmp_path / "e"), shard_index=0, num_shards=1).entries == 0
    assert target.size() == 0


def test_serving_tables_cannot_be_saved(tmp_path: Path) -> None:
    table = EmbeddingHashTable(configs.table_config(1, serving=True))
    with pytest.raises(ServingEntryError):
        save_table(table, str(tmp_path / "s"), shard_index=0)


# ---------------------------------------------------------------- expiry on save


def restore_fresh(tmp_path: Path, dim: int, **kw: object) -> EmbeddingHashTable:
    fresh = sgd_table(dim, **kw)
    restore_table(fresh, str(tmp_path / "t"), shard_index=0, num_shards=1)
    return fresh


def test_eviction_with_assign_add(tmp_path: Path) -> None:
    table = sgd_table(1, expire_days=1)
    clock = 1_000_000
    table.assign_add([1], [[1.0]], req_time=clock - 86_401)  # age 86401 >= 86400: dropped
    table.assign_add([2], [[2.0]], req_time=clock - 86_399)  # age 86399: kept
    table.assign_add([3], [[3.0]], req_time=clock)  # age 0: kept
    result = save_table(table, str(tmp_path / "t"), shard_index=0)
    assert result.entries == 2
    assert table.size() == 3  # the live table is not changed by save
    fresh = restore_fresh(tmp_path, 1, expire_days=1)
    np.testing.assert_array_equal(fresh.lookup([1, 2, 3]), [[0.0], [2.0], [3.0]])
    assert fresh.size() == 2
    assert dump_of(fresh, 2).last_update_ts_sec == clock - 86_399
    assert fresh.max_update_ts == clock


def test_eviction_with_apply_gradients(tmp_path: Path) -> None:
    table = sgd_table(1, expire_days=1)
    clock = 5_000_000
    g = np.array([[1.0]], dtype=f32)
    table.apply_gradients([10], g, [0.5], req_time=clock - 86_401)
    table.apply_gradients([11], g, [0.5], req_time=clock - 86_399)
    table.apply_gradients([12], g, [0.5], req_time=clock)
    save_table(table, str(tmp_path / "t"), shard_index=0)
    fresh = restore_fresh(tmp_path, 1, expire_days=1)
    # sgd from zeros: w = 0 - 0.5 * 1
    np.testing.assert_array_equal(fresh.lookup([10, 11, 12]), [[0.0], [-0.5], [-0.5]])


def test_ttl_zero_drops_everything_even_with_req_time_zero(tmp_path: Path) -> None:
    table = sgd_table(1, expire_days=0)
    table.assign_add([1, 2, 3], [[1.0], [2.0], [3.0]])  # req_time 0, clock 0: age 0 >= 0
    assert save_table(table, str(tmp_path / "t"), shard_index=0).entries == 0
    assert restore_fresh(tmp_path, 1).size() == 0


def test_ttl_not_zero_keeps_everything(tmp_path: Path) -> None:
    table = sgd_table(1, expire_days=3600)
    table.assign_add([1, 2, 3], [[1.0], [2.0], [3.0]])
    assert save_table(table, str(tmp_path / "t"), shard_index=0).entries == 3
    np.testing.assert_array_equal(
        restore_fresh(tmp_path, 1).lookup([1, 2, 3]), [[1.0], [2.0], [3.0]]
    )


def test_ttl_by_slots_survives_a_resave(tmp_path: Path) -> None:
    def config() -> eht.EmbeddingHashTableConfig:
        cfg = configs.table_config(1)
        cfg.slot_expire_time_config.slot_expire_times.add(slot=1, expire_time=0)
        cfg.slot_expire_time_config.slot_expire_times.add(slot=2, expire_time=1)
        return cfg

    slot1, slot2 = [v2(1, 1), v2(1, 2)], [v2(2, 1), v2(2, 2)]
    table = EmbeddingHashTable(config())
    table.assign_add(slot1 + slot2, [[1.0], [2.0], [3.0], [4.0]], req_time=100)
    # clock 100: slot 1 age 0 >= 0 days (dropped); slot 2 age 0 < 86400 (kept)
    assert save_table(table, str(tmp_path / "a"), shard_index=0).entries == 2
    restored = EmbeddingHashTable(config())
    restore_table(restored, str(tmp_path / "a"), shard_index=0, num_shards=1)
    assert restored.max_update_ts == 100
    np.testing.assert_array_equal(restored.lookup(slot1 + slot2), [[0.0], [0.0], [3.0], [4.0]])
    assert save_table(restored, str(tmp_path / "b"), shard_index=0).entries == 2
    again = EmbeddingHashTable(config())
    restore_table(again, str(tmp_path / "b"), shard_index=0, num_shards=1)
    np.testing.assert_array_equal(again.lookup(slot2), [[3.0], [4.0]])


def test_restore_never_expires_and_keeps_a_later_clock(tmp_path: Path) -> None:
    table = sgd_table(1)
    table.assign([1], [[1.0]], req_time=50)
    save_table(table, str(tmp_path / "t"), shard_index=0)
    target = sgd_table(1, expire_days=0)  # would drop everything on save, not on restore
    target.assign([9], [[9.0]], req_time=70)
    restore_table(target, str(tmp_path / "t"), shard_index=0, num_shards=1)
    np.testing.assert_array_equal(target.lookup([1, 9]), [[1.0], [0.0]])
    assert target.max_update_ts == 70  # max(70, 50); clear does not reset the clock


# ---------------------------------------------------------------- resharding


def two_segment_config() -> eht.EmbeddingHashTableConfig:
    return configs.table_config(
        segments=[
            configs.segment(2, configs.adagrad(initial_accumulator_value=1.0)),
            configs.segment(1, eht.OptimizerConfig(adam=eht.AdamOptimizerConfig())),
        ]
    )


def filled_shards(n: int, ids: np.ndarray) -> list[Shard]:
    shards = [Shard(i, n) for i in range(n)]
    for shard in shards:
        shard.create_table("t", two_segment_config())
        mine = ids[np.mod(ids, n) == shard.shard_index]
        table = shard.table("t")
        grads = np.tile(np.array([[1.0, 2.0, 10.0]], dtype=f32), (mine.size, 1))
        table.apply_gradients(mine, grads, [0.1, 0.01], req_time=100)
        later = mine[::2]
        table.apply_gradients(later, grads[: later.size] * 0.5, [0.1, 0.01], req_time=250)
    return shards


def check_resharded(source: list[Shard], target: list[Shard], ids: np.ndarray) -> None:
    n = len(target)
    old = {k: v for s in source for k, v in entries_of(s.table("t")).items()}
    total = 0
    for shard in target:
        held = entries_of(shard.table("t"))
        total += len(held)
        assert all(k % n == shard.shard_index for k in held)
        for fid, raw in held.items():
            assert raw == old[fid]  # values, optimizer state and timestamp, byte for byte
    assert total == len(old) == np.unique(ids).size


def hand_checked_entry(table: EmbeddingHashTable, fid: int) -> None:
    """One step of grads (1, 2 | 10) at lr (0.1 | 0.01), never stepped again."""
    # adagrad, init 1: norm = 1 + g^2 = (2, 5); w = -0.1 * g / sqrt(norm)
    # adam (beta1 .9, beta2 .99, eps .01): m = 10 * .1 = 1, v = 100 * .01 = 1,
    # lr_t = .01 * sqrt(1 - .99) / (1 - .9) = .01, w = -.01 * 1 / (1 + .01)
    np.testing.assert_allclose(
        table.lookup([fid])[0], [-0.07071067, -0.08944272, -0.00990099], rtol=1e-5
    )
    dump = dump_of(table, fid)
    assert list(dump.opt.dump[0].adagrad.norm) == [2.0, 5.0]
    adam = dump.opt.dump[1].adam
    assert adam.m[0] == pytest.approx(1.0, rel=1e-6)
    assert adam.v[0] == pytest.approx(1.0, rel=1e-5)
    assert adam.beta1_power == f32(0.9) * f32(0.9)
    assert adam.beta2_power == f32(0.99) * f32(0.99)
    assert dump.last_update_ts_sec == 100


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1), (3, 4)])
def test_resharding_preserves_every_entry(tmp_path: Path, before: int, after: int) -> None:
    ids = np.array([-7, -3, -2, -1, 0, 1, 2, 5, 8, 11, 13, 1 << 40, -(1 << 50)], dtype=np.int64)
    source = filled_shards(before, ids)
    for shard in source:
        save_table(shard.table("t"), str(tmp_path / "t"), shard_index=shard.shard_index,
                   nshards=2)
    assert len(list_table_parts(str(tmp_path / "t"))) == 2 * before
    target = [Shard(i, after) for i in range(after)]
    for shard in target:
        shard.create_table("t", two_segment_config())
        restore_table(shard.table("t"), str(tmp_path / "t"), shard_index=shard.shard_index,
                      num_shards=after)
    check_resharded(source, target, ids)
    # ids at odd positions of each source shard got the first batch only
    once = [fid for s in source
            for fid in ids[np.mod(ids, before) == s.shard_index][1::2].tolist()]
    fid = once[0]
    hand_checked_entry(target[fid % after].table("t"), fid)
    for shard in target:  # each shard's clock is its newest loaded entry
        ts = shard.table("t").export_columns().timestamps
        assert shard.table("t").max_update_ts == (int(ts.max()) if ts.size else 0)


def test_same_id_twice_in_one_file_later_record_wins(tmp_path: Path) -> None:
    opt = eht.OptimizerDump(dump=[eht.SingleOptimizerDump(sgd=eht.SgdOptimizerDump())])
    records = [
        eht.EntryDump(id=fid, num=[val], opt=opt, last_update_ts_sec=ts).SerializeToString()
        for fid, val, ts in [(5, 1.0, 10), (6, 6.0, 11), (5, 2.0, 12)]
    ]
    write_tfrecords(tmp_path / "d-00000-of-00001", records)
    table = sgd_table(1)
    assert restore_table(table, str(tmp_path / "d"), shard_index=0, num_shards=1).entries == 2
    np.testing.assert_array_equal(table.lookup([5, 6]), [[2.0], [6.0]])
    assert dump_of(table, 5).last_update_ts_sec == 12


def test_same_id_in_two_files_later_file_wins(tmp_path: Path) -> None:
    a, b = sgd_table(1), sgd_table(1)
    a.assign([1, 2], [[1.0], [2.0]])
    b.assign([2, 3], [[20.0], [30.0]])
    save_table(a, str(tmp_path / "t"), shard_index=0)
    save_table(b, str(tmp_path / "t"), shard_index=1)
    target = sgd_table(1)
    restore_table(target, str(tmp_path / "t"), shard_index=0, num_shards=1)
    np.testing.assert_array_equal(target.lookup([1, 2, 3]), [[1.0], [20.0], [30.0]])


def adagrad_table(n: int, dim: int = 4) -> EmbeddingHashTable:
    """n entries (ids 7k - n), the first half stepped at time 0, the rest at 1.7e9."""
    table = EmbeddingHashTable(configs.table_config(dim, optimizer=configs.adagrad()))
    ids = np.arange(n, dtype=np.int64) * 7 - n
    grads = np.linspace(-1, 1, n * dim, dtype=f32).reshape(n, dim)
    half = n // 2
    table.apply_gradients(ids[:half], grads[:half], [0.1], req_time=0)
    table.apply_gradients(ids[half:], grads[half:], [0.1], req_time=1_700_000_000)
    return table


def reserved_bytes(n: int, dim: int = 4) -> int:
    table = EmbeddingHashTable(configs.table_config(dim, optimizer=configs.adagrad()))
    table.reserve(n)
    return table.nbytes()


def test_long_files_restore_fresh_and_in_place(tmp_path: Path) -> None:
    # 3000 records in two files of one length each (timestamps 0 and 1.7e9 have
    # 1- and 5-byte varints): long runs, read through templates.
    source = adagrad_table(3000)
    want = entries_of(source)
    basename = str(tmp_path / "t")
    save_table(source, basename, shard_index=0, nshards=2)
    fresh = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
    assert restore_table(fresh, basename, shard_index=0, num_shards=1).entries == 3000
    assert entries_of(fresh) == want
    assert fresh.max_update_ts == 1_700_000_000
    # Storage was sized once from the file sizes (each file's records are uniform).
    assert fresh.nbytes() == reserved_bytes(3000)
    # In place: a live table holding other ids and other values for some of ours.
    live = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
    live.assign([-3000, 5, 6], np.full((3, 4), 9.0, dtype=f32), req_time=3)
    assert restore_table(live, basename, shard_index=1, num_shards=3).entries == 1000
    assert entries_of(live) == {k: v for k, v in want.items() if k % 3 == 1}
    assert 5 not in entries_of(live)  # 5 % 3 == 2, and it is not in the files


def test_fresh_restore_of_one_shard_sizes_storage_for_its_share(tmp_path: Path) -> None:
    source = adagrad_table(3000)
    save_table(source, str(tmp_path / "t"), shard_index=0, nshards=2)  # uniform files
    target = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
    got = restore_table(target, str(tmp_path / "t"), shard_index=2, num_shards=3)
    assert got.entries == 1000  # ids 7k - 3000: k % 3 == 2 for a third of them
    # estimate: mean 3000 / 3 = 1000 plus 3 * sqrt(1000) = 94.87 -> 1094, +1
    assert target.nbytes() == reserved_bytes(1095)


def test_estimate_is_not_fooled_by_a_short_first_record(tmp_path: Path) -> None:
    opt = eht.OptimizerDump(dump=[eht.SingleOptimizerDump(sgd=eht.SgdOptimizerDump())])
    record = eht.EntryDump(id=1, num=[1.0, 2.0], opt=opt, last_update_ts_sec=0)
    raw = record.SerializeToString()
    assert len(raw) == 9 + 2 * 5 + 6 + 2  # id, num, 1a 04 0a 02 12 00, 20 00
    write_tfrecords(tmp_path / "e-00000-of-00001", [b""] + [raw] * 99)
    size = 16 + 99 * (27 + 16)
    # the empty first record counts as the shortest record of a dim-2 table:
    # 2 * 5 bytes of num + 1a 00 + 20 00 = 14 bytes, 30 framed
    paths = [str(tmp_path / "e-00000-of-00001")]
    assert table_files._estimate(sgd_table(2), paths, 1) == size // 30 == 142
    write_tfrecords(tmp_path / "u-00000-of-00001", [raw] * 99)
    paths = [str(tmp_path / "u-00000-of-00001")]
    assert table_files._estimate(sgd_table(2), paths, 1) == 99


def test_check_pass_finds_a_bad_record_in_a_long_run(tmp_path: Path) -> None:
    source = adagrad_table(600)
    (path,) = save_table(source, str(tmp_path / "t"), shard_index=0).files
    records = read_tfrecords(path)
    table = EmbeddingHashTable(configs.table_config(4, optimizer=configs.adagrad()))
    table.assign([100, 101], np.ones((2, 4), dtype=f32))
    assert restore_table(table, str(tmp_path / "t"), shard_index=0, num_shards=1,
                         validate_only=True).entries == 600
    # Record 450 gets a fifth value (a record written for a wider table).
    wide = eht.EntryDump.FromString(records[450])
    wide.num.append(1.0)
    records[450] = wide.SerializeToString()
    write_tfrecords(Path(path), records)
    with pytest.raises(ConfigMismatchError, match="record 450 has 5 values"):
        restore_table(table, str(tmp_path / "t"), shard_index=0, num_shards=1)
    np.testing.assert_array_equal(table.lookup([100, 101]), np.ones((2, 4)))
    assert table.size() == 2


# ---------------------------------------------------------------- validation


def saved_three_files(tmp_path: Path) -> tuple[str, list[str]]:
    table = sgd_table(2)
    table.assign(np.arange(30), np.ones((30, 2), dtype=f32))
    return str(tmp_path / "t"), save_table(table, str(tmp_path / "t"), shard_index=0,
                                           nshards=3).files


def live_table() -> EmbeddingHashTable:
    table = sgd_table(2)
    table.assign([100, 101], [[7.0, 7.0], [8.0, 8.0]], req_time=5)
    return table


def assert_untouched(table: EmbeddingHashTable) -> None:
    assert table.size() == 2
    np.testing.assert_array_equal(table.lookup([100, 101]), [[7.0, 7.0], [8.0, 8.0]])


def test_truncated_file_fails_naming_it(tmp_path: Path) -> None:
    basename, files = saved_three_files(tmp_path)
    with open(files[2], "r+b") as f:
        f.truncate(os.path.getsize(files[2]) - 3)
    table = live_table()
    with pytest.raises(CheckpointCorruptError, match="truncated") as err:
        restore_table(table, basename, shard_index=0, num_shards=1)
    assert files[2] in str(err.value)
    assert_untouched(table)


def test_failed_restore_into_an_empty_table_leaves_it_empty(tmp_path: Path) -> None:
    basename, files = saved_three_files(tmp_path)
    with open(files[2], "r+b") as f:  # the first two files load before the damage shows
        f.truncate(os.path.getsize(files[2]) - 1)
    table = sgd_table(2)
    table.assign([1], [[1.0, 1.0]], req_time=33)
    table.keep_rows(np.zeros(1, dtype=bool))
    assert (table.size(), table.max_update_ts) == (0, 33)
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        restore_table(table, basename, shard_index=0, num_shards=1)
    assert (table.size(), table.max_update_ts) == (0, 33)


def test_flipped_byte_fails_naming_it(tmp_path: Path) -> None:
    basename, files = saved_three_files(tmp_path)
    data = bytearray(Path(files[1]).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(files[1]).write_bytes(bytes(data))
    table = live_table()
    with pytest.raises(CheckpointCorruptError, match="CRC") as err:
        restore_table(table, basename, shard_index=0, num_shards=1)
    assert files[1] in str(err.value)
    assert_untouched(table)


def test_missing_split_fails_naming_it(tmp_path: Path) -> None:
    basename, files = saved_three_files(tmp_path)
    os.unlink(files[1])
    table = live_table()
    with pytest.raises(CheckpointCorruptError, match="missing") as err:
        restore_table(table, basename, shard_index=0, num_shards=1)
    assert files[1] in str(err.value)
    assert_untouched(table)


def test_records_wider_than_the_table_fail(tmp_path: Path) -> None:
    wide = sgd_table(3)
    wide.assign([1], [[1.0, 2.0, 3.0]])
    save_table(wide, str(tmp_path / "w"), shard_index=0)
    table = live_table()
    with pytest.raises(ConfigMismatchError, match="w_0-00000-of-00001"):
        restore_table(table, str(tmp_path / "w"), shard_index=0, num_shards=1)
    assert_untouched(table)


def test_not_found_and_junk_names(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nothing"):
        restore_table(sgd_table(1), str(tmp_path / "nothing"), shard_index=0, num_shards=1)
    with pytest.raises(CheckpointNotFoundError):
        restore_table(sgd_table(1), str(tmp_path / "no_dir" / "t"), shard_index=0, num_shards=1)
    table = sgd_table(1)
    table.assign([1], [[1.0]])
    save_table(table, str(tmp_path / "t"), shard_index=0)
    for junk in ("t_0-00000-of-00001-tmp-1234", "t_x-00000-of-00001", "t_0-0000-of-00001",
                 "tt_0-00000-of-00001", "t_0-00000-of-00001.bak"):
        (tmp_path / junk).write_bytes(b"junk")
    parts = list_table_parts(str(tmp_path / "t"))
    assert [os.path.basename(p.path) for p in parts] == ["t_0-00000-of-00001"]
    target = sgd_table(1)
    assert restore_table(target, str(tmp_path / "t"), shard_index=0, num_shards=1).entries == 1
    (tmp_path / "t_0-00000-of-00002").write_bytes(b"")
    with pytest.raises(CheckpointCorruptError, match="disagree"):
        restore_table(target, str(tmp_path / "t"), shard_index=0, num_shards=1)


def test_validate_only_counts_and_changes_nothing(tmp_path: Path) -> None:
    table = sgd_table(2)
    table.assign(np.arange(-5, 5), np.ones((10, 2), dtype=f32))
    save_table(table, str(tmp_path / "t"), shard_index=0)
    target = live_table()
    # floormod(id, 3) == 1 for -5, -2, 1, 4
    got = restore_table(target, str(tmp_path / "t"), shard_index=1, num_shards=3,
                        validate_only=True)
    assert got.entries == 4
    assert_untouched(target)
    with pytest.raises(InvalidArgumentError):
        restore_table(target, str(tmp_path / "t"), shard_index=3, num_shards=3)


# ---------------------------------------------------------------- interop


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        low, v = v & 0x7F, v >> 7
        out.append(low | (0x80 if v else 0))
        if not v:
            return bytes(out)


def test_reads_records_from_an_independent_writer(tmp_path: Path) -> None:
    sgd_opt = eht.OptimizerDump(dump=[eht.SingleOptimizerDump(sgd=eht.SgdOptimizerDump())])
    plain = eht.EntryDump(id=5, num=[1.5, -2.0], opt=sgd_opt, last_update_ts_sec=77)
    short = eht.EntryDump(id=6, num=[3.0], opt=sgd_opt, last_update_ts_sec=12)
    floats = struct.pack("<2f", 0.25, 4.0)
    packed = (
        b"\x09" + struct.pack("<q", -7)
        + b"\x12" + varint(len(floats)) + floats  # num as a packed field
        + eht.EntryDump(opt=sgd_opt, last_update_ts_sec=90).SerializeToString()
    )
    assert list(eht.EntryDump.FromString(packed).num) == [0.25, 4.0]
    write_tfrecords(tmp_path / "ext-00000-of-00001",
                    [plain.SerializeToString(), packed, short.SerializeToString()])
    table = sgd_table(2)
    got = restore_table(table, str(tmp_path / "ext"), shard_index=0, num_shards=1)
    assert got.entries == 3
    # a record with fewer values overwrites only those (the rest from the zeros initializer)
    np.testing.assert_array_equal(
        table.lookup([5, -7, 6]), [[1.5, -2.0], [0.25, 4.0], [3.0, 0.0]]
    )
    assert dump_of(table, -7).last_update_ts_sec == 90
    assert table.max_update_ts == 90


def test_our_files_parse_with_an_independent_reader(tmp_path: Path) -> None:
    table = EmbeddingHashTable(configs.table_config(2, optimizer=configs.adagrad(0.5)))
    table.apply_gradients([3, -4], [[1.0, 0.0], [0.0, 2.0]], [1.0], req_time=1_700_000_000)
    (path,) = save_table(table, str(tmp_path / "t"), shard_index=2).files
    records = [eht.EntryDump.FromString(r) for r in read_tfrecords(path)]
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == [-4, 3]
    for rec in records:
        for field in ("id", "opt", "last_update_ts_sec"):
            assert rec.HasField(field)
        assert rec.last_update_ts_sec == 1_700_000_000
    # adagrad init .5: norm = .5 + g^2; w = -g / sqrt(norm) (lr 1)
    assert list(by_id[3].opt.dump[0].adagrad.norm) == [1.5, 0.5]
    assert by_id[3].num[0] == pytest.approx(-1 / np.sqrt(1.5), rel=1e-6)
    assert by_id[3].num[1] == 0.0
    assert list(by_id[-4].opt.dump[0].adagrad.norm) == [0.5, 4.5]
    assert by_id[-4].num[1] == pytest.approx(-2 / np.sqrt(4.5), rel=1e-6)


def test_serving_table_restores_values_and_skips_zero_vectors(tmp_path: Path) -> None:
    train = EmbeddingHashTable(configs.table_config(2, optimizer=configs.adagrad()))
    train.assign([1, 2, 3], [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]], req_time=40)
    save_table(train, str(tmp_path / "t"), shard_index=0)
    cfg = configs.table_config(2, serving=True)
    cfg.skip_zero_embedding = True
    serving = EmbeddingHashTable(cfg)
    got = restore_table(serving, str(tmp_path / "t"), shard_index=0, num_shards=1)
    assert got.entries == 2  # id 2 has a zero vector
    np.testing.assert_array_equal(serving.lookup([1, 2, 3]), [[1.0, 2.0], [0, 0], [3.0, 0.0]])


# ---------------------------------------------------------------- bulk framing helpers


def framed_case(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.random.default_rng(seed).integers(0, 256, int(offsets[-1]), dtype=np.uint8)
    return data, offsets


LENGTH_PATTERNS = [
    [40] * 100,  # one long run (bulk CRC check)
    [10] * 3 + [20] * 40 + [0] * 5 + [7],  # a few runs, empty records
    [5, 6] * 30,  # length changes every record
    [7, 8] * 50 + [9] * 40,  # more than 64 runs in a chunk
    [300] * 33 + [301] * 64 + [2] * 31,
]


@pytest.mark.parametrize("lengths", LENGTH_PATTERNS)
def test_run_framing_matches_record_by_record_framing(tmp_path: Path, lengths: list[int]) -> None:
    data, offsets = framed_case(lengths)
    framed = frame_record_runs(data, offsets)
    assert framed == frame_records(data, offsets)
    as_array = frame_record_runs_array(data, offsets)
    assert as_array.dtype == np.uint8 and as_array.tobytes() == framed
    path = tmp_path / "f"
    path.write_bytes(framed)
    want = [data[a:b].tobytes() for a, b in itertools.pairwise(offsets)]
    assert read_tfrecords(str(path)) == want
    for chunk in (12, 100, 1000, 1 << 20):
        got = [
            buf[a:b].tobytes()
            for buf, offs in read_framed_runs(path, chunk)
            for a, b in itertools.pairwise(offs)
        ]
        assert got == want
        assert [o.size - 1 for _, o in read_framed_runs(path, chunk)] == [
            o.size - 1 for _, o in read_framed(path, chunk)
        ]


def test_run_reader_reports_every_damaged_byte_like_the_record_reader(tmp_path: Path) -> None:
    data, offsets = framed_case([24] * 40 + [9] * 3)  # a run long enough for the bulk check
    framed = frame_records(data, offsets)
    path = tmp_path / "g"
    for pos in range(len(framed)):
        damaged = bytearray(framed)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        messages = []
        for reader in (read_framed, read_framed_runs):
            with pytest.raises(CheckpointCorruptError) as err:
                for _ in reader(path):
                    pass
            messages.append(str(err.value))
        assert messages[0] == messages[1], pos
        assert str(path) in messages[1]
    for cut in (1, 4, 13, len(framed) - 5):
        path.write_bytes(framed[:-cut])
        with pytest.raises(CheckpointCorruptError, match="truncated"):
            list(read_framed_runs(path))
