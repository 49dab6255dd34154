"""The hostile requests the fuzz suite found mishandled, one test each (issue 7, item 3).

Each was answered ``UNKNOWN`` or ``INTERNAL``, changed state although rejected, or
could make the shard write without bound; each must now get a precise status, leave
the shard exactly as it was and keep it serving.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_server.engine import configs
from ps_server.engine.shard import MAX_FILES_PER_SAVE, MAX_FILTER_CAPACITY, MAX_NAME_BYTES
from tests.faults.support import shard_fingerprint
from tests.fuzz.oracle import METHODS, T0, baseline
from tests.integration.conftest import RunningServer, start_inprocess_server

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


@pytest.fixture(params=["data root", "no data root"])
def shard(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """Shard 1 of 3 holding the fuzz suite's baseline tables (``sv`` is SERVING)."""
    root = str(tmp_path) if request.param == "data root" else ""
    state = copy.deepcopy(baseline(True, 1, 3))
    with start_inprocess_server(shard=state, shard_index=1, num_shards=3, data_root=root,
                                max_message_bytes=64 * 1024) as server:
        yield server


def send(server: RunningServer, method: str, payload: bytes | Any) -> tuple[grpc.StatusCode, str]:
    """Raw bytes (or a message) to ``method``: ``(code, details)``."""
    path = METHODS[method][0]
    raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
    try:
        server.channel.unary_unary(path)(raw, timeout=20)
    except grpc.RpcError as err:
        call: Any = err
        return call.code(), call.details()
    return Code.OK, ""


def refused(server: RunningServer, method: str, payload: Any, code: grpc.StatusCode,
            *fragments: str) -> None:
    """``payload`` gets ``code`` naming ``fragments``; nothing changes; still serving."""
    before = shard_fingerprint(server.shard)
    got, details = send(server, method, payload)
    assert got == code, details
    for fragment in fragments:
        assert fragment in details, details
    assert shard_fingerprint(server.shard) == before
    assert send(server, "ListTables", pb.ListTablesRequest())[0] == Code.OK


def tensor(arr: Any, dtype: str) -> pb.Tensor:
    a = np.asarray(arr, dtype=dtype)
    return pb.Tensor(data=a.tobytes(), shape=list(a.shape))


GARBAGE = {"bad key": b"\xff\xff", "cut field": b"\x0a\x05ab",
           # Field 1 is a string in these requests only (elsewhere: an unknown field).
           "bad UTF-8": b"\x0a\x02\xff\xfe"}


@pytest.mark.parametrize(("method", "garbage"), [
    (method, kind)
    for method in ("Lookup", "Assign", "CreateTable", "GetShardInfo", "RestoreTable",
                   "Admin.RestoreCheckpoint", "Admin.Drain")
    for kind in GARBAGE
    if kind != "bad UTF-8" or method not in ("GetShardInfo", "Admin.Drain")
])
def test_bytes_that_are_no_request_are_invalid_argument(
    shard: RunningServer, method: str, garbage: str
) -> None:
    # Was UNKNOWN ("Unexpected DecodeError"): gRPC's answer to a failing deserializer.
    name = METHODS[method][0].rsplit("/", 1)[-1]
    refused(shard, method, GARBAGE[garbage], Code.INVALID_ARGUMENT, name,
            "not a valid protobuf")


