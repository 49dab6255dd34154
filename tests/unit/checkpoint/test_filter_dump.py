"""Filter checkpoint files: Monolith's save/restore tests and damaged checkpoints.

Files are inspected with a hand-written TFRecord reader and the protobuf classes, and
Monolith-shaped files are built by hand, so the format is checked independently of
``ps_server.checkpoint``'s own reader.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint import filter_dump
from ps_server.checkpoint.filter_dump import (
    encode_data_records,
    list_filter_files,
    read_filter,
    restore_filter,
    save_filter,
)
from ps_server.engine.filters import (
    DummyHashFilter,
    ProbabilisticFilter,
    SlidingHashFilter,
)
from ps_server.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigMismatchError,
)


def mask(data: bytes) -> int:
    c = int(google_crc32c.value(data))
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", mask(length)) + record + struct.pack("<I", mask(record))


def hand_read(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append(data[pos + 12 : pos + 12 + length])
        pos += 16 + length
    return out


def metas(paths: list[str]) -> list[eht.HashFilterSplitMetaDump]:
    out = []
    for p in paths:
        meta = eht.HashFilterSplitMetaDump()
        meta.ParseFromString(hand_read(p)[0])
        out.append(meta)
    return out


def thresholds_all(t: int) -> np.ndarray:
    return np.full(1 << 15, t, dtype=np.int64)


def grads_of(mask_: np.ndarray) -> list[list[int]]:
    return [[0, 0] if m else [1, 1] for m in mask_]


def snapshot(f: SlidingHashFilter) -> tuple[bytes, list[int], int, int, int]:
    return (f.cells.tobytes(), f.num_elements.tolist(), f.head, f.head_increment,
            f.failure_count)


def test_worked_example_survives_save_and_restore(tmp_path: Path) -> None:
    """docs/semantics.md §3.3 with a checkpoint after run 2: runs 3 and 4 on the restored filter."""
    f = SlidingHashFilter(100, 7, thresholds_all(3))
    ids = [1, 3 << 17, 1]
    assert grads_of(f.should_be_filtered(ids, with_table=False)) == [[0, 0]] * 3
    assert grads_of(f.should_be_filtered(ids, with_table=False)) == [[0, 0], [0, 0], [1, 1]]
    base = str(tmp_path / "model.ckpt-1.assets" / "hash_filter_0")
    paths = save_filter(f, base)
    assert sorted(os.listdir(tmp_path / "model.ckpt-1.assets")) == [
        f"hash_filter_0-{i:05d}-of-00007" for i in range(7)
    ]
    assert paths == [f"{base}-{i:05d}-of-00007" for i in range(7)]
    g = SlidingHashFilter(100, 7, thresholds_all(3))
    assert restore_filter(g, base) == paths
    assert snapshot(g) == snapshot(f)
    # Counts carried over: id 1 at 4, 3<<17 at 2 -> olds 4, 2, 5 then 6, 3, 7.
    assert grads_of(g.should_be_filtered(ids, with_table=False)) == [[1, 1], [0, 0], [1, 1]]
    assert grads_of(g.should_be_filtered(ids, with_table=False)) == [[1, 1]] * 3


def test_hundred_split_checkpoints(tmp_path: Path) -> None:
    """docs/semantics.md §3.8 multi-filter test: capacity 300, split 100, threshold 2."""
    f = SlidingHashFilter(300, 100, thresholds_all(2))
    ckpt0 = save_filter(f, str(tmp_path / "ckpt0" / "hash_filter_0"))
    assert len(ckpt0) == 100
    for m in metas(ckpt0):
        shared = m.sliding_hash_filter_meta
        assert (m.total_size, m.num_elements) == (3, 0)
        assert (shared.split_num, shared.head, shared.head_increment) == (100, 0, 0)

    ids = [1, 1 << 17, 2 << 17, 1]
    assert grads_of(f.should_be_filtered(ids, with_table=False)) == [[0, 0]] * 4
    assert grads_of(f.should_be_filtered(ids, with_table=False)) == [
        [1, 1], [0, 0], [0, 0], [1, 1],
    ]
    ckpt1 = save_filter(f, str(tmp_path / "ckpt1" / "hash_filter_0"))
    got = metas(ckpt1)
    assert [m.num_elements for m in got] == [2, 2, 2, 2] + [0] * 96
    assert {(m.sliding_hash_filter_meta.head, m.sliding_hash_filter_meta.head_increment)
            for m in got} == {(4, 4)}

    g = SlidingHashFilter(300, 100, thresholds_all(2))
    restore_filter(g, str(tmp_path / "ckpt1" / "hash_filter_0"))
    # Every id's old count is >= 2 now (1: 4, 1<<17: 2, 2<<17: 2) -> all pass, twice.
    assert grads_of(g.should_be_filtered(ids, with_table=False)) == [[1, 1]] * 4
    assert grads_of(g.should_be_filtered(ids, with_table=False)) == [[1, 1]] * 4

    h = SlidingHashFilter(300, 100, thresholds_all(2))
    restore_filter(h, str(tmp_path / "ckpt0" / "hash_filter_0"))
    assert not h.cells.any() and h.head == 0


def test_file_layout_and_bytes(tmp_path: Path) -> None:
    # capacity 40000, 5 splits: split_capacity 10000, total_size 12000, 12064 cells
    # -> ceil(12064 / 10000) = 2 data records per file.
    f = SlidingHashFilter(40_000, 5, thresholds_all(1))
    f.should_be_filtered(np.arange(3000, dtype=np.int64) * 7919 << 17, with_table=False)
    paths = save_filter(f, str(tmp_path / "hf"))
    for i, path in enumerate(paths):
        records = hand_read(path)
        assert len(records) == 3
        meta = eht.HashFilterSplitMetaDump()
        meta.ParseFromString(records[0])
        for field in ("failure_count", "total_size", "num_elements", "fill_rate"):
            assert meta.HasField(field), field  # written even when 0
        shared = meta.sliding_hash_filter_meta
        for field in ("split_num", "max_forward_step", "max_backward_step", "max_step",
                      "head", "head_increment", "failure_count"):
            assert shared.HasField(field), field
        assert (meta.total_size, meta.fill_rate, meta.num_elements) == (
            12000, 1.2, f.num_elements[i]
        )
        assert (shared.split_num, shared.max_forward_step, shared.max_backward_step,
                shared.max_step) == (5, 2, 3, 16)
        cells = f.cells[i]
        for r, (start, stop) in enumerate([(0, 10000), (10000, 12064)]):
            expected = eht.HashFilterSplitDataDump()
            expected.offset = start  # explicit, so offset 0 is on the wire too
            expected.data.extend(cells[start:stop].tolist())
            assert records[1 + r] == expected.SerializeToString()
        assert records[1][:2] == b"\x08\x00"


def test_encode_matches_protobuf_for_every_varint_width() -> None:
    cells = np.array([0, 1, 127, 128, 300, 16383, 16384, 65535] * 3, dtype=np.uint16)
    buf, offs = encode_data_records(cells, first_cell=2_100_000, per_record=10)
    for r in range(3):
        expected = eht.HashFilterSplitDataDump(offset=2_100_000 + 10 * r)
        expected.data.extend(cells[10 * r : 10 * r + 10].tolist())
        assert buf[offs[r] : offs[r + 1]].tobytes() == expected.SerializeToString()


def write_monolith_split(path: Path, meta: eht.HashFilterSplitMetaDump,
                         data_records: list[bytes]) -> None:
    path.write_bytes(frame(meta.SerializeToString()) + b"".join(frame(d) for d in data_records))


def monolith_meta(f: SlidingHashFilter, head: int = 0) -> eht.HashFilterSplitMetaDump:
    meta = eht.HashFilterSplitMetaDump(total_size=f.total_size, num_elements=1, fill_rate=1.2)
    meta.sliding_hash_filter_meta.CopyFrom(eht.SlidingHashFilterMetaDump(
        split_num=f.split_num, max_forward_step=2, max_backward_step=f.split_num - 2,
        max_step=16, head=head, head_increment=3, failure_count=0,
    ))
    return meta


def test_restores_hand_built_files_in_any_protobuf_layout(tmp_path: Path) -> None:
    f = SlidingHashFilter(300, 5)  # total_size 90, 154 cells per split
    width = f.cells_per_split
    rng = np.random.default_rng(3)
    want = rng.integers(0, 65536, (5, width)).astype(np.uint16)
    for i in range(5):
        cells = want[i].tolist()
        if i == 0:  # Monolith's layout
            records = [eht.HashFilterSplitDataDump(offset=0, data=cells[:100]),
                       eht.HashFilterSplitDataDump(offset=100, data=cells[100:])]
            data = [r.SerializeToString() for r in records]
        elif i == 1:  # offset absent (default 0), then a record further on
            data = [eht.HashFilterSplitDataDump(data=cells[:70]).SerializeToString(),
                    eht.HashFilterSplitDataDump(offset=70, data=cells[70:]).SerializeToString()]
        elif i == 2:  # packed repeated field: tag 0x12, length, varints
            body = b"".join(_varint(v) for v in cells)
            data = [b"\x08\x00\x12" + _varint(len(body)) + body]
        elif i == 3:  # records out of order
            data = [eht.HashFilterSplitDataDump(offset=77, data=cells[77:]).SerializeToString(),
                    eht.HashFilterSplitDataDump(offset=0, data=cells[:77]).SerializeToString()]
        else:  # one record per cell
            data = [eht.HashFilterSplitDataDump(offset=j, data=[c]).SerializeToString()
                    for j, c in enumerate(cells)]
        write_monolith_split(tmp_path / f"hf-{i:05d}-of-00005", monolith_meta(f, head=2), data)
    restore_filter(f, str(tmp_path / "hf"))
    np.testing.assert_array_equal(f.cells, want)
    assert (f.head, f.head_increment) == (2, 3)
    assert f.num_elements.tolist() == [1] * 5


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def test_dummy_and_probabilistic_filters_save_nothing(tmp_path: Path) -> None:
    for flt in (DummyHashFilter(), ProbabilisticFilter(seed=1)):
        assert save_filter(flt, str(tmp_path / "x" / "hash_filter_0")) == []
        assert not (tmp_path / "x").exists()
        assert restore_filter(flt, str(tmp_path / "missing" / "hash_filter_0")) == []


@pytest.fixture
def saved(tmp_path: Path) -> tuple[SlidingHashFilter, list[str], str]:
    f = SlidingHashFilter(3000, 5, thresholds_all(2))
    f.should_be_filtered(np.arange(2000, dtype=np.int64) << 17, with_table=False)
    base = str(tmp_path / "hash_filter_0")
    return f, save_filter(f, base), base


def live_filter() -> SlidingHashFilter:
    g = SlidingHashFilter(3000, 5, thresholds_all(2))
    g.should_be_filtered([5 << 17, 5 << 17, 9], with_table=False)
    return g


def assert_restore_fails(base: str, error: type[Exception], match: str) -> None:
    g = live_filter()
    before = snapshot(g)
    with pytest.raises(error, match=match):
        restore_filter(g, base)
    assert snapshot(g) == before


def test_missing_checkpoint_fails_and_changes_nothing(tmp_path: Path) -> None:
    assert_restore_fails(str(tmp_path / "nope" / "hash_filter_0"), CheckpointNotFoundError,
                         "no valid sharded files")
    (tmp_path / "hash_filter_0-tmp-0123").write_bytes(b"")
    (tmp_path / "hash_filter_0-00000-of-00005-tmp-ab").write_bytes(b"")
    assert_restore_fails(str(tmp_path / "hash_filter_0"), CheckpointNotFoundError,
                         "no valid sharded files")


def test_flipped_byte_fails_and_changes_nothing(saved: tuple[SlidingHashFilter, list[str], str]
                                               ) -> None:
    _, paths, base = saved
    data = bytearray(Path(paths[3]).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(paths[3]).write_bytes(bytes(data))
    assert_restore_fails(base, CheckpointCorruptError, f"{paths[3]}.*bad data CRC")


def test_truncated_file_fails_and_changes_nothing(saved: tuple[SlidingHashFilter, list[str], str]
                                                 ) -> None:
    _, paths, base = saved
    data = Path(paths[4]).read_bytes()
    Path(paths[4]).write_bytes(data[:-7])
    assert_restore_fails(base, CheckpointCorruptError, f"{paths[4]}.*truncated")
    Path(paths[4]).write_bytes(b"")
    assert_restore_fails(base, CheckpointCorruptError, f"{paths[4]}.*empty file")


def test_missing_or_extra_split_fails_and_changes_nothing(
    saved: tuple[SlidingHashFilter, list[str], str]
) -> None:
    f, paths, base = saved
    os.rename(paths[2], paths[2] + ".bak")
    assert_restore_fails(base, CheckpointCorruptError, "missing .*hash_filter_0-00002-of-00005")
    os.rename(paths[2] + ".bak", paths[2])
    Path(base + "-00000-of-00006").write_bytes(Path(paths[0]).read_bytes())
    assert_restore_fails(base, CheckpointCorruptError, "disagree on the shard count")
    os.unlink(base + "-00000-of-00006")
    # Stray names that do not match -NNNNN-of-NNNNN exactly are ignored.
    Path(base + "-00000-of-00005-tmp-00ff").write_bytes(b"junk")
    Path(base + "-0-of-5").write_bytes(b"junk")
    assert list_filter_files(base) == paths
    g = live_filter()
    restore_filter(g, base)
    assert snapshot(g) == snapshot(f)


def test_mismatched_filter_config_fails_and_changes_nothing(
    saved: tuple[SlidingHashFilter, list[str], str], tmp_path: Path
) -> None:
    _, paths, base = saved
    six = SlidingHashFilter(3000, 6)
    with pytest.raises(ConfigMismatchError, match="split_num 6"):
        restore_filter(six, base)
    assert not six.cells.any()
    bigger = SlidingHashFilter(30_000, 5)
    with pytest.raises(ConfigMismatchError, match=f"{paths[0]}.*total_size"):
        restore_filter(bigger, base)
    assert not bigger.cells.any()
    # A meta with Monolith's other probe length in the last file only.
    records = hand_read(paths[4])
    meta = eht.HashFilterSplitMetaDump()
    meta.ParseFromString(records[0])
    meta.sliding_hash_filter_meta.max_step = 64
    Path(paths[4]).write_bytes(frame(meta.SerializeToString()) + b"".join(map(frame, records[1:])))
    assert_restore_fails(base, ConfigMismatchError, f"{paths[4]}.*max_step is 64")


def test_inconsistent_or_invalid_cells_fail(saved: tuple[SlidingHashFilter, list[str], str]
                                           ) -> None:
    _, paths, base = saved
    records = hand_read(paths[1])
    meta = eht.HashFilterSplitMetaDump()
    meta.ParseFromString(records[0])
    meta.sliding_hash_filter_meta.head = 3  # the other files say otherwise
    Path(paths[1]).write_bytes(frame(meta.SerializeToString()) + b"".join(map(frame, records[1:])))
    assert_restore_fails(base, CheckpointCorruptError, "differs")
    meta.sliding_hash_filter_meta.head = 5  # out of range for 5 splits
    Path(paths[1]).write_bytes(frame(meta.SerializeToString()) + b"".join(map(frame, records[1:])))
    assert_restore_fails(base, CheckpointCorruptError, "head 5 is out of range")

    meta.ParseFromString(records[0])
    too_big = eht.HashFilterSplitDataDump(offset=0, data=[70000]).SerializeToString()
    Path(paths[1]).write_bytes(frame(meta.SerializeToString()) + frame(too_big))
    assert_restore_fails(base, CheckpointCorruptError, "exceeds 16 bits")
    # 3000 // 4 = 750 -> total_size 900 -> 964 cells; cells 960..969 overrun.
    beyond = eht.HashFilterSplitDataDump(offset=960, data=[1] * 10).SerializeToString()
    Path(paths[1]).write_bytes(frame(meta.SerializeToString()) + frame(beyond))
    assert_restore_fails(base, CheckpointCorruptError, "beyond the split")
    Path(paths[1]).write_bytes(frame(meta.SerializeToString()) + frame(b"\x12\xff"))
    assert_restore_fails(base, CheckpointCorruptError, "does not parse")


def test_validate_only_and_read_filter_change_nothing(
    saved: tuple[SlidingHashFilter, list[str], str]
) -> None:
    f, paths, base = saved
    g = live_filter()
    before = snapshot(g)
    assert restore_filter(g, base, validate_only=True) == paths
    splits, got = read_filter(g, base)
    assert got == paths and len(splits) == 5
    assert snapshot(g) == before
    g.import_splits(splits, got)
    assert snapshot(g) == snapshot(f)


def test_failed_save_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = SlidingHashFilter(3000, 5)
    calls = {"n": 0}
    real = filter_dump.encode_data_records

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(filter_dump, "encode_data_records", failing)
    with pytest.raises(OSError, match="disk full"):
        save_filter(f, str(tmp_path / "hash_filter_0"))
    assert os.listdir(tmp_path) == []


def test_crowded_state_round_trips(tmp_path: Path) -> None:
    f = SlidingHashFilter(300, 6, thresholds_all(1))
    rng = np.random.default_rng(11)
    for _ in range(5):
        f.should_be_filtered(rng.integers(-(1 << 62), 1 << 62, 700), with_table=False)
    assert f.head_increment > 0
    save_filter(f, str(tmp_path / "c"))
    g = SlidingHashFilter(300, 6, thresholds_all(1))
    restore_filter(g, str(tmp_path / "c"))
    assert snapshot(g) == snapshot(f)
    probe = rng.integers(-(1 << 62), 1 << 62, 500)
    assert (g.should_be_filtered(probe, with_table=False)
            == f.should_be_filtered(probe, with_table=False)).all()
