"""Monolith's multi-hash-table files: SNAPPY container, meta files, per-table runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cramjam
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.monolith_multi import (
    MultiTableCheckpoint,
    index_data_file,
    read_snappy_blocks,
    stems_of_basename,
)
from ps_server.checkpoint.tfrecord import frame_record
from ps_server.errors import CheckpointCorruptError

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "monolith_samples"

# TensorFlow's SNAPPY output for the records b"hello", b"world!" (the reference's
# worked example): one block of 39 bytes holding the 43-byte TFRecord stream.
TF_EXAMPLE = bytes.fromhex(
    "00000027" "2b" "040500" "0901" "34eab2043e68656c6c6fbb1f1c1906" "0914"
    "38007369d537776f726c64210ac6af4f"
)


def records_of(parts: list, chunk: int = 1 << 16) -> list[bytes]:
    out = []
    for part in parts:
        for buf, offs in part.framed(chunk):
            data = buf.tobytes()
            out += [data[offs[i] : offs[i + 1]] for i in range(offs.size - 1)]
    return out


def container(stream: bytes, block: int) -> bytes:
    """``stream`` cut into blocks of ``block`` bytes, each raw snappy with its BE length."""
    out = []
    for i in range(0, len(stream), block):
        body = bytes(cramjam.snappy.compress_raw(stream[i : i + block]))
        out.append(len(body).to_bytes(4, "big") + body)
    return b"".join(out)


def meta_file(path: Path, declared: list[tuple[str, int]]) -> None:
    path.write_bytes(b"".join(
        frame_record(eht.MultiHashTableMetadata(table_name=n, num_entries=c)
                     .SerializeToString())
        for n, c in declared
    ))


def test_tf_worked_example(tmp_path: Path) -> None:
    data = tmp_path / "S-00000-of-00001"
    data.write_bytes(TF_EXAMPLE)
    ((pos, block),) = list(read_snappy_blocks(str(data)))
    assert pos == 0 and block == frame_record(b"hello") + frame_record(b"world!")
    (part,) = index_data_file(str(data), "meta", [("t", 2)])
    assert (part.table_name, part.records, part.start, part.end) == ("t", 2, 0, 43)
    assert part == str(data)  # the part stands for its data file
    assert records_of([part]) == [b"hello", b"world!"]


@pytest.mark.parametrize("block", [1, 7, 13, 1000])
def test_runs_across_blocks(tmp_path: Path, block: int) -> None:
    records = [bytes([k]) * (k % 9 + 1) for k in range(40)]
    stream = b"".join(frame_record(r) for r in records)
    data = tmp_path / "S-00000-of-00001"
    data.write_bytes(container(stream, block))
    # 3 tables, then 5 records no meta declares (ignored).
    parts = index_data_file(str(data), "meta", [("a", 10), ("b", 0), ("c", 25)])
    assert [p.records for p in parts] == [10, 0, 25]
    assert records_of([parts[0]], chunk=1) == records[:10]
    assert records_of([parts[1]]) == []
    assert records_of([parts[2]], chunk=1) == records[10:35]


def test_empty_file(tmp_path: Path) -> None:
    data = tmp_path / "S-00000-of-00001"
    data.write_bytes(b"")
    parts = index_data_file(str(data), "meta", [("a", 0), ("b", 0)])
    assert [p.records for p in parts] == [0, 0]
    with pytest.raises(CheckpointCorruptError, match="holds 0 records but meta declares 1"):
        index_data_file(str(data), "meta", [("a", 1)])


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (lambda b: b[:2], r"byte offset 0: truncated block header \(2 of 4"),
        (lambda b: b[:-1], r"byte offset 0: truncated block \(39 bytes announced, 38"),
        (lambda b: b + b"\x00\x00\x00\x05abc", r"byte offset 43: truncated block"),
        (lambda b: b[:4] + b"\x7f" + b[5:], "byte offset 0: .*"),
    ],
    ids=["header", "block", "second-block", "preamble"],
)
def test_damaged_container(tmp_path: Path, cut: object, match: str) -> None:
    data = tmp_path / "S-00000-of-00001"
    data.write_bytes(cut(TF_EXAMPLE))  # type: ignore[operator]
    with pytest.raises(CheckpointCorruptError, match=match) as info:
        index_data_file(str(data), "meta", [("t", 2)])
    assert str(data) in str(info.value)


def test_bad_record_crc_names_stream_and_block_offsets(tmp_path: Path) -> None:
    stream = bytearray(b"".join(frame_record(bytes([k]) * 20) for k in range(30)))
    stream[36 * 17 + 12] ^= 1  # data of record 17 (36 bytes each)
    data = tmp_path / "S-00000-of-00001"
    data.write_bytes(container(bytes(stream), 100))
    block_offset = [p for p, _ in read_snappy_blocks(str(data))][(36 * 17) // 100]
    with pytest.raises(
        CheckpointCorruptError,
        match=rf"decompressed stream.*byte offset {36 * 17}: bad data CRC.*"
              rf"SNAPPY block at file offset {block_offset}\)",
    ):
        index_data_file(str(data), "meta", [("t", 30)])


def test_file_set_and_meta_checks(tmp_path: Path) -> None:
    stream = b"".join(frame_record(b"x" * 5) for _ in range(3))
    for i in range(2):
        (tmp_path / f"S_{i}-00000-of-00001").write_bytes(container(stream, 64))
        meta_file(tmp_path / f"S_{i}.meta-00000-of-00001", [("a", 1), ("b", 2)])
    ckpt = MultiTableCheckpoint.of_assets(str(tmp_path))
    assert ckpt is not None and ckpt.table_names() == ["a", "b"]
    parts = ckpt.parts(["zz", "b"])
    assert parts is not None and [os.path.basename(p) for p in parts] == [
        "S_0-00000-of-00001", "S_1-00000-of-00001"
    ]
    assert ckpt.parts(["zz"]) is None
    assert stems_of_basename(str(tmp_path / "S")) == ["S_0", "S_1"]
    assert stems_of_basename(str(tmp_path / "S_")) == ["S_0", "S_1"]
    assert stems_of_basename(str(tmp_path / "S_1")) == ["S_1"]
    assert stems_of_basename(str(tmp_path / "T")) == []

    (tmp_path / "S_1-00000-of-00002").write_bytes(b"")
    with pytest.raises(CheckpointCorruptError, match="disagree on the file count"):
        MultiTableCheckpoint.of_assets(str(tmp_path))
    os.unlink(tmp_path / "S_1-00000-of-00002")

    meta_file(tmp_path / "S_1.meta-00000-of-00001", [("a", 1), ("a", 2)])
    with pytest.raises(CheckpointCorruptError, match="declared twice"):
        MultiTableCheckpoint.of_assets(str(tmp_path))
    (tmp_path / "S_1.meta-00000-of-00001").write_bytes(frame_record(b"\xff\xff"))
    with pytest.raises(CheckpointCorruptError, match="byte offset 0 is not a MultiHashTable"):
        MultiTableCheckpoint.of_assets(str(tmp_path))
    (tmp_path / "S_1.meta-00000-of-00001").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointCorruptError, match="truncated header"):
        MultiTableCheckpoint.of_assets(str(tmp_path))


@pytest.mark.parametrize(
    ("sample", "step"),
    [("multi_table_local", "model.ckpt-100"), ("multi_table_local", "model.ckpt-200"),
     ("multi_table_2ps", "model.ckpt-300")],
)
def test_samples_hold_expected_records_in_file_order(sample: str, step: str) -> None:
    expected = json.loads((SAMPLES / "expected.json").read_text())["samples"][sample]
    tables = expected["checkpoints"][step]["tables"]
    ckpt = MultiTableCheckpoint.of_assets(str(SAMPLES / sample / f"{step}.assets"))
    assert ckpt is not None
    for name, table in tables.items():
        parts = ckpt.parts([name])
        assert parts is not None
        want = [bytes.fromhex(e["record_hex"]) for e in table["entries"]]
        assert records_of(parts) == want
        assert sum(p.records for p in parts) == len(want)
        assert all(np.int64(p.end) >= p.start for p in parts)