@pytest.mark.parametrize(("method", "request_"), [
    ("SaveTable", pb.SaveRequest(table="emb", basename="a\0b")),
    ("RestoreTable", pb.RestoreRequest(table="emb", basename="ck/\0")),
    ("Admin.SaveCheckpoint", pb.AdminSaveRequest(model_dir="m\0", global_step=1)),
    ("Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="m", prefix="x\0")),
], ids=["SaveTable", "RestoreTable", "Admin.SaveCheckpoint", "Admin.RestoreCheckpoint"])
def test_nul_in_a_path_is_invalid_argument(shard: RunningServer, method: str,
                                           request_: Any) -> None:
    # Was INTERNAL (ValueError: embedded null byte).
    refused(shard, method, request_, Code.INVALID_ARGUMENT, "NUL")


@pytest.mark.parametrize("path", ["x" * 300, "d/" + "y" * 300, "z/" * 1000 + "t",
                                  "w" * 5000])
def test_overlong_and_overdeep_paths_are_invalid_argument(shard: RunningServer,
                                                          path: str) -> None:
    # Were INTERNAL: ENAMETOOLONG, and RecursionError in os.makedirs for deep paths.
    refused(shard, "SaveTable", pb.SaveRequest(table="emb", basename=path),
            Code.INVALID_ARGUMENT)
    refused(shard, "Admin.SaveCheckpoint", pb.AdminSaveRequest(model_dir=path, global_step=1),
            Code.INVALID_ARGUMENT)


def test_fused_optimize_with_a_serving_table_in_a_later_block_changes_nothing(
    shard: RunningServer,
) -> None:
    # Block 0 (emb, TRAINING) used to be applied before block 1 (sv, SERVING) failed.
    request = pb.FusedOptimizeRequest(
        tables=["emb", "sv"],
        blocks=[pb.FusedBlock(table_index=0, num_ids=1), pb.FusedBlock(table_index=1,
                                                                       num_ids=1)],
        ids=tensor([1, 1], "<i8"), grads=tensor(np.ones(5), "<f4"),
        learning_rates=[1.0, 1.0], req_time=T0 + 99)
    refused(shard, "FusedOptimize", request, Code.FAILED_PRECONDITION, "'sv'", "SERVING")


def test_empty_tensor_with_a_dimension_no_array_can_have_is_invalid_argument(
    shard: RunningServer,
) -> None:
    # [2**62, 0] holds no element but numpy cannot shape it: was INTERNAL.
    grads = pb.Tensor(data=b"", shape=[2**62, 0])
    refused(shard, "InterceptGradient", pb.InterceptGradientRequest(
        hash_filter="flt", ids=tensor([], "<i8"), grads=grads), Code.INVALID_ARGUMENT,
        "grads")
    refused(shard, "Assign", pb.AssignRequest(
        table="emb", ids=tensor([], "<i8"), values=pb.Tensor(shape=[0, 2**63 - 1])),
        Code.INVALID_ARGUMENT, "values")


@pytest.mark.parametrize(("request_", "fragment"), [
    (pb.CreateHashFilterRequest(name="f", enable_hash_filter=True, capacity=2**63),
     "capacity"),  # was INTERNAL: numpy "array is too big"
    (pb.CreateHashFilterRequest(name="f", enable_hash_filter=True,
                                capacity=MAX_FILTER_CAPACITY + 1), "capacity"),
    (pb.CreateHashFilterRequest(name="f", enable_hash_filter=True, capacity=10**9,
                                split_num=MAX_FILES_PER_SAVE + 1), "split_num"),
], ids=["capacity 2**63", "capacity over the limit", "a file per split, too many"])
def test_filter_sizes_beyond_any_shard_are_invalid_argument(
    shard: RunningServer, request_: Any, fragment: str
) -> None:
    refused(shard, "CreateHashFilter", request_, Code.INVALID_ARGUMENT, fragment)


def create_table(name: str, **kw: Any) -> pb.CreateTableRequest:
    return pb.CreateTableRequest(name=name, config=configs.table_config(2).SerializeToString(),
                                 **kw)


def test_table_that_could_never_be_saved_is_refused(shard: RunningServer) -> None:
    # A save would have written 2**31 - 1 files, holding the table's lock meanwhile.
    refused(shard, "CreateTable", create_table("many", saver_parallel=2**31 - 1),
            Code.INVALID_ARGUMENT, "saver_parallel")
    # A NUL in the name made every later SaveCheckpoint fail with INTERNAL.
    refused(shard, "CreateTable", create_table("a\0b"), Code.INVALID_ARGUMENT, "NUL")
    refused(shard, "CreateTable", create_table("n" * (MAX_NAME_BYTES + 1)),
            Code.INVALID_ARGUMENT, str(MAX_NAME_BYTES))
    refused(shard, "CreateHashFilter", pb.CreateHashFilterRequest(name="f\0"),
            Code.INVALID_ARGUMENT, "NUL")
    # The limits themselves are fine: such a table saves.
    assert send(shard, "CreateTable", create_table("n" * MAX_NAME_BYTES,
                                                   saver_parallel=3))[0] == Code.OK


@pytest.mark.parametrize("grace", [math.nan, -1.0, -math.inf])
def test_drain_with_a_grace_that_is_not_a_duration_is_refused(shard: RunningServer,
                                                              grace: float) -> None:
    # NaN used to pass the ">= 0" check and drain the shard.
    refused(shard, "Admin.Drain", pb.DrainRequest(grace_seconds=grace), Code.INVALID_ARGUMENT,
            "grace_seconds")
    lookup = pb.LookupRequest(table="emb", ids=tensor([1], "<i8"))
    assert send(shard, "Lookup", lookup)[0] == Code.OK  # not draining


# ---------------------------------------------------------------- names (issue 12)


def test_a_table_restores_only_its_own_files_next_to_a_suffixed_name(tmp_path: Path) -> None:
    # Found by test_hostile_names: tables 'x' and 'x_0' saved at pt/x and pt/x_0 on shard
    # 0 write pt/x_0-00000-of-00001 and pt/x_0_0-00000-of-00001.
    with start_inprocess_server(shard_index=0, num_shards=1, data_root=str(tmp_path)) as server:
        for k, name in enumerate(["x", "x_0"]):
            assert send(server, "CreateTable", create_table(name))[0] == Code.OK
            assert send(server, "Assign", pb.AssignRequest(
                table=name, ids=tensor([10 * k], "<i8"), values=tensor([[k + 1.0] * 2], "<f4"),
                req_time=T0))[0] == Code.OK
            assert send(server, "SaveTable", pb.SaveRequest(table=name, basename=f"pt/{name}")
                        )[0] == Code.OK
        saved = shard_fingerprint(server.shard)["tables"]["x_0"]
        assert send(server, "RestoreTable", pb.RestoreRequest(table="x_0", basename="pt/x_0")
                    )[0] == Code.OK
        assert shard_fingerprint(server.shard)["tables"]["x_0"] == saved


def test_a_loop_of_symbolic_links_in_the_data_root_is_permission_denied(tmp_path: Path) -> None:
    # Found by test_hostile_files: 'ck' -> 'ck/model.ckpt-1.assets' (a link into itself).
    # realpath leaves a loop unresolved, so it passed as inside the root and the save's
    # makedirs failed with ELOOP: INTERNAL.
    root = tmp_path / "root"
    root.mkdir()
    (root / "ck").symlink_to(root / "ck" / "model.ckpt-1.assets")
    state = copy.deepcopy(baseline(False, 0, 1))
    with start_inprocess_server(shard=state, shard_index=0, num_shards=1,
                                data_root=str(root)) as server:
        save = pb.AdminSaveRequest(model_dir="ck", global_step=1)
        for method in ("Admin.SaveCheckpoint", "Admin.CommitCheckpoint"):
            refused(server, method, save, Code.PERMISSION_DENIED, "'ck'", "loop")
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.PERMISSION_DENIED, "loop")
        refused(server, "SaveTable", pb.SaveRequest(table="emb", basename="ck/emb"),
                Code.PERMISSION_DENIED, "loop")


