"""Confinement through every path component (issue 12, class 5).

A shard started with ``--data_root`` checks the path a request names, and then every
file and directory the checkpoint code derives below it (assets directory, part
files, part lists, manifest, ``checkpoint`` index, the checkpoints ``max_to_keep``
deletes): a symbolic link planted inside the root at any of those levels and leading
out of it is refused with PERMISSION_DENIED, and nothing outside the root is read,
written or deleted. A tampered manifest naming paths instead of file names is
DATA_LOSS. Error messages never quote the contents of a file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.checkpoint.checkpoints import _manifest_checksum
from ps_server.engine import configs
from tests.integration.conftest import start_inprocess_server
from tests.integration.test_service import assign, lookup, make_filter, make_table

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
SECRET = "SECRET-7d1f0a: the first line of a file outside the data root"
ROWS = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


@dataclass
class Rooted:
    srv: Any
    admin: ps_grpc.ParameterServerAdminStub
    root: Path
    outside: Path

    def snapshot(self) -> dict[str, tuple[int, bytes]]:
        """Every file and directory outside the root: its mtime and content."""
        seen: dict[str, tuple[int, bytes]] = {}
        for dirpath, dirnames, filenames in os.walk(self.outside):
            seen[dirpath] = (os.stat(dirpath).st_mtime_ns, b"")
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p):
                    seen[p] = (os.stat(p).st_mtime_ns, Path(p).read_bytes())
        return seen

    def save(self, model_dir: str, step: int, max_to_keep: int = 0) -> None:
        self.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir=model_dir, global_step=step))
        self.admin.CommitCheckpoint(pb.AdminSaveRequest(
            model_dir=model_dir, global_step=step, max_to_keep=max_to_keep))

    def restore(self, model_dir: str, prefix: str = "", validate_only: bool = False) -> Any:
        return self.admin.RestoreCheckpoint(pb.AdminRestoreRequest(
            model_dir=model_dir, prefix=prefix, validate_only=validate_only))

    def rows(self) -> np.ndarray:
        return lookup(self.srv.stub, "t", [1, 2, 3])


@pytest.fixture
def rooted(tmp_path: Path) -> Iterator[Rooted]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET + "\nsecond line\n")
    with start_inprocess_server(data_root=str(root)) as srv:
        make_filter(srv.stub, "f", split_num=5)
        make_table(srv.stub, "t", configs.table_config(2))
        make_table(srv.stub, "g", configs.table_config(2), hash_filter="f")  # saves f
        assign(srv.stub, "t", [1, 2, 3], ROWS)
        yield Rooted(srv, ps_grpc.ParameterServerAdminStub(srv.channel), root, outside)


def expect(code: grpc.StatusCode, call: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    details = str(err.details())
    assert err.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    assert "SECRET" not in details, details
    return details


def _assets(r: Rooted, model_dir: str, step: int) -> Path:
    return r.root / model_dir / f"model.ckpt-{step}.assets"


def _move_out(r: Rooted, path: Path) -> Path:
    """Move ``path`` outside the root (same content) and leave a link to it in its place."""
    target = r.outside / path.name
    shutil.move(str(path), str(target))
    path.symlink_to(target)
    return target


# ---------------------------------------------------------------- save and commit


def test_a_symlinked_assets_directory_is_refused_on_save_and_commit(rooted: Rooted) -> None:
    r = rooted
    (r.root / "m").mkdir()
    _assets(r, "m", 5).symlink_to(r.outside)
    before = r.snapshot()
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=5)),
           "outside the data root")
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.CommitCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=5)),
           "outside the data root")
    assert r.snapshot() == before
    assert sorted(os.listdir(r.root / "m")) == ["model.ckpt-5.assets"]  # no index, no parts

    # A link deeper down (model_dir's parent) leads out as well.
    (r.root / "deep").symlink_to(r.outside)
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="deep/m",
                                                              global_step=1)),
           "outside the data root")
    assert r.snapshot() == before


def test_a_symlinked_part_list_is_refused_on_save_and_commit(rooted: Rooted) -> None:
    r = rooted
    r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=2))
    target = _move_out(r, r.root / "m" / "model.ckpt-2.parts-0.json")
    before = r.snapshot()
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.CommitCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=2)),
           "part list", "outside the data root")
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=2)),
           "part list", "outside the data root")
    assert r.snapshot() == before
    assert target.exists()
    assert not (r.root / "m" / "checkpoint").exists()
    assert not (_assets(r, "m", 2) / "manifest.json").exists()


def test_a_symlinked_index_is_neither_read_nor_quoted(rooted: Rooted) -> None:
    r = rooted
    (r.root / "m").mkdir()
    (r.root / "m" / "checkpoint").symlink_to(r.outside / "secret.txt")
    before = r.snapshot()
    expect(Code.PERMISSION_DENIED, lambda: r.restore("m"),
           "checkpoint index", "outside the data root")
    r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=1))
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.CommitCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=1)),
           "checkpoint index", "outside the data root")
    assert r.snapshot() == before
    assert os.path.islink(r.root / "m" / "checkpoint")


def test_an_unparsable_index_inside_the_root_is_named_not_quoted(rooted: Rooted) -> None:
    r = rooted
    (r.root / "m").mkdir()
    (r.root / "m" / "checkpoint").write_text(SECRET + "\n")
    details = expect(Code.DATA_LOSS, lambda: r.restore("m"), "checkpoint", "line 1")
    assert "7d1f0a" not in details
    (r.root / "m" / "checkpoint").write_bytes(b"\xffSECRET\n")
    expect(Code.DATA_LOSS, lambda: r.restore("m"), "not UTF-8")


def test_an_index_naming_checkpoints_outside_deletes_nothing_there(rooted: Rooted) -> None:
    r = rooted
    r.save("m", 1)
    # A checkpoint-looking set of files outside, named by the index as the oldest.
    (r.outside / "model.ckpt-0.assets").mkdir()
    (r.outside / "model.ckpt-0.assets" / "keep").write_text("keep")
    (r.outside / "model.ckpt-0.index").write_text("keep")
    index = r.root / "m" / "checkpoint"
    index.write_text(
        f'model_checkpoint_path: "model.ckpt-1"\n'
        f'all_model_checkpoint_paths: "{r.outside}/model.ckpt-0"\n'
        f'all_model_checkpoint_paths: "model.ckpt-1"\n'
    )
    before, index_before = r.snapshot(), index.read_text()
    r.admin.SaveCheckpoint(pb.AdminSaveRequest(model_dir="m", global_step=2))
    expect(Code.PERMISSION_DENIED,
           lambda: r.admin.CommitCheckpoint(pb.AdminSaveRequest(
               model_dir="m", global_step=2, max_to_keep=1)),
           "to be deleted", "outside the data root")
    assert r.snapshot() == before
    assert index.read_text() == index_before
    assert not (_assets(r, "m", 2) / "manifest.json").exists()


# ---------------------------------------------------------------- restore


@pytest.mark.parametrize("what", ["table part", "filter file", "manifest"])
def test_a_symlinked_checkpoint_file_is_refused_on_restore(rooted: Rooted, what: str) -> None:
    r = rooted
    r.save("m", 3)
    assets = _assets(r, "m", 3)
    name = {
        "table part": "t_0-00000-of-00001",
        "filter file": "hash_filter_0-00000-of-00005",
        "manifest": "manifest.json",
    }[what]
    # The link leads to an identical copy: only confinement refuses it.
    _move_out(r, assets / name)
    assign(r.srv.stub, "t", [1, 2, 3], np.zeros((3, 2)))
    before = r.snapshot()
    for validate_only in (True, False):
        expect(Code.PERMISSION_DENIED, lambda v=validate_only: r.restore("m", validate_only=v),
               what, name, "outside the data root")
    assert r.snapshot() == before
    np.testing.assert_array_equal(r.rows(), np.zeros((3, 2)))  # nothing changed

    # Back in place, the same checkpoint restores.
    os.unlink(assets / name)
    shutil.move(str(r.outside / name), str(assets / name))
    r.restore("m")
    np.testing.assert_array_equal(r.rows(), ROWS)


def test_a_symlinked_assets_directory_is_refused_on_restore(rooted: Rooted) -> None:
    r = rooted
    r.save("m", 4)
    _move_out(r, _assets(r, "m", 4))
    before = r.snapshot()
    expect(Code.PERMISSION_DENIED, lambda: r.restore("m"),
           "assets directory", "outside the data root")
    expect(Code.PERMISSION_DENIED, lambda: r.restore("m", prefix="model.ckpt-4"),
           "assets directory", "outside the data root")
    assert r.snapshot() == before


def _tamper(r: Rooted, model_dir: str, step: int, change: Callable[[dict[str, Any]], None],
            *, reseal: bool = True) -> None:
    path = _assets(r, model_dir, step) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:  # the checksum is no secret: a tamperer recomputes it
        manifest["manifest_crc32c"] = _manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("reseal", [True, False])
def test_a_tampered_manifest_naming_paths_is_data_loss(rooted: Rooted, reseal: bool) -> None:
    r = rooted
    r.save("m", 6)
    (r.root / "m" / "x").write_text("inside, but not a file of this checkpoint")

    def table_file(manifest: dict[str, Any]) -> None:
        facts = manifest["files"].pop("t_0-00000-of-00001")
        manifest["files"]["../x"] = facts
        manifest["tables"]["t"]["files"] = ["../x"]

    def outside_file(manifest: dict[str, Any]) -> None:
        facts = manifest["files"].pop("t_0-00000-of-00001")
        bad = str(r.outside / "secret.txt")
        manifest["files"][bad] = facts
        manifest["tables"]["t"]["files"] = [bad]

    def filter_stem(manifest: dict[str, Any]) -> None:
        manifest["hash_filters"]["f"]["file_stem"] = "../../../outside/hash_filter"

    assign(r.srv.stub, "t", [1, 2, 3], np.zeros((3, 2)))
    before = r.snapshot()
    for change in (table_file, outside_file, filter_stem):
        r.save("m", 6)  # a fresh, good manifest
        _tamper(r, "m", 6, change, reseal=reseal)
        expect(Code.DATA_LOSS, lambda: r.restore("m", validate_only=True), "manifest")
        expect(Code.DATA_LOSS, lambda: r.restore("m"), "manifest")
        np.testing.assert_array_equal(r.rows(), np.zeros((3, 2)))
    assert r.snapshot() == before


# ---------------------------------------------------------------- table and filter files


def test_symlinked_table_and_filter_files_are_refused(rooted: Rooted) -> None:
    r = rooted
    stub = r.srv.stub
    stub.SaveTable(pb.SaveRequest(table="t", basename="d/t"))
    stub.SaveHashFilter(pb.HashFilterFilesRequest(hash_filter="f", basename="d/f"))
    _move_out(r, r.root / "d" / "t_0-00000-of-00001")
    _move_out(r, r.root / "d" / "f-00001-of-00005")
    before = r.snapshot()
    expect(Code.PERMISSION_DENIED,
           lambda: stub.RestoreTable(pb.RestoreRequest(table="t", basename="d/t")),
           "table part", "outside the data root")
    expect(Code.PERMISSION_DENIED,
           lambda: stub.RestoreHashFilter(pb.HashFilterFilesRequest(
               hash_filter="f", basename="d/f")),
           "filter file", "outside the data root")
    assert r.snapshot() == before
