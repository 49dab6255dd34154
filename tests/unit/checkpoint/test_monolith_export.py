"""The export's file format: TensorFlow's SNAPPY block cutting, the writer, the
header-only ``.index``, names per parameter-server count, and a shard's export read
back by our Monolith readers (multi-table and single-table)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import cramjam
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.checkpoints import latest_checkpoint, restore_shard_checkpoint
from ps_server.checkpoint.monolith_export import (
    HEADER_ONLY_INDEX,
    SNAPPY_BLOCK_BYTES,
    SnappyRecordWriter,
    commit_export,
    export_shard,
    resource_stems,
    snappy_blocks,
)
from ps_server.checkpoint.monolith_multi import read_snappy_blocks
from ps_server.checkpoint.tfrecord import frame_record, read_records
from ps_server.engine import configs
from ps_server.engine.shard import Shard
from ps_server.errors import FailedPreconditionError, InvalidArgumentError

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "monolith_samples"


def rule(pieces: list[int], limit: int = SNAPPY_BLOCK_BYTES) -> list[int]:
    """The reference's rule (§4.2), piece by piece: block end offsets."""
    ends: list[int] = []
    buffered = 0
    pos = 0
    for size in pieces:
        if size <= limit - buffered:
            buffered += size
        else:
            if buffered:
                ends.append(pos)
            if size > limit:
                ends.append(pos + size)
                buffered = 0
            else:
                buffered = size
        pos += size
    if buffered:
        ends.append(pos)
    return ends


def record_pieces(lengths: list[int]) -> list[int]:
    return [p for n in lengths for p in (12, n, 4)]


@pytest.mark.parametrize("seed", range(6))
def test_block_cuts_follow_the_rule(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([1, 30, 200, 5_000, 70_000, 262_000, 262_144, 300_000])
               for _ in range(rng.randint(1, 60))]
    pieces = record_pieces(lengths)
    assert snappy_blocks(pieces) == rule(pieces)
    small = [rng.randint(1, 40) for _ in range(500)]
    assert snappy_blocks(small, limit=64) == rule(small, limit=64)


def test_exact_fit_and_oversized_pieces() -> None:
    # An exact fit stays in one block; a piece over the limit is a block of its own.
    assert snappy_blocks([100, 156], limit=256) == [256]
    assert snappy_blocks([100, 157], limit=256) == [100, 257]
    assert snappy_blocks(record_pieces([300_000])) == [12, 300_012, 300_016]
    assert snappy_blocks([]) == []