DELETE = object()


def _manifest_with(tmp_path: Path, field: str, value: Any, *, section: str = "tables",
                   name: str | None = "emb", recompute: bool = True
                   ) -> Iterator[RunningServer]:
    """A committed checkpoint of the baseline at ``ck`` whose manifest's ``section`` entry
    ``name`` (table 'emb'; None: the section itself) has ``field`` set to ``value``
    (checksum recomputed; the value ``DELETE`` removes it, a callable is called with the
    entry instead), served by an empty shard."""
    import json

    import google_crc32c
    with start_inprocess_server(shard=copy.deepcopy(baseline(False, 0, 1)), shard_index=0,
                                num_shards=1, data_root=str(tmp_path)) as server:
        save = pb.AdminSaveRequest(model_dir="ck", global_step=1)
        assert send(server, "Admin.SaveCheckpoint", save)[0] == Code.OK
        assert send(server, "Admin.CommitCheckpoint", save)[0] == Code.OK
        path = tmp_path / "ck" / "model.ckpt-1.assets" / "manifest.json"
        manifest = json.loads(path.read_text())
        where = manifest if not section else (
            manifest[section] if name is None else manifest[section][name])
        if callable(value):
            value(where)
        elif value is DELETE:
            del where[field]
        else:
            where[field] = value
        body = {k: v for k, v in manifest.items() if k != "manifest_crc32c"}
        if recompute:
            manifest["manifest_crc32c"] = int(google_crc32c.value(json.dumps(
                body, sort_keys=True, separators=(",", ":"), ensure_ascii=True
            ).encode("ascii")))
        path.write_text(json.dumps(manifest))
        server.shard.tables.clear()
        server.shard.filters.clear()
        yield server


