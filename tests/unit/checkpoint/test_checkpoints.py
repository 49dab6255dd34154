"""Checkpoint directories (docs/semantics.md §6.5): layout, manifest, index, restore."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.checkpoint.checkpoints import (
    commit_checkpoint,
    file_stem,
    latest_checkpoint,
    read_checkpoint_index,
    restore_shard_checkpoint,
    save_shard_checkpoint,
)
from ps_server.checkpoint.entry_dump import lookup_entry
from ps_server.engine import configs
from ps_server.engine.shard import FilterOptions, Shard
from ps_server.errors import CheckpointCorruptError, ConfigMismatchError, FailedPreconditionError

f32 = np.float32
FILTER = "MonolithHashFilter"
TABLE = "scope/emb:0"
# Sliding filter admitting an id from its third occurrence (old count 2 >= threshold 2).
THRESHOLD_2 = eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=2).SerializeToString()
OPTIONS = FilterOptions(capacity=1000, split_num=7, occurrence_threshold_config=THRESHOLD_2)
CONFIG = configs.table_config(2, optimizer=configs.adagrad())


def cluster(n: int, tables: tuple[str, ...] = (TABLE,), **table_kw: object) -> list[Shard]:
    shards = [Shard(i, n) for i in range(n)]
    for shard in shards:
        shard.create_hash_filter(FILTER, OPTIONS)
        for name in tables:
            shard.create_table(name, CONFIG, hash_filter=FILTER, **table_kw)  # type: ignore[arg-type]
    return shards


def assign(shards: list[Shard], name: str, ids: list[int], values: list[float], ts: int) -> None:
    arr = np.asarray(ids, dtype=np.int64)
    vals = np.repeat(np.asarray(values, dtype=f32)[:, None], 2, axis=1)
    n = len(shards)
    for shard in shards:
        mine = np.mod(arr, n) == shard.shard_index
        # The table's filter counts new ids; admit them by writing three times.
        for _ in range(3):
            shard.table(name).assign(arr[mine], vals[mine], req_time=ts)


def lookup(shards: list[Shard], name: str, ids: list[int]) -> np.ndarray:
    n = len(shards)
    return np.stack([shards[i % n].table(name).lookup([i])[0] for i in ids])


def checkpoint(shards: list[Shard], model_dir: Path, step: int, max_to_keep: int = 0) -> str:
    for shard in shards:
        save_shard_checkpoint(shard, str(model_dir), step)
    return commit_checkpoint(shards[0], str(model_dir), step, max_to_keep).prefix


IDS = [-3, -2, -1, 0, 1, 2, 3, 4]
VALS = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]


def test_layout_manifest_and_index(tmp_path: Path) -> None:
    shards = cluster(2, saver_parallel=2, extra_restore_names=("legacy/x",))
    assign(shards, TABLE, IDS, VALS, ts=10)
    prefix = checkpoint(shards, tmp_path, 7)
    assert prefix == str(tmp_path / "model.ckpt-7")
    assert file_stem(TABLE) == "scope-emb-0"
    assets = sorted(os.listdir(tmp_path / "model.ckpt-7.assets"))
    expected = ["manifest.json"]
    expected += [f"hash_filter_{i}-{k:05d}-of-00007" for i in (0, 1) for k in range(7)]
    expected += [f"scope-emb-0_{i}-{k:05d}-of-00002" for i in (0, 1) for k in range(2)]
    assert assets == sorted(expected)
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "model.ckpt-7"\n'
        'all_model_checkpoint_paths: "model.ckpt-7"\n'
    )
    manifest = json.loads((tmp_path / "model.ckpt-7.assets" / "manifest.json").read_text())
    assert manifest["global_step"] == 7 and manifest["num_shards"] == 2
    decl = manifest["tables"][TABLE]
    assert decl["hash_filter"] == FILTER and decl["saver_parallel"] == 2
    assert decl["extra_restore_names"] == ["legacy/x"]
    assert manifest["hash_filters"][FILTER]["file_stem"] == "hash_filter"
    assert manifest["hash_filters"][FILTER]["split_num"] == 7


def test_empty_shards_rebuild_everything_from_the_checkpoint(tmp_path: Path) -> None:
    shards = cluster(2, saver_parallel=2, extra_restore_names=("legacy/x",))
    assign(shards, TABLE, IDS, VALS, ts=10)
    # two occurrences of id 40 in shard 0's filter (old counts 0, 1: both filtered)
    grads = shards[0].intercept_gradient(FILTER, [40, 40], np.ones((2, 1), dtype=f32))
    np.testing.assert_array_equal(grads, [[0.0], [0.0]])
    prefix = checkpoint(shards, tmp_path, 3)

    fresh = [Shard(i, 2) for i in range(2)]
    for shard in fresh:
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False)
        assert result.prefix == prefix and result.tables == [TABLE]
        slot = shard.table_slot(TABLE)
        assert slot.config_bytes == CONFIG.SerializeToString(deterministic=True)
        assert (slot.hash_filter, slot.saver_parallel) == (FILTER, 2)
        assert slot.extra_restore_names == ("legacy/x",)
        assert shard.hash_filter(FILTER).options == OPTIONS
        assert result.entries == 4
    for old, new in zip(shards, fresh, strict=True):
        ids = old.table(TABLE).export_columns().ids.copy()
        assert lookup_entry(new.table(TABLE), ids) == lookup_entry(old.table(TABLE), ids)
    np.testing.assert_array_equal(lookup(fresh, TABLE, IDS)[:, 0], VALS)
    # the filter state came back: the third occurrence of 40 passes (old count 2 >= 2)
    grads = fresh[0].intercept_gradient(FILTER, [40], np.ones((1, 1), dtype=f32))
    np.testing.assert_array_equal(grads, [[1.0]])


def test_crash_between_save_and_commit_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)
    first = checkpoint(shards, tmp_path, 1)
    assign(shards, TABLE, IDS, [v + 100 for v in VALS], ts=20)
    for shard in shards:  # step 2 written, but the process dies before commit
        save_shard_checkpoint(shard, str(tmp_path), 2)
    assert (tmp_path / "model.ckpt-2.assets").is_dir()
    assert latest_checkpoint(str(tmp_path)) == first
    for shard in shards:
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False)
        assert result.prefix == first
    np.testing.assert_array_equal(lookup(shards, TABLE, IDS)[:, 0], VALS)
    assert all(s.table(TABLE).size() == 4 for s in shards)


def test_max_to_keep_deletes_whole_checkpoints(tmp_path: Path) -> None:
    shards = cluster(1)
    assign(shards, TABLE, [1], [1.0], ts=1)
    (tmp_path / "model.ckpt-1.index").write_text("tf")
    (tmp_path / "model.ckpt-10.assets").mkdir()
    for step in (1, 2, 3):
        checkpoint(shards, tmp_path, step, max_to_keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint", "model.ckpt-10.assets", "model.ckpt-2.assets", "model.ckpt-3.assets",
    ]
    latest, listed = read_checkpoint_index(str(tmp_path))
    assert (latest, listed) == ("model.ckpt-3", ["model.ckpt-2", "model.ckpt-3"])


def test_prefix_rule_matches_p_dash_or_underscore_not_p_star(tmp_path: Path) -> None:
    shards = cluster(1, tables=("a", "ab"))
    assign(shards, "a", [1, 2], [1.0, 2.0], ts=5)
    assign(shards, "ab", [3, 4, 5], [3.0, 4.0, 5.0], ts=5)
    checkpoint(shards, tmp_path, 1)
    fresh = Shard(0, 1)
    restore_shard_checkpoint(fresh, str(tmp_path), None, False)
    assert fresh.table("a").size() == 2 and fresh.table("ab").size() == 3
    np.testing.assert_array_equal(fresh.table("a").lookup([1, 2, 3])[:, 0], [1.0, 2.0, 0.0])

    only_ab = cluster(1, tables=("ab",))
    assign(only_ab, "ab", [3], [3.0], ts=5)
    checkpoint(only_ab, tmp_path / "m2", 1)
    live = cluster(1, tables=("a",))[0]
    with pytest.raises(ConfigMismatchError, match="'a'"):
        restore_shard_checkpoint(live, str(tmp_path / "m2"), None, False)
    assert "ab" not in live.tables


def test_restore_from_another_tables_name(tmp_path: Path) -> None:
    old = cluster(1, tables=("old:name",))
    assign(old, "old:name", [7, 8], [7.0, 8.0], ts=3)
    checkpoint(old, tmp_path, 5)
    assert os.path.exists(tmp_path / "model.ckpt-5.assets" / "old-name_0-00000-of-00001")
    new = cluster(1, tables=())[0]
    new.create_table("new", CONFIG, hash_filter=FILTER, extra_restore_names=("old:name",))
    result = restore_shard_checkpoint(new, str(tmp_path), "model.ckpt-5", False)
    assert result.tables == ["new", "old:name"]  # the manifest's table is created too
    np.testing.assert_array_equal(new.table("new").lookup([7, 8])[:, 0], [7.0, 8.0])
    np.testing.assert_array_equal(new.table("old:name").lookup([7, 8])[:, 0], [7.0, 8.0])


def test_validate_only_changes_nothing(tmp_path: Path) -> None:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)
    prefix = checkpoint(shards, tmp_path, 1)
    empty = Shard(1, 3)
    result = restore_shard_checkpoint(empty, str(tmp_path), None, True, reset_filters=True)
    # floormod(id, 3) == 1 for -2, 1, 4
    assert (result.prefix, result.entries, result.tables) == (prefix, 3, [TABLE])
    assert result.reset_filters == [FILTER]  # would be reset: saved by 2 shards
    assert empty.tables == {} and empty.filters == {}


def test_damaged_file_changes_nothing(tmp_path: Path) -> None:
    shards = cluster(1, tables=("a", "b"))
    assign(shards, "a", [1], [1.0], ts=1)
    assign(shards, "b", [2], [2.0], ts=1)
    checkpoint(shards, tmp_path, 1)
    victim = tmp_path / "model.ckpt-1.assets" / "b_0-00000-of-00001"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assign(shards, "a", [1], [9.0], ts=2)
    with pytest.raises(CheckpointCorruptError, match="b_0-00000-of-00001"):
        restore_shard_checkpoint(shards[0], str(tmp_path), None, False)
    assert shards[0].table("a").lookup([1])[0, 0] == 9.0  # "a" was not restored either
    empty = Shard(0, 1)
    with pytest.raises(CheckpointCorruptError):
        restore_shard_checkpoint(empty, str(tmp_path), None, False)
    assert empty.tables == {} and empty.filters == {}


def test_failed_restore_empties_one_pass_tables_again(tmp_path: Path) -> None:
    shards = cluster(1, tables=("a", "b"))
    assign(shards, "a", [1], [1.0], ts=1)
    assign(shards, "b", [2], [2.0], ts=1)
    checkpoint(shards, tmp_path, 1)
    (tmp_path / "model.ckpt-1.assets" / "b_0-00000-of-00001").write_bytes(b"\x01" * 5)
    live = cluster(1, tables=("a", "b"))[0]
    live.table("a").max_update_ts = 77  # empty, so "a" is loaded in one pass first
    assign([live], "b", [9], [9.0], ts=3)
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        restore_shard_checkpoint(live, str(tmp_path), None, False)
    assert live.table("a").size() == 0 and live.table("a").max_update_ts == 77
    assert live.table("b").lookup([9])[0, 0] == 9.0


def test_resharded_restore_moves_entries_and_leaves_filters(tmp_path: Path) -> None:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)
    shards[0].intercept_gradient(FILTER, [40, 40], np.ones((2, 1), dtype=f32))
    checkpoint(shards, tmp_path, 1)
    fresh = [Shard(i, 3) for i in range(3)]
    for shard in fresh:
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False, reset_filters=True)
        assert result.reset_filters == [FILTER]
    np.testing.assert_array_equal(lookup(fresh, TABLE, IDS)[:, 0], VALS)
    assert sum(s.table(TABLE).size() for s in fresh) == len(IDS)
    # filter cells belong to the old shard layout: not restored, the filter starts empty
    grads = fresh[1].intercept_gradient(FILTER, [40], np.ones((1, 1), dtype=f32))
    np.testing.assert_array_equal(grads, [[0.0]])


def test_resolving_the_checkpoint(tmp_path: Path) -> None:
    assert restore_shard_checkpoint(Shard(), str(tmp_path), None, False).prefix == ""
    assert latest_checkpoint(str(tmp_path)) is None
    shards = cluster(1)
    assign(shards, TABLE, [1], [1.0], ts=1)
    for shard in shards:
        save_shard_checkpoint(shard, str(tmp_path), 4)  # no index: the only assets dir
    result = restore_shard_checkpoint(cluster(1)[0], str(tmp_path), None, True)
    assert result.prefix == str(tmp_path / "model.ckpt-4")
    save_shard_checkpoint(shards[0], str(tmp_path), 5)  # two assets dirs, no index: none
    assert restore_shard_checkpoint(cluster(1)[0], str(tmp_path), None, True).prefix == ""


def test_index_with_absolute_paths_and_timestamps(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_text(
        f'model_checkpoint_path: "{tmp_path}/model.ckpt-9"\n'
        f'all_model_checkpoint_paths: "{tmp_path}/model.ckpt-8"\n'
        f'all_model_checkpoint_paths: "{tmp_path}/model.ckpt-9"\n'
        "all_model_checkpoint_timestamps: 1700000000.5\n"
        "last_preserved_timestamp: 1699999999.25\n"
    )
    assert latest_checkpoint(str(tmp_path)) == f"{tmp_path}/model.ckpt-9"
    assert read_checkpoint_index(str(tmp_path))[1] == [
        f"{tmp_path}/model.ckpt-8", f"{tmp_path}/model.ckpt-9",
    ]


def _monolith_checkpoint(model_dir: Path, step: int, ids: np.ndarray, saving_ps: int) -> None:
    """A checkpoint laid out as Monolith writes it: per-PS table files named
    ``MonolithHashTable_<merged>_<i>-…``, a TF ``checkpoint`` index, no manifest."""
    from ps_server.checkpoint.table_files import save_table
    from ps_server.engine.hash_table import EmbeddingHashTable

    assets = model_dir / f"model.ckpt-{step}.assets"
    for ps in range(saving_ps):
        mine = ids[np.mod(ids, saving_ps) == ps]
        t = EmbeddingHashTable(configs.table_config(2))
        t.assign(mine, np.stack([mine, -mine], axis=1).astype(np.float32), req_time=7)
        save_table(t, str(assets / "MonolithHashTable_abc"), shard_index=ps, nshards=1)
    (model_dir / "checkpoint").write_text(
        f'model_checkpoint_path: "model.ckpt-{step}"\n'
        f'all_model_checkpoint_paths: "model.ckpt-{step}"\n'
    )


def test_monolith_layout_without_manifest_restores_into_declared_tables(tmp_path: Path) -> None:
    ids = np.arange(-20, 21, dtype=np.int64)
    _monolith_checkpoint(tmp_path, 10, ids, saving_ps=2)
    for i in range(3):
        shard = Shard(i, 3)
        shard.create_table("MonolithHashTable_abc", configs.table_config(2))
        result = restore_shard_checkpoint(shard, str(tmp_path))
        assert result.prefix.endswith("model.ckpt-10")
        mine = ids[np.mod(ids, 3) == i]
        table = shard.table("MonolithHashTable_abc")
        assert table.size() == mine.size
        np.testing.assert_array_equal(
            table.lookup(mine), np.stack([mine, -mine], axis=1).astype(np.float32)
        )
        assert table.max_update_ts == 7


def test_monolith_layout_into_a_shard_without_tables_is_refused(tmp_path: Path) -> None:
    _monolith_checkpoint(tmp_path, 10, np.arange(5, dtype=np.int64), saving_ps=1)
    with pytest.raises(FailedPreconditionError, match="create the tables first"):
        restore_shard_checkpoint(Shard(0, 1), str(tmp_path))


# ---------------------------------------------------------------- commit and the index


def listing(model_dir: Path) -> list[str]:
    return sorted(os.listdir(model_dir))


def test_commit_without_a_save_commits_nothing(tmp_path: Path) -> None:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)
    with pytest.raises(FailedPreconditionError, match=r"nothing was saved at step 3 .*does "
                                                      r"not exist.*save on every shard first"):
        commit_checkpoint(shards[0], str(tmp_path / "absent"), 3, 0)
    assert not (tmp_path / "absent").exists()
    checkpoint(shards, tmp_path, 1)
    index, before = (tmp_path / "checkpoint").read_text(), listing(tmp_path)
    for keep in (0, 1):
        with pytest.raises(FailedPreconditionError,
                           match=r"nothing was saved at step 2 in .*no shard left a part list "
                                 r"\(model.ckpt-2.parts-0.json, ...\).*save on every shard first"):
            commit_checkpoint(shards[0], str(tmp_path), 2, keep)
    assert (tmp_path / "checkpoint").read_text() == index
    assert listing(tmp_path) == before  # no model.ckpt-2.assets, step 1 kept
    # A repeated commit of a committed step keeps its manifest's file lists.
    manifest = json.loads((tmp_path / "model.ckpt-1.assets" / "manifest.json").read_text())
    commit_checkpoint(shards[0], str(tmp_path), 1, 1)
    again = json.loads((tmp_path / "model.ckpt-1.assets" / "manifest.json").read_text())
    assert again["files"] == manifest["files"]
    assert (tmp_path / "checkpoint").read_text() == index


def test_index_names_the_highest_step_in_step_order(tmp_path: Path) -> None:
    shards = cluster(1)
    assign(shards, TABLE, [1], [1.0], ts=1)
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "other-ckpt"\n'
        'all_model_checkpoint_paths: "zz-ckpt"\n'
        'all_model_checkpoint_paths: "other-ckpt"\n'
    )
    for step in (20, 3, 100, 10):
        checkpoint(shards, tmp_path, step)
    latest, listed = read_checkpoint_index(str(tmp_path))
    assert latest == "model.ckpt-100"
    assert listed == ["zz-ckpt", "other-ckpt", "model.ckpt-3", "model.ckpt-10",
                      "model.ckpt-20", "model.ckpt-100"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-100")
    fresh = cluster(1)
    assert restore_shard_checkpoint(fresh[0], str(tmp_path), None, False).prefix == str(
        tmp_path / "model.ckpt-100")


def test_max_to_keep_keeps_the_highest_steps(tmp_path: Path) -> None:
    shards = cluster(1)
    assign(shards, TABLE, [1], [1.0], ts=1)
    for step in (10, 30, 20):
        checkpoint(shards, tmp_path, step, max_to_keep=2)
    assert listing(tmp_path) == ["checkpoint", "model.ckpt-20.assets", "model.ckpt-30.assets"]
    assert read_checkpoint_index(str(tmp_path)) == (
        "model.ckpt-30", ["model.ckpt-20", "model.ckpt-30"])
    # A step below the kept ones would be deleted at once: refused, nothing deleted.
    save_shard_checkpoint(shards[0], str(tmp_path), 5)
    index = (tmp_path / "checkpoint").read_text()
    with pytest.raises(FailedPreconditionError,
                       match=r"model.ckpt-5 is not among the 2 highest committed steps "
                             r"\(kept: 20, 30\).*nothing was committed or deleted.*max_to_keep=0"):
        commit_checkpoint(shards[0], str(tmp_path), 5, 2)
    assert (tmp_path / "checkpoint").read_text() == index
    assert listing(tmp_path) == ["checkpoint", "model.ckpt-20.assets", "model.ckpt-30.assets",
                                 "model.ckpt-5.assets", "model.ckpt-5.parts-0.json"]
    assert not (tmp_path / "model.ckpt-5.assets" / "manifest.json").exists()
    # ... and committed when kept: the highest stays the latest.
    commit_checkpoint(shards[0], str(tmp_path), 5, 0)
    assert read_checkpoint_index(str(tmp_path)) == (
        "model.ckpt-30", ["model.ckpt-5", "model.ckpt-20", "model.ckpt-30"])
    # The highest steps are kept, whatever commits last.
    checkpoint(shards, tmp_path, 25, max_to_keep=2)
    assert read_checkpoint_index(str(tmp_path)) == (
        "model.ckpt-30", ["model.ckpt-25", "model.ckpt-30"])
    assert listing(tmp_path) == ["checkpoint", "model.ckpt-25.assets", "model.ckpt-30.assets"]


def test_a_failed_commit_deletes_nothing(tmp_path: Path) -> None:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)
    checkpoint(shards, tmp_path, 1)
    save_shard_checkpoint(shards[0], str(tmp_path), 2)  # shard 1 never saves step 2
    before, index = listing(tmp_path), (tmp_path / "checkpoint").read_text()
    with pytest.raises(FailedPreconditionError, match="shard"):
        commit_checkpoint(shards[0], str(tmp_path), 2, 1)
    assert listing(tmp_path) == before
    assert (tmp_path / "checkpoint").read_text() == index
    fresh = cluster(2)
    for shard in fresh:
        assert restore_shard_checkpoint(shard, str(tmp_path), None, False).prefix == str(
            tmp_path / "model.ckpt-1")
    np.testing.assert_array_equal(lookup(fresh, TABLE, IDS)[:, 0], VALS)


def test_a_table_created_after_the_save_names_the_part_list(tmp_path: Path) -> None:
    shards = cluster(2)
    for shard in shards:
        save_shard_checkpoint(shard, str(tmp_path), 3)
    for shard in shards:
        shard.create_table("late", CONFIG)
    with pytest.raises(FailedPreconditionError) as info:
        commit_checkpoint(shards[0], str(tmp_path), 3, 0)
    assert "shard 0 saved no files for 'late' at step 3 (its model.ckpt-3.parts-0.json " \
        "lists none" in str(info.value)
    assert not (tmp_path / "checkpoint").exists()


def racing_commit(barrier: threading.Barrier, shard: Shard, model_dir: Path, step: int,
                  outcomes: dict[int, BaseException | None]) -> None:
    barrier.wait()
    try:
        commit_checkpoint(shard, str(model_dir), step, 1)
        outcomes[step] = None
    except FailedPreconditionError as e:
        outcomes[step] = e


def test_racing_commits_end_with_the_highest_step(tmp_path: Path) -> None:
    for attempt in range(5):
        model_dir = tmp_path / f"m{attempt}"
        groups = {step: cluster(1) for step in (10, 20)}
        for step, shards in groups.items():
            assign(shards, TABLE, [1], [float(step)], ts=step)
            save_shard_checkpoint(shards[0], str(model_dir), step)
        barrier = threading.Barrier(2)
        outcomes: dict[int, BaseException | None] = {}
        threads = [threading.Thread(target=racing_commit, args=(
            barrier, groups[s][0], model_dir, s, outcomes)) for s in (10, 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes[20] is None
        # 10 either committed first and was deleted by 20, or was refused after 20.
        if outcomes[10] is not None:
            assert "not among the 1 highest committed steps (kept: 20)" in str(outcomes[10])
        assert read_checkpoint_index(str(model_dir)) == ("model.ckpt-20", ["model.ckpt-20"])
        fresh = cluster(1)
        restore_shard_checkpoint(fresh[0], str(model_dir), None, False)
        assert fresh[0].table(TABLE).lookup([1])[0, 0] == 20.0


def test_a_commit_waits_for_the_model_dir_lock(tmp_path: Path) -> None:
    """Another process's lock (here: another open file description) holds a commit back."""
    shards = cluster(1)
    assign(shards, TABLE, [1], [1.0], ts=1)
    save_shard_checkpoint(shards[0], str(tmp_path), 1)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (commit_checkpoint(shards[0], str(tmp_path), 1, 0), done.set()))
        worker.start()
        assert not done.wait(0.5)
        assert not (tmp_path / "checkpoint").exists()
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert done.wait(10)
        worker.join()
    finally:
        os.close(fd)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-1")


