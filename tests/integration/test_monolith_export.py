"""Export to Monolith's layout through real shard servers, read back every way.

A 2-shard cluster holds the multi-table sample's entries (``multi_table_local``,
``model.ckpt-200``: bias, item, user with edge values, two optimizers per entry, ftrl
and adam state). It exports them for a single-process Monolith job (``num_ps`` 0),
one and two parameter servers, in both layouts, and then:

* the file names are exactly what such a Monolith job writes and reads (reference
  §1, §3), every record of a parameter server's files is one it owns
  (``floormod(id, num_ps)``), and every multi-table meta file declares every table,
  in sorted order, with the count of records it really has;
* every record's bytes equal the sample's record of the same entry (compared as
  multisets per table: Monolith's split over files and its order are arbitrary);
* TensorFlow's ``latest_checkpoint`` rule (reference §9, implemented here without
  TensorFlow) names the step: ``checkpoint`` parses, names it, and its ``.index``
  exists (the 101-byte header-only bundle TF accepts);
* our Monolith reader restores it into fresh 1- and 3-shard clusters with every
  entry identical, byte for byte;
* refusals (layout, PS count, a step holding our own checkpoint, a commit before the
  shards' files) and the data root (every file inside it).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import PsClient
from ps_client.errors import PsFailedPrecondition, PsInvalidArgument
from ps_client.testing import LocalCluster, local_cluster
from ps_server.checkpoint.monolith_multi import read_snappy_blocks
from ps_server.checkpoint.tfrecord import masked_crc32c, read_records
from ps_server.engine import configs
from tests.integration.conftest import CLIENT_OPTIONS, start_inprocess_server
from tests.integration.test_service import assign, make_table

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "monolith_samples"
EXPECTED: dict[str, Any] = json.loads((SAMPLES / "expected.json").read_text())
HEADER_ONLY = (SAMPLES / "checkpoint-state" / "header-only.index").read_bytes()
TABLES = ("bias", "item", "user")
SAMPLE, STEP = "multi_table_local", "model.ckpt-200"
CASES = [(layout, ps) for layout in ("monolith", "monolith-multi") for ps in (0, 1, 2)]
CASE_IDS = [f"{layout}-{ps}ps" for layout, ps in CASES]


def config(name: str) -> eht.EmbeddingHashTableConfig:
    return text_format.Parse(EXPECTED["table_configs"][name], eht.EmbeddingHashTableConfig())


def sample_records(table: str) -> dict[int, bytes]:
    entries = EXPECTED["samples"][SAMPLE]["checkpoints"][STEP]["tables"][table]["entries"]
    return {int(e["id"]): bytes.fromhex(e["record_hex"]) for e in entries}


def held_records(client: PsClient, table: str) -> dict[int, bytes]:
    _, records = client.table(table).save_as_tensor(0, 1, 1 << 20, 0)
    return {record_id(r): r for r in records}


def record_id(record: bytes) -> int:
    assert record[:1] == b"\x09"
    return int.from_bytes(record[1:9], "little", signed=True)


def ensure_tables(client: PsClient) -> None:
    have = set(client.tables())
    for name in TABLES:
        if name not in have:
            cfg = config(name)
            client.create_table(cfg, name=name,
                                learning_rate_fns=(1.0,) * len(cfg.entry_config.segments))


@pytest.fixture(scope="module")
def source_cluster() -> Iterator[LocalCluster]:
    with local_cluster(2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def source(source_cluster: LocalCluster) -> Iterator[PsClient]:
    """2 shards holding the sample's entries."""
    with PsClient(source_cluster.addresses) as client:
        ensure_tables(client)
        model_dir = str(SAMPLES / SAMPLE)
        client.restore_checkpoint(model_dir, prefix=os.path.join(model_dir, STEP))
        for name in TABLES:
            assert held_records(client, name) == sample_records(name)
        yield client


@pytest.fixture(scope="module", params=[1, 3], ids=["1shard", "3shards"])
def target(request: pytest.FixtureRequest) -> Iterator[PsClient]:
    with local_cluster(request.param) as cluster, PsClient(cluster.addresses) as client:
        ensure_tables(client)
        yield client