def write_stream(path: str, records: list[bytes], batches: int = 1) -> SnappyRecordWriter:
    writer = SnappyRecordWriter(path)
    step = max(1, -(-len(records) // batches))
    for a in range(0, len(records), step):
        chunk = records[a : a + step]
        writer.write_frames(b"".join(frame_record(r) for r in chunk),
                            np.array([len(r) for r in chunk], np.int64))
    writer.close()
    return writer


def test_worked_example_decodes_to_the_tfrecord_stream(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    write_stream(path, [b"hello", b"world!"])
    logical = frame_record(b"hello") + frame_record(b"world!")
    blocks = list(read_snappy_blocks(path))
    assert [b for _, b in blocks] == [logical]
    raw = Path(path).read_bytes()
    assert int.from_bytes(raw[:4], "big") == len(raw) - 4
    # TensorFlow's bytes (reference §4.2) hold the same stream.
    tf = bytes.fromhex("000000272b04050009013" "4eab2043e68656c6c6fbb1f1c190609143800"
                       "7369d537776f726c64210ac6af4f")
    assert bytes(cramjam.snappy.decompress_raw(tf[4:])) == logical


@pytest.mark.parametrize("batches", [1, 7])
def test_blocks_are_cut_as_tensorflow_cuts_them(tmp_path: Path, batches: int) -> None:
    rng = random.Random(batches)
    records = [bytes(rng.getrandbits(8) for _ in range(rng.choice([3, 900, 40_000])))
               for _ in range(40)] + [b"x" * 300_000, b"y"]
    path = str(tmp_path / "f")
    assert write_stream(path, records, batches).records_written == len(records)
    sizes = [len(b) for _, b in read_snappy_blocks(path)]
    ends = np.cumsum(sizes).tolist()
    assert ends == rule(record_pieces([len(r) for r in records]))
    stream = b"".join(b for _, b in read_snappy_blocks(path))
    assert stream == b"".join(frame_record(r) for r in records)


def test_empty_stream_is_an_empty_file_and_abort_leaves_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "empty")
    write_stream(path, [])
    assert Path(path).read_bytes() == b""
    writer = SnappyRecordWriter(str(tmp_path / "gone"))
    writer.write_frames(frame_record(b"a"), np.array([1], np.int64))
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_header_only_index_is_the_reference_bundle() -> None:
    sample = SAMPLES / "checkpoint-state" / "header-only.index"
    assert sample.read_bytes() == HEADER_ONLY_INDEX
    assert len(HEADER_ONLY_INDEX) == 101


def test_names_per_parameter_server_count() -> None:
    assert resource_stems("monolith-multi", 0, ["b", "a"]) == ["MonolithMultiHashTable_"]
    assert resource_stems("monolith-multi", 1, ["a"]) == ["MonolithMultiHashTable_0"]
    assert resource_stems("monolith-multi", 2, ["a"]) == [
        "MonolithMultiHashTable_0", "MonolithMultiHashTable_1"]
    assert resource_stems("monolith", 0, ["b", "x:y/z"]) == ["b", "x-y-z"]
    assert resource_stems("monolith", 2, ["t"]) == ["t_0", "t_1"]


def shard_with_entries(index: int = 0, count: int = 1) -> Shard:
    shard = Shard(shard_index=index, num_shards=count)
    shard.create_table("emb", configs.table_config(3))
    ids = np.array([-7, -2, 0, 1, 4, 9, 10, 15], np.int64)
    ids = ids[np.mod(ids, count) == index]
    rows = (ids[:, None] * np.array([1.0, 0.5, -0.25])).astype(np.float32)
    shard.assign("emb", ids, rows, req_time=1_700_000_000)
    return shard


@pytest.mark.parametrize("layout", ["monolith", "monolith-multi"])
@pytest.mark.parametrize("num_ps", [0, 1, 3])
def test_a_shard_export_restores_through_our_monolith_reader(
    tmp_path: Path, layout: str, num_ps: int
) -> None:
    shards = [shard_with_entries(i, 2) for i in range(2)]
    for s in shards:
        result = export_shard(s, str(tmp_path), 5, layout=layout, num_ps=num_ps)
        assert result.entries == s.tables["emb"].table.size()
    commit_export(shards[0], str(tmp_path), 5, layout=layout, num_ps=num_ps)
    prefix = str(tmp_path / "model.ckpt-5")
    assert latest_checkpoint(str(tmp_path)) == prefix
    fresh = Shard()
    fresh.create_table("emb", configs.table_config(3))
    restore_shard_checkpoint(fresh, str(tmp_path), None)
    whole = shard_with_entries()
    ids = np.array([-7, -2, 0, 1, 4, 9, 10, 15], np.int64)
    np.testing.assert_array_equal(fresh.lookup("emb", ids), whole.lookup("emb", ids))
    if layout == "monolith-multi":
        meta = tmp_path / "model.ckpt-5.assets" / (
            f"{resource_stems(layout, num_ps, ['emb'])[-1]}.meta-00001-of-00002")
        (record,) = read_records(str(meta))
        assert eht.MultiHashTableMetadata.FromString(record).table_name == "emb"


def test_refusals(tmp_path: Path) -> None:
    shard = shard_with_entries()
    with pytest.raises(InvalidArgumentError, match="layout"):
        export_shard(shard, str(tmp_path), 1, layout="tf", num_ps=1)
    with pytest.raises(InvalidArgumentError, match="num_ps"):
        export_shard(shard, str(tmp_path), 1, layout="monolith", num_ps=-1)
    # A commit before the shards wrote their files writes nothing.
    with pytest.raises(FailedPreconditionError, match="not complete"):
        commit_export(shard, str(tmp_path), 1, layout="monolith", num_ps=2)
    assert not os.path.exists(tmp_path / "checkpoint")
    # Files left by an export of another shard count make the commit refuse.
    other = shard_with_entries(1, 3)
    export_shard(other, str(tmp_path), 2, layout="monolith", num_ps=0)
    export_shard(shard, str(tmp_path), 2, layout="monolith", num_ps=0)
    with pytest.raises(FailedPreconditionError, match="another file count"):
        commit_export(shard, str(tmp_path), 2, layout="monolith", num_ps=0)