# ---------------------------------------------------------------- filters and resharding


def sliding(shard: Shard) -> Any:
    return shard.hash_filter(FILTER).hash_filter


def saved_with_filter_state(model_dir: Path) -> list[Shard]:
    shards = cluster(2)
    assign(shards, TABLE, IDS, VALS, ts=10)  # counts every id in the filters
    checkpoint(shards, model_dir, 1)
    assert all(sliding(s).cells.any() for s in shards)
    return shards


@pytest.mark.parametrize("target", [1, 3])
def test_filter_state_into_another_shard_count_is_refused(tmp_path: Path, target: int) -> None:
    saved_with_filter_state(tmp_path)
    live = cluster(target)
    assign(live, TABLE, [100], [9.0], ts=5)
    before = [(s.table(TABLE).size(), sliding(s).cells.copy()) for s in live]
    for validate_only in (True, False):
        for shard in live:
            with pytest.raises(FailedPreconditionError) as info:
                restore_shard_checkpoint(shard, str(tmp_path), None, validate_only)
            message = str(info.value)
            assert f"'{FILTER}' (sliding_hash_filter, saved by 2 shards)" in message
            assert f"this cluster's {target}" in message
            assert "nothing was restored" in message and "reset_filters" in message
    for shard, (size, cells) in zip(live, before, strict=True):
        assert shard.table(TABLE).size() == size
        np.testing.assert_array_equal(sliding(shard).cells, cells)
    # An empty cluster: nothing is created either.
    empty = Shard(0, target)
    with pytest.raises(FailedPreconditionError, match="another shard count"):
        restore_shard_checkpoint(empty, str(tmp_path), None, False)
    assert not empty.tables and not empty.filters


