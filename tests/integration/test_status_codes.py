"""One test per status code the shard sends (docs/architecture.md decision 6 and "Errors").

Each checks the exact code, that the details name the problem, and that afterwards
the shard still serves with its state unchanged.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server import errors
from ps_server.engine import configs
from ps_server.engine.shard import Shard, TableSlot
from ps_server.status import STATUS_BY_ERROR, status_of
from tests.integration.conftest import RunningServer, start_inprocess_server
from tests.integration.test_service import (
    Stub,
    assign,
    ids_tensor,
    intercept,
    lookup,
    make_filter,
    make_table,
    rows_tensor,
)

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def seed(stub: Stub) -> None:
    """Tables ``t`` (dim 2, SGD, with filter ``f`` at threshold 0) and ``serving``."""
    make_filter(stub, "f", threshold=0)
    make_table(stub, "t", configs.table_config(2), hash_filter="f")
    make_table(stub, "serving", configs.table_config(2, serving=True))
    assign(stub, "t", [1, 2, -3], [[1, 1], [2, 2], [3, 3]], req_time=50)
    assign(stub, "serving", [1], [[0.5, 0.5]])


def snapshot(stub: Stub) -> tuple[Any, ...]:
    info = stub.GetShardInfo(pb.ShardInfoRequest())
    tables = [(t.name, t.size, t.max_update_ts, t.config) for t in info.tables]
    filters = [(f.name, f.fill_ratio) for f in info.hash_filters]
    return tables, filters, lookup(stub, "t", [1, 2, -3, 4]).tolist()


@pytest.fixture
def seeded(server: RunningServer) -> Iterator[RunningServer]:
    seed(server.stub)
    before = snapshot(server.stub)
    yield server
    # Still serving, nothing changed.
    assert snapshot(server.stub) == before


def expect(code: grpc.StatusCode, call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    details = err.details()
    assert err.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return str(details)


def test_every_error_family_has_its_status() -> None:
    want = {
        errors.InvalidArgumentError: Code.INVALID_ARGUMENT,
        errors.DimMismatchError: Code.INVALID_ARGUMENT,
        errors.BadTensorError: Code.INVALID_ARGUMENT,
        errors.ConfigError: Code.INVALID_ARGUMENT,
        errors.UnknownTableError: Code.NOT_FOUND,
        errors.UnknownFilterError: Code.NOT_FOUND,
        errors.CheckpointNotFoundError: Code.NOT_FOUND,
        errors.AlreadyExistsError: Code.ALREADY_EXISTS,
        errors.FailedPreconditionError: Code.FAILED_PRECONDITION,
        errors.ServingEntryError: Code.FAILED_PRECONDITION,
        errors.ConfigMismatchError: Code.FAILED_PRECONDITION,
        errors.CheckpointCorruptError: Code.DATA_LOSS,
        errors.PathOutsideRootError: Code.PERMISSION_DENIED,
        errors.ResourceExhaustedError: Code.RESOURCE_EXHAUSTED,
    }
    for cls, code in want.items():
        assert status_of(cls("x")) == code, cls
    # Every ShardError subclass defined in ps_server.errors has a non-INTERNAL status.
    for cls in vars(errors).values():
        base = errors.ShardError
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
            assert status_of(cls("x")) != Code.INTERNAL, cls
    assert set(STATUS_BY_ERROR.values()) == set(want.values())


# ---------------------------------------------------------------- INVALID_ARGUMENT


def test_invalid_argument_bad_ids_bytes(seeded: RunningServer) -> None:
    stub = seeded.stub
    bad = pb.Tensor(data=b"\0" * 20, shape=[3])
    expect(Code.INVALID_ARGUMENT,
           lambda: stub.Lookup(pb.LookupRequest(table="t", ids=bad)),
           "ids: 20 bytes is not 3 x int64")
    expect(Code.INVALID_ARGUMENT,
           lambda: stub.Assign(pb.AssignRequest(table="t", ids=bad,
                                                values=rows_tensor(np.zeros((3, 2))))),
           "ids: 20 bytes")


def test_invalid_argument_dim_mismatch(seeded: RunningServer) -> None:
    stub = seeded.stub
    # Three floats per row for a dim-2 table.
    expect(Code.INVALID_ARGUMENT,
           lambda: assign(stub, "t", [1, 9], np.ones((2, 3))),
           "values", "[2, 2]", "(2, 3)")
    # Rows that do not match the ids: caught before the engine.
    expect(Code.INVALID_ARGUMENT,
           lambda: assign(stub, "t", [1, 9], np.ones((3, 2))),
           "values: 3 rows for 2 ids")
    # One learning rate per segment: this table has one.
    expect(Code.INVALID_ARGUMENT,
           lambda: stub.ApplyGradients(pb.ApplyGradientsRequest(
               table="t", ids=ids_tensor([1]), grads=rows_tensor([[1, 1]]),
               learning_rates=[0.1, 0.2])),
           "'t'", "1 learning rate(s); got 2")


def test_invalid_argument_bad_config(seeded: RunningServer) -> None:
    stub = seeded.stub
    expect(Code.INVALID_ARGUMENT,
           lambda: stub.CreateTable(pb.CreateTableRequest(name="new", config=b"")),
           "'new'", "entry_config")
    expect(Code.INVALID_ARGUMENT,
           lambda: stub.CreateHashFilter(pb.CreateHashFilterRequest(
               name="g", enable_hash_filter=True, filter_type="bloom")),
           "'bloom'")


# ---------------------------------------------------------------- NOT_FOUND


def test_not_found_unknown_table_and_filter(seeded: RunningServer) -> None:
    stub = seeded.stub
    # The missing name only, not the shard's other tables (issue 12, class 9).
    details = expect(Code.NOT_FOUND, lambda: lookup(stub, "nope", [1]), "'nope'")
    assert details == "no table named 'nope' on shard 0", details
    expect(Code.NOT_FOUND, lambda: stub.Size(pb.SizeRequest(table="nope")), "'nope'")
    expect(Code.NOT_FOUND, lambda: intercept(stub, "nofilter", [1], [[1.0]]), "'nofilter'")
    expect(Code.NOT_FOUND,
           lambda: make_table(stub, "new", configs.table_config(1), hash_filter="nofilter"),
           "'nofilter'")
    expect(Code.NOT_FOUND,
           lambda: stub.FusedLookup(pb.FusedLookupRequest(
               tables=["t", "nope"], blocks=[pb.FusedBlock(table_index=0, num_ids=1)],
               ids=ids_tensor([1]))),
           "'nope'")


def test_not_found_missing_files(seeded: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("ps_server.checkpoint.table_files")
    base = str(tmp_path / "never_saved")
    expect(Code.NOT_FOUND,
           lambda: seeded.stub.RestoreTable(pb.RestoreRequest(table="t", basename=base)),
           "never_saved")


# ---------------------------------------------------------------- ALREADY_EXISTS


def test_already_exists(seeded: RunningServer) -> None:
    stub = seeded.stub
    expect(Code.ALREADY_EXISTS,
           lambda: make_table(stub, "t", configs.table_config(2), hash_filter="f"),
           "'t'", "exists")
    expect(Code.ALREADY_EXISTS,
           lambda: make_table(stub, "t", configs.table_config(4), allow_existing=True),
           "'t'", "different config")
    expect(Code.ALREADY_EXISTS, lambda: make_filter(stub, "f", threshold=5), "'f'")


# ---------------------------------------------------------------- FAILED_PRECONDITION


def test_failed_precondition_serving_table(seeded: RunningServer) -> None:
    stub = seeded.stub
    expect(Code.FAILED_PRECONDITION,
           lambda: stub.ApplyGradients(pb.ApplyGradientsRequest(
               table="serving", ids=ids_tensor([1]), grads=rows_tensor([[1, 1]]),
               learning_rates=[0.1])),
           "'serving'", "SERVING", "apply_gradients")
    expect(Code.FAILED_PRECONDITION,
           lambda: stub.LookupEntry(pb.LookupEntryRequest(table="serving",
                                                          ids=ids_tensor([1]))),
           "'serving'", "lookup_entry")


# ---------------------------------------------------------------- DATA_LOSS


def test_data_loss_corrupt_filter_file(server: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("ps_server.checkpoint.filter_dump")
    stub = server.stub
    seed(stub)
    make_filter(stub, "counting", threshold=3, capacity=100, split_num=7)
    ids, ones = [1, 3 << 17, 1], np.ones((3, 2), dtype=np.float32)
    intercept(stub, "counting", ids, ones)  # docs/semantics.md §3.3 run 1
    base = str(tmp_path / "hash_filter_0")
    files = stub.SaveHashFilter(pb.HashFilterFilesRequest(hash_filter="counting",
                                                          basename=base)).files
    victim = Path(files[0])
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # inside the last record's payload or CRC
    victim.write_bytes(bytes(raw))
    before = snapshot(stub)
    expect(Code.DATA_LOSS,
           lambda: stub.RestoreHashFilter(pb.HashFilterFilesRequest(hash_filter="counting",
                                                                    basename=base)),
           victim.name)
    assert snapshot(stub) == before
    # The live filter is untouched: the example continues with run 2.
    np.testing.assert_array_equal(intercept(stub, "counting", ids, ones),
                                  [[0, 0], [0, 0], [1, 1]])


# ---------------------------------------------------------------- PERMISSION_DENIED


def test_permission_denied_outside_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with start_inprocess_server(data_root=str(root)) as srv:
        stub = srv.stub
        seed(stub)
        before = snapshot(stub)
        for path in ["../outside/t", str(outside / "t"), "link/t", ".", str(root)]:
            save = functools.partial(stub.SaveTable, pb.SaveRequest(table="t", basename=path))
            # The root itself as a file prefix would write <root>_0-... next to the root.
            expect(Code.PERMISSION_DENIED, save, repr(path), "outside the data root")
        expect(Code.PERMISSION_DENIED,
               lambda: stub.RestoreTable(pb.RestoreRequest(table="t", basename="../outside/t")),
               "outside the data root")
        expect(Code.PERMISSION_DENIED,
               lambda: stub.SaveHashFilter(pb.HashFilterFilesRequest(hash_filter="f",
                                                                     basename="/tmp/x")),
               "outside the data root")
        admin = ps_grpc.ParameterServerAdminStub(srv.channel)  # whole checkpoints
        expect(Code.PERMISSION_DENIED,
               lambda: admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="../outside")),
               "outside the data root")
        expect(Code.PERMISSION_DENIED,
               lambda: admin.RestoreCheckpoint(pb.AdminRestoreRequest(
                   model_dir="m", prefix="../x/model.ckpt-1")),
               "outside the data root")
        assert os.listdir(outside) == []
        assert snapshot(stub) == before


def test_relative_path_is_taken_under_data_root(tmp_path: Path) -> None:
    pytest.importorskip("ps_server.checkpoint.table_files")
    with start_inprocess_server(data_root=str(tmp_path)) as srv:
        seed(srv.stub)
        saved = srv.stub.SaveTable(pb.SaveRequest(table="t", basename="sub/emb"))
        assert [os.path.dirname(f) for f in saved.files] == [
            os.path.realpath(tmp_path / "sub")]


# ---------------------------------------------------------------- RESOURCE_EXHAUSTED


def test_resource_exhausted_oversized_request_and_response() -> None:
    with start_inprocess_server(max_message_bytes=64 * 1024) as srv:
        stub = srv.stub
        seed(stub)
        make_table(stub, "wide", configs.table_config(8))
        before = snapshot(stub)
        n = 6000
        # 48 KB of ids + 384 KB of values > 64 KiB: rejected by gRPC itself, before
        # the service sees it; the details give both sizes.
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: assign(stub, "wide", np.arange(n), np.ones((n, 8))),
               "larger than max", "65536")
        # 48 KB of ids fit, but 6000 rows of 8 floats (192 KB) would not fit the
        # answer: the service says which call and which limit.
        expect(Code.RESOURCE_EXHAUSTED,
               lambda: lookup(stub, "wide", np.arange(n)),
               "Lookup", "max_message_bytes=65536")
        assert snapshot(stub) == before


# ---------------------------------------------------------------- INTERNAL


class _BuggyShard(Shard):
    """A shard whose table lookup has a bug for one name (nothing else can make one)."""

    def table_slot(self, name: str) -> TableSlot:
        if name == "buggy":
            raise RuntimeError("secret internals of the bug")
        return super().table_slot(name)


def test_internal_error_is_opaque(caplog: pytest.LogCaptureFixture) -> None:
    shard = _BuggyShard()
    with start_inprocess_server(shard=shard) as srv:
        stub = srv.stub
        seed(stub)
        before = snapshot(stub)
        details = expect(Code.INTERNAL, lambda: lookup(stub, "buggy", [1]),
                         "Lookup", "internal error")
        assert "secret" not in details
        assert "secret internals of the bug" in caplog.text  # the traceback is logged
        assert snapshot(stub) == before


def test_status_details_are_truncated_for_trailers(server: RunningServer) -> None:
    # The unknown-table message names the missing table; a lookup of a very long name
    # makes it long, and it must be cut to fit gRPC's trailer limit and still reach the
    # client. (It listed every table on the shard before issue 12.)
    name = "nope_" + "long_table_name_" * 400
    details = expect(Code.NOT_FOUND, lambda: lookup(server.stub, name, [1]), "'nope_long")
    assert details.endswith("(truncated)")
    assert len(details) == 2000  # the cut, suffix included, stays within the limit
