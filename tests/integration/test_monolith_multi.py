"""Monolith's multi-hash-table checkpoints restored through real shard servers.

The samples (tests/data/monolith_samples, written by TensorFlow's SNAPPY record writer)
are restored on 1 and 2 shards, whole (``restore_checkpoint``) and per table
(``Table.restore`` with the multi-table basename); every entry must come back as
``expected.json`` gives it, byte for byte (the serialized ``EntryDump``: id, value
bits, optimizer state bits, timestamp). Damaged files give DATA_LOSS naming the file
and an offset, and change no table.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cramjam
import numpy as np
import pytest
from google.protobuf import text_format

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient
from ps_client.errors import PsDataLoss
from ps_client.testing import local_cluster
from ps_server.checkpoint.tfrecord import frame_record

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "monolith_samples"
EXPECTED: dict[str, Any] = json.loads((SAMPLES / "expected.json").read_text())
TABLES = ("bias", "item", "user")

CASES = [
    ("multi_table_local", "model.ckpt-100"),
    ("multi_table_local", "model.ckpt-200"),
    ("multi_table_2ps", "model.ckpt-300"),
]


def config(name: str) -> eht.EmbeddingHashTableConfig:
    return text_format.Parse(EXPECTED["table_configs"][name], eht.EmbeddingHashTableConfig())


def expected_records(sample: str, step: str, table: str) -> dict[int, bytes]:
    entries = EXPECTED["samples"][sample]["checkpoints"][step]["tables"][table]["entries"]
    return {int(e["id"]): bytes.fromhex(e["record_hex"]) for e in entries}


def expected_values(sample: str, step: str, table: str) -> tuple[list[int], np.ndarray]:
    entries = EXPECTED["samples"][sample]["checkpoints"][step]["tables"][table]["entries"]
    ids = [int(e["id"]) for e in entries]
    bits = np.array([[int(v["bits"], 16) for v in e["num"]] for e in entries], dtype=np.uint32)
    return ids, bits


def held_records(client: PsClient, table: str) -> dict[int, bytes]:
    _, records = client.table(table).save_as_tensor(0, 1, 1 << 20, 0)
    return {int.from_bytes(r[1:9], "little", signed=True): r for r in records}


@pytest.fixture(scope="module", params=[1, 2], ids=["1shard", "2shards"])
def client(request: pytest.FixtureRequest) -> Iterator[PsClient]:
    with local_cluster(request.param) as cluster, PsClient(cluster.addresses) as c:
        yield c


def ensure_tables(client: PsClient) -> None:
    """Tables bias, item and user (the samples' feature names) on every shard."""
    have = set(client.tables())
    for name in TABLES:
        if name not in have:
            cfg = config(name)
            client.create_table(cfg, name=name,
                                learning_rate_fns=(1.0,) * len(cfg.entry_config.segments))


def check_all(client: PsClient, sample: str, step: str) -> None:
    for name in TABLES:
        want = expected_records(sample, step, name)
        got = held_records(client, name)
        assert got == want, f"{sample}/{step} table {name}"
        ids, bits = expected_values(sample, step, name)
        if ids:
            values = client.table(name).lookup(ids)
            assert (values.view(np.uint32) == bits).all()


@pytest.mark.parametrize(("sample", "step"), CASES, ids=["local-100", "local-200", "2ps-300"])
def test_restore_checkpoint_reads_every_entry(client: PsClient, sample: str, step: str) -> None:
    ensure_tables(client)
    model_dir = str(SAMPLES / sample)
    got = client.restore_checkpoint(model_dir, prefix=os.path.join(model_dir, step))
    assert got == os.path.join(model_dir, step)
    check_all(client, sample, step)


def test_restore_checkpoint_picks_latest(client: PsClient) -> None:
    ensure_tables(client)
    model_dir = str(SAMPLES / "multi_table_local")
    assert client.restore_checkpoint(model_dir) == os.path.join(model_dir, "model.ckpt-200")
    check_all(client, "multi_table_local", "model.ckpt-200")


@pytest.mark.parametrize(
    ("sample", "step", "stem"),
    [
        ("multi_table_local", "model.ckpt-200", "MonolithMultiHashTable_"),
        ("multi_table_2ps", "model.ckpt-300", "MonolithMultiHashTable_"),
        ("multi_table_2ps", "model.ckpt-300", "MonolithMultiHashTable"),
    ],
    ids=["local", "2ps-prefix", "2ps-bare"],
)
def test_table_restore_from_multi_table_basename(
    client: PsClient, sample: str, step: str, stem: str
) -> None:
    ensure_tables(client)
    basename = str(SAMPLES / sample / f"{step}.assets" / stem)
    for name in TABLES:
        client.table(name).restore(basename)
    check_all(client, sample, step)


def test_table_restore_of_one_parameter_server(client: PsClient) -> None:
    """``…/MonolithMultiHashTable_1`` reads PS 1's files only."""
    ensure_tables(client)
    step = EXPECTED["samples"]["multi_table_2ps"]["checkpoints"]["model.ckpt-300"]
    basename = str(SAMPLES / "multi_table_2ps" / "model.ckpt-300.assets" /
                   "MonolithMultiHashTable_1")
    client.table("bias").restore(basename)
    want = {int(e["id"]): bytes.fromhex(e["record_hex"])
            for e in step["tables"]["bias"]["entries"] if e["ps"] == 1}
    assert held_records(client, "bias") == want


# ---------------------------------------------------------------- damage


def _blocks(path: Path) -> list[tuple[int, bytes]]:
    raw = path.read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos : pos + 4], "big")
        out.append((pos, raw[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def _damaged_copy(tmp_path: Path, how: str) -> tuple[str, str]:
    """A copy of multi_table_2ps with PS 1's data file damaged; (model dir, file)."""
    model_dir = tmp_path / "multi_table_2ps"
    shutil.copytree(SAMPLES / "multi_table_2ps", model_dir)
    for f in model_dir.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    data = model_dir / "model.ckpt-300.assets" / "MonolithMultiHashTable_1-00000-of-00001"
    raw = data.read_bytes()
    if how == "truncated":
        data.write_bytes(raw[: len(raw) - 7])
    elif how == "flipped":
        b = bytearray(raw)
        b[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(b))
    elif how == "bad-crc":
        stream = b"".join(bytes(cramjam.snappy.decompress_raw(blk)) for _, blk in _blocks(data))
        first = int.from_bytes(stream[:8], "little")
        b = bytearray(stream)
        b[12 + first] ^= 0x01  # the first record's data CRC
        block = bytes(cramjam.snappy.compress_raw(bytes(b)))
        data.write_bytes(len(block).to_bytes(4, "big") + block)
    elif how == "short":
        # A valid container holding one record fewer than the meta declares.
        stream = b"".join(bytes(cramjam.snappy.decompress_raw(blk)) for _, blk in _blocks(data))
        records, pos = [], 0
        while pos < len(stream):
            n = int.from_bytes(stream[pos : pos + 8], "little")
            records.append(stream[pos + 12 : pos + 12 + n])
            pos += 16 + n
        body = b"".join(frame_record(r) for r in records[:-1])
        block = bytes(cramjam.snappy.compress_raw(body))
        data.write_bytes(len(block).to_bytes(4, "big") + block)
    return str(model_dir), str(data)


@pytest.mark.parametrize("how", ["truncated", "flipped", "bad-crc", "short"])
def test_damaged_data_file_is_data_loss_and_changes_nothing(
    client: PsClient, tmp_path: Path, how: str
) -> None:
    ensure_tables(client)
    good = str(SAMPLES / "multi_table_local")
    client.restore_checkpoint(good, prefix=os.path.join(good, "model.ckpt-100"))
    before = {name: held_records(client, name) for name in TABLES}
    model_dir, damaged = _damaged_copy(tmp_path, how)
    with pytest.raises(PsDataLoss) as info:
        client.restore_checkpoint(model_dir)
    message = str(info.value)
    assert os.path.basename(damaged) in message
    assert "offset" in message or "declares" in message
    with pytest.raises(PsDataLoss):
        client.table("user").restore(
            os.path.join(model_dir, "model.ckpt-300.assets", "MonolithMultiHashTable_")
        )
    assert {name: held_records(client, name) for name in TABLES} == before


def test_missing_meta_file_is_data_loss(client: PsClient, tmp_path: Path) -> None:
    ensure_tables(client)
    model_dir, _ = _damaged_copy(tmp_path, "none")
    os.unlink(os.path.join(model_dir, "model.ckpt-300.assets",
                           "MonolithMultiHashTable_0.meta-00000-of-00001"))
    with pytest.raises(PsDataLoss, match=r"MonolithMultiHashTable_0\.meta-"):
        client.restore_checkpoint(model_dir)


def test_missing_parameter_server_is_data_loss(client: PsClient, tmp_path: Path) -> None:
    ensure_tables(client)
    model_dir, _ = _damaged_copy(tmp_path, "none")
    assets = os.path.join(model_dir, "model.ckpt-300.assets")
    for f in os.listdir(assets):
        if f.startswith("MonolithMultiHashTable_0"):
            os.unlink(os.path.join(assets, f))
    with pytest.raises(PsDataLoss, match="parameter server"):
        client.restore_checkpoint(model_dir)


def test_table_named_in_no_meta_file_is_refused(tmp_path: Path) -> None:
    model_dir = str(SAMPLES / "multi_table_2ps")
    basename = os.path.join(model_dir, "model.ckpt-300.assets", "MonolithMultiHashTable_")
    with local_cluster(1) as cluster, PsClient(cluster.addresses) as c:
        ensure_tables(c)
        other = c.create_table(config("bias"), name="nope")
        other.assign([7], [[2.5]])
        with pytest.raises(ValueError, match=r"'nope'.*'bias', 'item', 'user'"):
            other.restore(basename)
        with pytest.raises(ValueError, match="'nope'"):
            c.restore_checkpoint(model_dir)
        assert other.lookup([7]).tolist() == [[2.5]]
        assert c.table("bias").size() == 0