@pytest.mark.parametrize("target", [1, 3])
def test_reset_filters_restores_the_tables_and_empties_the_filters(
    tmp_path: Path, target: int
) -> None:
    saved_with_filter_state(tmp_path)
    live = cluster(target)
    assign(live, TABLE, [100], [9.0], ts=5)  # live filter state, to be cleared
    assert any(sliding(s).cells.any() for s in live)
    owner = live[100 % target]
    checked = restore_shard_checkpoint(owner, str(tmp_path), None, True, reset_filters=True)
    assert checked.reset_filters == [FILTER] and sliding(owner).cells.any()  # validating
    for shard in live:
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False, reset_filters=True)
        assert result.reset_filters == [FILTER]
        assert not sliding(shard).cells.any()
        assert sliding(shard).failure_count == 0
    np.testing.assert_array_equal(lookup(live, TABLE, IDS)[:, 0], VALS)
    assert sum(s.table(TABLE).size() for s in live) == len(IDS)
    # Created from the manifest on empty shards: new filters, reported as reset.
    empty = [Shard(i, target) for i in range(target)]
    for shard in empty:
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False, reset_filters=True)
        assert result.reset_filters == [FILTER]
        assert not sliding(shard).cells.any()
    np.testing.assert_array_equal(lookup(empty, TABLE, IDS)[:, 0], VALS)


