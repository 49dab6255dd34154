"""Checkpoint identity on real servers: one file stem per live name, and a manifest
that knows every file it lists (docs/semantics.md §6.5, §13.6; issue 12, classes 1, 3).

* Names that map to one file stem (``/``, ``:`` and ``-`` are all written ``-``) cannot
  coexist: the second creation is refused (ALREADY_EXISTS) naming the first, through
  ``PsClient.create_table`` and through the raw RPCs.
* A table ``x_1`` and a table ``x`` (whose shard-1 parts are ``x_1-…``) restore from
  their own files only.
* A part truncated at a record boundary, emptied, with one bit flipped, or two
  tables' files swapped: restore answers DATA_LOSS naming the file, nothing changes.
* A save that did not reach every shard is not committed, nor a commit without a save.
* The index names the highest committed step; ``max_to_keep`` keeps the highest steps;
  two trainers saving into one ``model_dir`` at once leave the highest step, whole.
* Filter state saved by another shard count is refused (nothing changes) unless
  ``reset_filters``: then the tables restore exactly, the filters start empty, and the
  response, the shard's WARNING and the client name them (issue 12, class 4).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_client import (
    PsAlreadyExists,
    PsClient,
    PsDataLoss,
    PsFailedPrecondition,
    PsInvalidArgument,
)
from ps_client.testing import local_cluster
from ps_server.engine import configs
from tests.integration.conftest import RunningServer, start_inprocess_server
from tests.integration.test_admin import (
    T0,
    admin,
    cluster,
    expect_error,
    fill_cluster,
    save_all,
    values_of,
)
from tests.integration.test_service import assign, lookup, make_filter, make_table

pytestmark = pytest.mark.integration
codes = grpc.StatusCode


def test_names_with_one_file_stem_are_refused_through_the_client(tmp_path: Path) -> None:
    with local_cluster(2, data_root=str(tmp_path)) as shards, \
            PsClient(shards.addresses, timeout=30) as client:
        first = client.create_table(configs.table_config(2), name="scope/emb")
        first.assign([1, 2], [[1.0, 2.0], [3.0, 4.0]])
        for other in ("scope:emb", "scope-emb"):
            with pytest.raises(PsAlreadyExists, match="'scope/emb'"):
                client.create_table(configs.table_config(2), name=other)
        with pytest.raises(PsInvalidArgument, match="reserved"):
            client.create_table(configs.table_config(2), name="hash_filter_0")
        assert "scope:emb" not in client.tables() and "scope-emb" not in client.tables()
        client.save_checkpoint("model", 1)
        first.assign([1, 2], [[0.0, 0.0], [0.0, 0.0]])
        client.restore_checkpoint("model")
        np.testing.assert_array_equal(first.lookup([1, 2]), [[1.0, 2.0], [3.0, 4.0]])


def test_names_with_one_file_stem_are_refused_through_the_rpcs() -> None:
    with start_inprocess_server() as srv:
        make_table(srv.stub, "a/b", configs.table_config(1))
        expect_error(lambda: make_table(srv.stub, "a:b", configs.table_config(1)),
                     codes.ALREADY_EXISTS, "'a:b' cannot be created", "'a/b' exists")
        make_filter(srv.stub, "f/1")
        expect_error(lambda: make_filter(srv.stub, "f-1"),
                     codes.ALREADY_EXISTS, "'f/1' exists")
        expect_error(lambda: make_table(srv.stub, "hash_filter", configs.table_config(1)),
                     codes.INVALID_ARGUMENT, "reserved")
        assert list(srv.stub.ListTables(pb.ListTablesRequest()).names) == ["a/b"]


def test_table_x_1_and_table_x_restore_from_their_own_files(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as old:
        fill_cluster(old, "x", [0, 1, 2, 3])
        fill_cluster(old, "x_1", [20, 21])
        save_all(old, model_dir, step=3)
    # shard 1's part of x looks like Monolith's one-file layout of a table x_1
    assert os.path.exists(f"{model_dir}/model.ckpt-3.assets/x_1-00000-of-00001")
    with cluster(2) as new:
        for s in new:
            admin(s).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir=model_dir))
        sizes = {name: sum(s.stub.Size(pb.SizeRequest(table=name)).size for s in new)
                 for name in ("x", "x_1")}
        assert sizes == {"x": 4, "x_1": 2}
        np.testing.assert_array_equal(lookup(new[0].stub, "x_1", [20]), values_of([20]))


def _boundaries(path: Path) -> list[int]:
    data = path.read_bytes()
    pos, out = 0, [0]
    while pos < len(data):
        pos += int.from_bytes(data[pos : pos + 8], "little") + 16
        out.append(pos)
    return out


def _truncate_at_record(part: Path, other: Path) -> None:
    part.write_bytes(part.read_bytes()[: _boundaries(part)[-2]])


def _empty(part: Path, other: Path) -> None:
    part.write_bytes(b"")


def _flip(part: Path, other: Path) -> None:
    data = bytearray(part.read_bytes())
    data[_boundaries(part)[2] - 6] ^= 0x01  # inside the second record's data
    part.write_bytes(bytes(data))


def _swap(part: Path, other: Path) -> None:
    a, b = part.read_bytes(), other.read_bytes()
    part.write_bytes(b)
    other.write_bytes(a)


@pytest.mark.parametrize(("damage", "words"), [
    (_truncate_at_record, "bytes, the manifest records"),
    (_empty, "it has 0 bytes"),
    (_flip, "CRC-32C"),
    (_swap, "does not match the checkpoint's manifest"),
], ids=["truncated-at-a-record", "emptied", "one-bit-flipped", "two-tables-swapped"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(
    tmp_path: Path, damage: Callable[[Path, Path], None], words: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    ids = list(range(0, 60))
    with cluster(2, data_root=str(root)) as old:
        fill_cluster(old, "emb", ids)
        fill_cluster(old, "other", [i + 1000 for i in ids])
        save_all(old, "model", step=4)
        assets = root / "model" / "model.ckpt-4.assets"
        part, other = assets / "emb_1-00000-of-00001", assets / "other_1-00000-of-00001"
        damage(part, other)
        # The live cluster, changed since the save: a refused restore changes nothing.
        for k, s in enumerate(old):
            own = [i for i in ids if i % 2 == k]
            assign(s.stub, "emb", own, 3 * values_of(own), req_time=T0)
        before = [lookup(s.stub, "emb", ids) for s in old]
        for s in old:
            details = expect_error(
                lambda s=s: admin(s).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="model")),
                codes.DATA_LOSS, str(part) if damage is not _swap else "model.ckpt-4.assets/")
            assert words in details, details
        after = [lookup(s.stub, "emb", ids) for s in old]
        for k, (b, a) in enumerate(zip(before, after, strict=True)):
            np.testing.assert_array_equal(a, b)
            own = [i for i in ids if i % 2 == k]
            np.testing.assert_array_equal(lookup(old[k].stub, "emb", own), 3 * values_of(own))
    with start_inprocess_server(data_root=str(root)) as fresh:
        expect_error(
            lambda: admin(fresh).RestoreCheckpoint(pb.AdminRestoreRequest(model_dir="model")),
            codes.DATA_LOSS, words)
        assert list(fresh.stub.ListTables(pb.ListTablesRequest()).names) == []


def test_the_client_sees_data_loss_for_a_damaged_part(tmp_path: Path) -> None:
    with local_cluster(1, data_root=str(tmp_path)) as shards, \
            PsClient(shards.addresses, timeout=30) as client:
        t = client.create_table(configs.table_config(2), name="emb")
        t.assign([1, 2, 3], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], req_time=T0)
        prefix = client.save_checkpoint("model", 2)
        (part,) = Path(prefix + ".assets").glob("emb_0-*")
        _truncate_at_record(part, part)
        t.assign([1], [[9.0, 9.0]])
        with pytest.raises(PsDataLoss, match=part.name):
            client.restore_checkpoint("model")
        np.testing.assert_array_equal(t.lookup([1, 2]), [[9.0, 9.0], [2.0, 2.0]])


def test_a_save_that_missed_a_shard_commits_nothing(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as servers:
        fill_cluster(servers, "emb", [1, 2, 3])
        save_all(servers, model_dir, step=1)
        req = pb.AdminSaveRequest(model_dir=model_dir, global_step=2, max_to_keep=1)
        admin(servers[0]).SaveCheckpoint(req)  # shard 1 is not reached
        expect_error(lambda: admin(servers[0]).CommitCheckpoint(req),
                     codes.FAILED_PRECONDITION, "shard(s) 1 of 2", "model.ckpt-2.parts-1.json")
        index = Path(model_dir, "checkpoint").read_text()
        assert 'model_checkpoint_path: "model.ckpt-1"' in index
        assert os.path.isdir(f"{model_dir}/model.ckpt-1.assets")  # max_to_keep deleted nothing


def test_a_commit_without_a_save_commits_nothing(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as servers:
        fill_cluster(servers, "emb", [1, 2, 3])
        save_all(servers, model_dir, step=1)
        index, before = Path(model_dir, "checkpoint").read_text(), sorted(os.listdir(model_dir))
        req = pb.AdminSaveRequest(model_dir=model_dir, global_step=2, max_to_keep=1)
        expect_error(lambda: admin(servers[0]).CommitCheckpoint(req),
                     codes.FAILED_PRECONDITION, "nothing was saved at step 2",
                     "save on every shard first")
        assert Path(model_dir, "checkpoint").read_text() == index
        assert sorted(os.listdir(model_dir)) == before
        # The repeated commit of a committed step still works.
        again = pb.AdminSaveRequest(model_dir=model_dir, global_step=1, max_to_keep=1)
        assert admin(servers[0]).CommitCheckpoint(again).prefix == f"{model_dir}/model.ckpt-1"
        assert Path(model_dir, "checkpoint").read_text() == index


def test_the_index_names_the_highest_step_and_keeps_the_highest(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as servers:
        fill_cluster(servers, "emb", [1, 2, 3])
        save_all(servers, model_dir, step=20, max_to_keep=2)
        save_all(servers, model_dir, step=10, max_to_keep=2)
        index = Path(model_dir, "checkpoint").read_text()
        assert index.splitlines() == [
            'model_checkpoint_path: "model.ckpt-20"',
            'all_model_checkpoint_paths: "model.ckpt-10"',
            'all_model_checkpoint_paths: "model.ckpt-20"',
        ]
        req = pb.AdminSaveRequest(model_dir=model_dir, global_step=5, max_to_keep=2)
        for s in servers:
            admin(s).SaveCheckpoint(req)
        expect_error(lambda: admin(servers[0]).CommitCheckpoint(req),
                     codes.FAILED_PRECONDITION, "model.ckpt-5 is not among the 2 highest",
                     "kept: 10, 20", "nothing was committed or deleted")
        assert Path(model_dir, "checkpoint").read_text() == index
        assert os.path.isdir(f"{model_dir}/model.ckpt-10.assets")
        resolved = admin(servers[1]).RestoreCheckpoint(pb.AdminRestoreRequest(
            model_dir=model_dir, validate_only=True))
        assert resolved.prefix == f"{model_dir}/model.ckpt-20"


def test_two_clients_saving_at_once_leave_the_highest_step(tmp_path: Path) -> None:
    """Two trainers checkpoint steps 10 and 20 into one model_dir at the same time with
    max_to_keep=1: the commits take turns on the directory's lock, and step 20 is the
    one left, whole."""
    with local_cluster(2, data_root=str(tmp_path)) as shards, \
            PsClient(shards.addresses, timeout=30) as first, \
            PsClient(shards.addresses, timeout=30) as second:
        t = first.create_table(configs.table_config(2), name="emb")
        ids = [1, 2, 3, 4, 5]
        t.assign(ids, [[float(i), -float(i)] for i in ids])
        for _ in range(3):
            shutil.rmtree(tmp_path / "model", ignore_errors=True)
            outcomes: dict[int, BaseException | None] = {}

            def save(client: PsClient, step: int) -> None:
                try:
                    client.save_checkpoint("model", step, max_to_keep=1)
                    outcomes[step] = None  # noqa: B023
                except PsFailedPrecondition as e:
                    outcomes[step] = e  # noqa: B023

            threads = [threading.Thread(target=save, args=(c, s))
                       for c, s in ((first, 10), (second, 20))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert outcomes[20] is None
            if outcomes[10] is not None:  # 20 committed first: 10 would go at once
                assert "not among the 1 highest committed steps (kept: 20)" in str(outcomes[10])
            index = (tmp_path / "model" / "checkpoint").read_text()
            assert index.splitlines() == ['model_checkpoint_path: "model.ckpt-20"',
                                          'all_model_checkpoint_paths: "model.ckpt-20"']
            assert not (tmp_path / "model" / "model.ckpt-10.assets" / "manifest.json").exists()
            t.assign(ids, [[0.0, 0.0]] * len(ids))
            assert second.restore_checkpoint("model") is not None  # every file checked
            np.testing.assert_array_equal(t.lookup(ids), [[float(i), -float(i)] for i in ids])


# ---------------------------------------------------------------- filters across shard counts


def filtered_cluster(servers: list[RunningServer], ids: list[int]) -> None:
    """Table ``emb`` behind sliding filter ``gate`` (threshold 1) on every shard; every id
    admitted (its second occurrence), so the filters hold counts."""
    n = len(servers)
    for s in servers:
        make_filter(s.stub, "gate", threshold=1, capacity=1000, split_num=5)
        make_table(s.stub, "emb", configs.table_config(2), hash_filter="gate")
    for k, s in enumerate(servers):
        own = [i for i in ids if i % n == k]
        for _ in range(2):
            assign(s.stub, "emb", own, values_of(own), req_time=T0)


def fill_ratios(servers: list[RunningServer]) -> list[float]:
    return [f.fill_ratio for s in servers
            for f in admin(s).Stats(pb.StatsRequest()).hash_filters if f.name == "gate"]


FILTER_IDS = [-4, -3, 0, 1, 2, 5, 8, 11]


@pytest.mark.parametrize("target", [1, 3])
def test_filters_saved_by_another_shard_count_are_refused_or_reset(
    tmp_path: Path, target: int, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as old:
        filtered_cluster(old, FILTER_IDS)
        save_all(old, model_dir, step=4)
    prefix = f"{model_dir}/model.ckpt-4"
    with cluster(target) as new:
        filtered_cluster(new, [100])  # live entries and filter counts
        before = fill_ratios(new)
        assert max(before) > 0
        for validate_only in (True, False):
            for s in new:
                expect_error(
                    lambda s=s, v=validate_only: admin(s).RestoreCheckpoint(
                        pb.AdminRestoreRequest(model_dir=model_dir, validate_only=v)),
                    codes.FAILED_PRECONDITION, f"checkpoint {prefix}",
                    f"this cluster's {target}", "'gate' (sliding_hash_filter, saved by 2 shards)",
                    "nothing was restored", "reset_filters")
        assert fill_ratios(new) == before
        owner = new[100 % target]
        np.testing.assert_array_equal(lookup(owner.stub, "emb", [100]), values_of([100]))

        with caplog.at_level(logging.WARNING, logger="ps_server.runtime"):
            answers = [admin(s).RestoreCheckpoint(pb.AdminRestoreRequest(
                model_dir=model_dir, reset_filters=True)) for s in new]
        assert [list(a.reset_filters) for a in answers] == [["gate"]] * target
        assert fill_ratios(new) == [0.0] * target
        for k, s in enumerate(new):
            own = [i for i in FILTER_IDS if i % target == k]
            np.testing.assert_array_equal(lookup(s.stub, "emb", own), values_of(own))
        assert sum(admin(s).Stats(pb.StatsRequest()).entries for s in new) == len(FILTER_IDS)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and "reset to empty" in r.getMessage()]
        assert len(warnings) == target
        assert all("'gate'" in w and prefix in w for w in warnings)


def test_filters_keep_their_state_into_the_same_shard_count(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with cluster(2) as old:
        filtered_cluster(old, FILTER_IDS)
        saved = fill_ratios(old)
        save_all(old, model_dir, step=4)
    with cluster(2) as new:
        answers = [admin(s).RestoreCheckpoint(pb.AdminRestoreRequest(
            model_dir=model_dir, reset_filters=True)) for s in new]
        assert [list(a.reset_filters) for a in answers] == [[], []]
        assert fill_ratios(new) == saved


def test_the_client_refuses_or_resets_and_names_the_filters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with local_cluster(2, data_root=str(tmp_path)) as shards, \
            PsClient(shards.addresses, timeout=30) as client:
        gate = client.create_hash_filters(True, capacity=1000, split_num=5, name_suffix="_g")
        t = client.create_table(configs.table_config(2), name="emb", hash_filters=gate)
        t.assign(FILTER_IDS, values_of(FILTER_IDS))
        prefix = client.save_checkpoint("model", 2)
    with local_cluster(3, data_root=str(tmp_path)) as shards, \
            PsClient(shards.addresses, timeout=30) as client:
        with pytest.raises(PsFailedPrecondition, match="'MonolithHashFilter_g' "
                                                       r"\(sliding_hash_filter, saved by 2"):
            client.restore_checkpoint("model")
        assert client.tables() == []
        with caplog.at_level(logging.WARNING, logger="ps_client.async_client"):
            restored = client.restore_checkpoint("model", reset_filters=True)
        assert restored == prefix
        assert getattr(restored, "reset_filters", None) == ("MonolithHashFilter_g",)
        assert any("'MonolithHashFilter_g' reset to empty" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
        np.testing.assert_array_equal(client.table("emb").lookup(FILTER_IDS),
                                      values_of(FILTER_IDS))