@pytest.fixture(scope="module")
def exported(source: PsClient, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[tuple[str, int], str]:
    """Every case exported once: (layout, num_ps) -> model dir."""
    out = {}
    for layout, num_ps in CASES:
        model_dir = str(tmp_path_factory.mktemp(f"{layout}-{num_ps}"))
        prefix = source.export_checkpoint(model_dir, 7, layout=layout, num_ps=num_ps)
        assert prefix == os.path.join(model_dir, "model.ckpt-7")
        out[layout, num_ps] = model_dir
    return out


# ---------------------------------------------------------------- TensorFlow's rule


def tf_latest_checkpoint(model_dir: str) -> str | None:
    """``tf.train.latest_checkpoint`` as the reference (§9) describes TF 2.16.2's."""
    path = os.path.join(model_dir, "checkpoint")
    if not os.path.exists(path):
        return None
    latest: str | None = None
    for line in Path(path).read_text().splitlines():
        m = re.fullmatch(r'\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"\s*', line)
        if m is None:
            if not line.strip() or re.fullmatch(r"\s*\w+\s*:\s*[-+0-9.eE]+\s*", line):
                continue
            return None  # unparsable: TF warns and returns None
        if m.group(1) == "model_checkpoint_path":
            latest = m.group(2)
        elif m.group(1) != "all_model_checkpoint_paths":
            return None
    if not latest:
        raise ValueError("empty model_checkpoint_path")
    prefix = latest if os.path.isabs(latest) else os.path.join(model_dir, latest)
    if glob.glob(glob.escape(prefix) + ".index") or glob.glob(glob.escape(prefix)):
        return prefix
    return None


# ---------------------------------------------------------------- reading the files


def stream_records(stream: bytes, name: str) -> list[bytes]:
    """Records of a TFRecord stream, both CRCs checked."""
    out, pos = [], 0
    while pos < len(stream):
        n = int.from_bytes(stream[pos : pos + 8], "little")
        head_crc = int.from_bytes(stream[pos + 8 : pos + 12], "little")
        assert head_crc == masked_crc32c(stream[pos : pos + 8]), name
        data = stream[pos + 12 : pos + 12 + n]
        assert int.from_bytes(stream[pos + 12 + n : pos + 16 + n], "little") == \
            masked_crc32c(data), name
        out.append(data)
        pos += 16 + n
    assert pos == len(stream), name
    return out


def expected_names(layout: str, num_ps: int, shards: int) -> set[str]:
    servers = range(max(1, num_ps))
    if layout == "monolith-multi":
        stems = [f"MonolithMultiHashTable_{'' if num_ps == 0 else i}" for i in servers]
        return {f"{s}{infix}-{k:05d}-of-{shards:05d}"
                for s in stems for infix in ("", ".meta") for k in range(shards)}
    return {f"{t}{'' if num_ps == 0 else f'_{i}'}-{k:05d}-of-{shards:05d}"
            for t in TABLES for i in servers for k in range(shards)}


def read_export(assets: str, layout: str, num_ps: int, shards: int
                ) -> dict[str, list[tuple[int, bytes]]]:
    """table -> [(parameter server, record)] over every file, checking metas."""
    out: dict[str, list[tuple[int, bytes]]] = {t: [] for t in TABLES}
    for i in range(max(1, num_ps)):
        for k in range(shards):
            if layout == "monolith-multi":
                stem = f"MonolithMultiHashTable_{'' if num_ps == 0 else i}"
                data = os.path.join(assets, f"{stem}-{k:05d}-of-{shards:05d}")
                blocks = list(read_snappy_blocks(data))
                assert all(len(b) <= 262_144 for _, b in blocks)
                records = stream_records(b"".join(b for _, b in blocks), data)
                metas = [eht.MultiHashTableMetadata.FromString(r) for r in read_records(
                    os.path.join(assets, f"{stem}.meta-{k:05d}-of-{shards:05d}"))]
                assert [m.table_name for m in metas] == sorted(TABLES)
                assert sum(m.num_entries for m in metas) == len(records)
                pos = 0
                for m in metas:
                    out[m.table_name] += [(i, r) for r in records[pos : pos + m.num_entries]]
                    pos += m.num_entries
            else:
                for t in TABLES:
                    name = f"{t}{'' if num_ps == 0 else f'_{i}'}-{k:05d}-of-{shards:05d}"
                    out[t] += [(i, r) for r in read_records(os.path.join(assets, name))]
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(("layout", "num_ps"), CASES, ids=CASE_IDS)
def test_files_names_routing_and_record_bytes(
    exported: dict[tuple[str, int], str], layout: str, num_ps: int
) -> None:
    model_dir = exported[layout, num_ps]
    assets = os.path.join(model_dir, "model.ckpt-7.assets")
    assert set(os.listdir(assets)) == expected_names(layout, num_ps, 2)
    got = read_export(assets, layout, num_ps, 2)
    for table in TABLES:
        for ps, record in got[table]:
            assert record_id(record) % max(1, num_ps) == ps, (table, record_id(record))
        want = Counter(sample_records(table).values())
        assert Counter(r for _, r in got[table]) == want, table
    assert sorted(os.listdir(model_dir)) == ["checkpoint", "model.ckpt-7.assets",
                                             "model.ckpt-7.index"]


@pytest.mark.parametrize(("layout", "num_ps"), CASES, ids=CASE_IDS)
def test_latest_checkpoint_names_the_step(
    exported: dict[tuple[str, int], str], layout: str, num_ps: int
) -> None:
    model_dir = exported[layout, num_ps]
    prefix = os.path.join(model_dir, "model.ckpt-7")
    assert tf_latest_checkpoint(model_dir) == prefix
    assert Path(prefix + ".index").read_bytes() == HEADER_ONLY
    index = Path(model_dir, "checkpoint").read_text()
    assert index == ('model_checkpoint_path: "model.ckpt-7"\n'
                     'all_model_checkpoint_paths: "model.ckpt-7"\n')


@pytest.mark.parametrize(("layout", "num_ps"), CASES, ids=CASE_IDS)
def test_round_trip_into_another_shard_count(
    exported: dict[tuple[str, int], str], target: PsClient, layout: str, num_ps: int
) -> None:
    model_dir = exported[layout, num_ps]
    assert target.restore_checkpoint(model_dir) == os.path.join(model_dir, "model.ckpt-7")
    for table in TABLES:
        assert held_records(target, table) == sample_records(table), table


def test_a_later_export_becomes_the_latest_and_keeps_the_list(
    source: PsClient, tmp_path: Path
) -> None:
    model_dir = str(tmp_path)
    source.export_checkpoint(model_dir, 3, layout="monolith-multi", num_ps=0)
    source.export_checkpoint(model_dir, 9, layout="monolith-multi", num_ps=0)
    assert tf_latest_checkpoint(model_dir) == os.path.join(model_dir, "model.ckpt-9")
    assert Path(model_dir, "checkpoint").read_text() == (
        'model_checkpoint_path: "model.ckpt-9"\n'
        'all_model_checkpoint_paths: "model.ckpt-3"\n'
        'all_model_checkpoint_paths: "model.ckpt-9"\n')


def test_refusals(source: PsClient, source_cluster: LocalCluster, tmp_path: Path) -> None:
    with pytest.raises(PsInvalidArgument, match="layout"):
        source.export_checkpoint(str(tmp_path / "a"), 1, layout="tf")
    with pytest.raises(PsInvalidArgument, match="num_ps"):
        source.export_checkpoint(str(tmp_path / "a"), 1, num_ps=-1)
    # Our own checkpoint at the step is not overwritten with Monolith's files.
    own = str(tmp_path / "own")
    source.save_checkpoint(own, 4)
    with pytest.raises(PsFailedPrecondition, match="manifest"):
        source.export_checkpoint(own, 4, num_ps=2)
    assert not os.path.exists(os.path.join(own, "model.ckpt-4.index"))
    # A commit without every shard's files writes nothing.
    with grpc.insecure_channel(source_cluster.addresses[0], options=CLIENT_OPTIONS) as channel:
        admin = ps_grpc.ParameterServerAdminStub(channel)
        fresh = str(tmp_path / "fresh")
        with pytest.raises(grpc.RpcError) as info:
            admin.ExportCheckpoint(pb.AdminExportRequest(
                model_dir=fresh, global_step=2, layout="monolith", num_ps=1, commit=True))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not complete" in str(info.value.details())
        assert not os.path.exists(os.path.join(fresh, "checkpoint"))


def test_export_stays_inside_the_data_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with start_inprocess_server(data_root=str(root)) as srv:
        make_table(srv.stub, "t", configs.table_config(2))
        assign(srv.stub, "t", [1, 2, 3], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        admin = ps_grpc.ParameterServerAdminStub(srv.channel)

        def export(model_dir: str, step: int, commit: bool) -> Any:
            return admin.ExportCheckpoint(pb.AdminExportRequest(
                model_dir=model_dir, global_step=step, layout="monolith-multi", num_ps=0,
                commit=commit))

        export("m", 1, False)
        export("m", 1, True)
        assert tf_latest_checkpoint(str(root / "m")) == str(root / "m" / "model.ckpt-1")
        for model_dir in ("../outside", str(outside)):
            with pytest.raises(grpc.RpcError) as info:
                export(model_dir, 1, False)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        (root / "m" / "model.ckpt-2.assets").symlink_to(outside)
        for commit in (False, True):
            with pytest.raises(grpc.RpcError) as info:
                export("m", 2, commit)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert os.listdir(outside) == []
        assert not os.path.exists(root / "m" / "model.ckpt-2.index")