def test_same_shard_count_restores_filters_and_resets_nothing(tmp_path: Path) -> None:
    shards = saved_with_filter_state(tmp_path)
    fresh = cluster(2)
    for shard, old in zip(fresh, shards, strict=True):
        result = restore_shard_checkpoint(shard, str(tmp_path), None, False, reset_filters=True)
        assert result.reset_filters == []
        np.testing.assert_array_equal(sliding(shard).cells, sliding(old).cells)


def test_filters_without_files_are_never_reset(tmp_path: Path) -> None:
    shards = [Shard(i, 2) for i in range(2)]
    for shard in shards:
        shard.create_hash_filter("p", FilterOptions(filter_type="probabilistic_filter"))
        shard.create_hash_filter("d", FilterOptions(enable_hash_filter=False))
        shard.create_table("a", CONFIG, hash_filter="p")
        shard.create_table("b", CONFIG, hash_filter="d")
    assign(shards, "a", IDS, VALS, ts=10)
    checkpoint(shards, tmp_path, 1)
    fresh = Shard(0, 1)
    result = restore_shard_checkpoint(fresh, str(tmp_path), None, False)
    assert result.reset_filters == []
    assert fresh.table("a").size() == len(IDS)


def test_monolith_filter_files_of_another_shard_count(tmp_path: Path) -> None:
    """Without a manifest, the shard count is that of the hash_filter_<i> suffixes."""
    saved_with_filter_state(tmp_path)
    os.unlink(tmp_path / "model.ckpt-1.assets" / "manifest.json")
    live = cluster(1)
    with pytest.raises(FailedPreconditionError,
                       match=rf"'{FILTER}' \(sliding_hash_filter, saved by 2 shards\)"):
        restore_shard_checkpoint(live[0], str(tmp_path), None, False)
    assert live[0].table(TABLE).size() == 0
    result = restore_shard_checkpoint(live[0], str(tmp_path), None, False, reset_filters=True)
    assert result.reset_filters == [FILTER]
    np.testing.assert_array_equal(lookup(live, TABLE, IDS)[:, 0], VALS)
    # The same count: the filter files are restored, as before.
    same = cluster(2)
    for shard in same:
        assert restore_shard_checkpoint(shard, str(tmp_path), None, False).reset_filters == []
        assert sliding(shard).cells.any()