@pytest.mark.parametrize("value", [5, None])
def test_a_manifest_whose_extra_restore_names_is_no_list_is_data_loss(
    tmp_path: Path, value: Any
) -> None:
    # Found by test_hostile_files (a manifest field retyped, its checksum recomputed).
    for server in _manifest_with(tmp_path, "extra_restore_names", value):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


def test_a_manifest_whose_extra_restore_names_is_a_string_is_data_loss(tmp_path: Path) -> None:
    # Found by test_hostile_files: the restore succeeded with another table declaration.
    for server in _manifest_with(tmp_path, "extra_restore_names", "xy"):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


@pytest.mark.parametrize(("name", "value"), [("flt", DELETE), ("flt", None), ("prob", "hf")])
def test_a_manifest_whose_filter_file_stem_contradicts_its_type_is_data_loss(
    tmp_path: Path, name: str, value: Any
) -> None:
    # Found by test_hostile_files: without file_stem the sliding filter 'flt' was taken
    # for one that saves nothing, and the restore answered OK leaving its state as it was.
    for server in _manifest_with(tmp_path, "file_stem", value, section="hash_filters",
                                 name=name):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


@pytest.mark.parametrize("value", [DELETE, {}])
def test_a_manifest_that_drops_the_filters_its_tables_use_is_data_loss(
    tmp_path: Path, value: Any
) -> None:
    # Found by test_hostile_files: without its hash_filters the restore answered OK and
    # left the filters' state as it was.
    for server in _manifest_with(tmp_path, "hash_filters", value, section=""):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


def _drop_exp(tables: dict[str, Any]) -> None:
    del tables["exp"]


def _rename_exp(tables: dict[str, Any]) -> None:
    tables["flt2"] = tables.pop("exp")


@pytest.mark.parametrize("mutate", [_drop_exp, _rename_exp])
def test_a_manifest_that_drops_or_renames_a_table_is_data_loss(
    tmp_path: Path, mutate: Any
) -> None:
    # Found by test_hostile_files: with table 'exp' deleted (its files still listed) the
    # restore into an empty shard answered OK without it; renamed, table 'flt2' would
    # have been created from exp's files.
    for server in _manifest_with(tmp_path, "", mutate, section="tables", name=None):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


def _split_num_1(filters: dict[str, Any]) -> None:
    filters["flt"]["split_num"] = 1


def test_a_manifest_declaring_an_unbuildable_filter_is_data_loss(tmp_path: Path) -> None:
    # Found by test_hostile_files: split_num 1 made the restore into an empty shard fail
    # with the filter's INVALID_ARGUMENT, naming no file.
    for server in _manifest_with(tmp_path, "", _split_num_1, section="hash_filters",
                                 name=None):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


def _split_num_true(filters: dict[str, Any]) -> None:
    filters["prob"]["split_num"] = True


def test_a_manifest_whose_filter_field_changed_type_is_data_loss(tmp_path: Path) -> None:
    # Found by test_hostile_files: split_num true was read as 1 and the restore created
    # the filter with another configuration than the one saved.
    for server in _manifest_with(tmp_path, "", _split_num_true, section="hash_filters",
                                 name=None):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")


def _drop_files_and_emb(manifest: dict[str, Any]) -> None:
    del manifest["files"]
    del manifest["tables"]["emb"]


def test_a_manifest_stripped_of_its_file_lists_is_checked_by_its_checksum(
    tmp_path: Path
) -> None:
    # Found by test_hostile_files: without "files" the checksum was not checked, so a
    # manifest that also lost table 'emb' passed for one written before file lists.
    for server in _manifest_with(tmp_path, "", _drop_files_and_emb, section="",
                                 recompute=False):
        refused(server, "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(model_dir="ck"),
                Code.DATA_LOSS, "manifest.json")
