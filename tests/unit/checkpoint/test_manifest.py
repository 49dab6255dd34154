"""The checkpoint manifest's file facts (docs/semantics.md §13.6) and one file per name.

Every file a checkpoint holds is listed in its manifest with its size, record count
and CRC-32C (computed while writing); restore checks every listed file before any
table changes and refuses (CheckpointCorruptError, DATA_LOSS) naming the file and
what differs. Table and filter names that share a file stem cannot coexist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from ps_server.checkpoint import checkpoints
from ps_server.checkpoint.checkpoints import (
    commit_checkpoint,
    latest_checkpoint,
    restore_shard_checkpoint,
    save_shard_checkpoint,
)
from ps_server.checkpoint.tfrecord import TFRecordWriter, file_facts
from ps_server.engine import configs
from ps_server.engine.names import file_stem
from ps_server.engine.shard import FilterOptions, Shard
from ps_server.errors import (
    AlreadyExistsError,
    CheckpointCorruptError,
    FailedPreconditionError,
    InvalidArgumentError,
)

f32 = np.float32
CONFIG = configs.table_config(2, optimizer=configs.adagrad())
OPTIONS = FilterOptions(capacity=1000, split_num=5)
STEP = 5


def shards(n: int, tables: tuple[str, ...] = ("a", "b")) -> list[Shard]:
    out = [Shard(i, n) for i in range(n)]
    for shard in out:
        shard.create_hash_filter("f", OPTIONS)
        for name in tables:
            shard.create_table(name, CONFIG, saver_parallel=1)
        shard.create_table("c", CONFIG, saver_parallel=1, hash_filter="f")  # saves f
    return out


def fill(group: list[Shard], name: str, ids: list[int], scale: float) -> None:
    n = len(group)
    for shard in group:
        mine = np.array([i for i in ids if i % n == shard.shard_index], dtype=np.int64)
        vals = np.repeat(mine.astype(f32)[:, None] * scale, 2, axis=1)
        shard.table(name).assign(mine, vals, req_time=10)


def save(group: list[Shard], model_dir: Path, step: int = STEP) -> Path:
    for shard in group:
        save_shard_checkpoint(shard, str(model_dir), step)
    commit_checkpoint(group[0], str(model_dir), step, 0)
    return model_dir / f"model.ckpt-{step}.assets"


def manifest_of(assets: Path) -> dict:
    return json.loads((assets / "manifest.json").read_text())


def rewrite_manifest(assets: Path, manifest: dict, *, reseal: bool = True) -> None:
    if reseal:
        manifest["manifest_crc32c"] = checkpoints._manifest_checksum(manifest)
    (assets / "manifest.json").write_text(json.dumps(manifest))


def ids_values(shard: Shard, name: str) -> tuple[np.ndarray, np.ndarray]:
    cols = shard.table(name).export_columns()
    order = np.argsort(cols.ids)
    return cols.ids[order].copy(), cols.values[order].copy()


# ---------------------------------------------------------------- file facts


def test_the_writer_records_size_count_and_crc_of_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with TFRecordWriter(path) as w:
        w.write(b"one")
        w.write_buffer(np.frombuffer(b"twothree", np.uint8), np.array([0, 3, 8]))
    data = path.read_bytes()
    facts = w.facts()
    assert (facts.size, facts.records) == (len(data), 3)
    assert facts.crc32c == google_crc32c.value(data)
    assert file_facts(path, chunk_bytes=13) == facts


def test_file_facts_reports_a_record_cut_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with TFRecordWriter(path) as w:
        w.write_many([b"x" * 40] * 3)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        file_facts(path)


def test_the_manifest_lists_every_file_with_its_facts_and_its_own_checksum(
    tmp_path: Path,
) -> None:
    group = shards(2)
    fill(group, "a", list(range(-5, 9)), 1.0)
    group[0].intercept_gradient("f", [4, 4], np.ones((2, 1), dtype=f32))
    assets = save(group, tmp_path)
    manifest = manifest_of(assets)
    on_disk = sorted(n for n in os.listdir(assets) if "-of-" in n)
    assert sorted(manifest["files"]) == on_disk
    for name, facts in manifest["files"].items():
        data = (assets / name).read_bytes()
        assert facts["size"] == len(data)
        assert facts["crc32c"] == google_crc32c.value(data)
        assert facts["records"] == file_facts(assets / name).records
    assert manifest["tables"]["a"]["files"] == ["a_0-00000-of-00001", "a_1-00000-of-00001"]
    assert sum(manifest["files"][f]["records"] for f in manifest["tables"]["a"]["files"]) == 14
    assert manifest["hash_filters"]["f"]["files"] == [
        f"hash_filter_{i}-{k:05d}-of-00005" for i in (0, 1) for k in range(5)]
    assert manifest["manifest_crc32c"] == checkpoints._manifest_checksum(manifest)
    # the part lists are merged and gone; a repeated commit keeps the file facts
    assert not [n for n in os.listdir(tmp_path) if ".parts-" in n]
    commit_checkpoint(group[0], str(tmp_path), STEP, 0)
    assert manifest_of(assets) == manifest
    # ... even after a table was created since (a retried commit whose answer was lost)
    for shard in group:
        shard.create_table("late", CONFIG)
    commit_checkpoint(group[0], str(tmp_path), STEP, 0)
    assert manifest_of(assets) == manifest


def test_each_shard_leaves_a_part_list_until_the_commit(tmp_path: Path) -> None:
    group = shards(2)
    for shard in group:
        save_shard_checkpoint(shard, str(tmp_path), STEP)
    for i in (0, 1):
        parts = json.loads((tmp_path / f"model.ckpt-{STEP}.parts-{i}.json").read_text())
        assert (parts["shard_index"], parts["num_shards"], parts["global_step"]) == (i, 2, STEP)
        assert parts["tables"]["a"] == [f"a_{i}-00000-of-00001"]


# ---------------------------------------------------------------- refusals


def damaged_checkpoint(tmp_path: Path) -> tuple[list[Shard], Path, dict[str, tuple]]:
    """A saved 1-shard checkpoint of tables a and b; then the live tables change."""
    (shard,) = group = shards(1)
    fill(group, "a", list(range(0, 40)), 1.0)
    fill(group, "b", list(range(100, 130)), 2.0)
    assets = save(group, tmp_path)
    fill(group, "a", list(range(0, 40)), 7.0)  # the live state differs from the saved one
    before = {n: ids_values(shard, n) for n in ("a", "b")}
    return group, assets, before


def record_boundaries(path: Path) -> list[int]:
    data = path.read_bytes()
    pos, out = 0, [0]
    while pos < len(data):
        pos += int.from_bytes(data[pos : pos + 8], "little") + 16
        out.append(pos)
    return out


def truncate_at_record(path: Path) -> None:
    bounds = record_boundaries(path)
    path.write_bytes(path.read_bytes()[: bounds[-2]])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip(path: Path) -> None:
    """One bit of the second record's data (its framing CRC is not read before)."""
    data = bytearray(path.read_bytes())
    data[record_boundaries(path)[2] - 6] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "words"), [
    (truncate_at_record, "bytes, the manifest records"),
    (empty, "it has 0 bytes"),
    (flip, "CRC-32C"),
])
def test_a_damaged_part_is_refused_naming_it_and_nothing_changes(
    tmp_path: Path, damage: object, words: str
) -> None:
    group, assets, before = damaged_checkpoint(tmp_path)
    part = assets / "a_0-00000-of-00001"
    damage(part)  # type: ignore[operator]
    for target in (group[0], Shard()):
        for validate in (True, False):
            with pytest.raises(CheckpointCorruptError) as info:
                restore_shard_checkpoint(target, str(tmp_path), None, validate)
            assert str(part) in str(info.value) and words in str(info.value)
    for name, (ids, vals) in before.items():
        got_ids, got_vals = ids_values(group[0], name)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_vals, vals)


def test_two_tables_files_swapped_are_refused(tmp_path: Path) -> None:
    group, assets, before = damaged_checkpoint(tmp_path)
    a, b = assets / "a_0-00000-of-00001", assets / "b_0-00000-of-00001"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    fresh = Shard()
    with pytest.raises(CheckpointCorruptError, match="a_0-00000-of-00001 does not match"):
        restore_shard_checkpoint(fresh, str(tmp_path))
    assert fresh.tables == {} and fresh.filters == {}
    np.testing.assert_array_equal(ids_values(group[0], "a")[1], before["a"][1])


def test_a_count_that_disagrees_is_refused(tmp_path: Path) -> None:
    _, assets, _ = damaged_checkpoint(tmp_path)
    manifest = manifest_of(assets)
    manifest["files"]["b_0-00000-of-00001"]["records"] += 1
    rewrite_manifest(assets, manifest)
    with pytest.raises(CheckpointCorruptError, match="holds 30 records, the manifest records 31"):
        restore_shard_checkpoint(Shard(), str(tmp_path))


def test_a_listed_file_that_is_gone_is_refused(tmp_path: Path) -> None:
    _, assets, _ = damaged_checkpoint(tmp_path)
    (assets / "hash_filter_0-00001-of-00005").unlink()
    with pytest.raises(CheckpointCorruptError, match="hash_filter_0-00001-of-00005"):
        restore_shard_checkpoint(Shard(), str(tmp_path))


def test_a_changed_manifest_is_refused(tmp_path: Path) -> None:
    _, assets, _ = damaged_checkpoint(tmp_path)
    manifest = manifest_of(assets)
    manifest["files"]["b_0-00000-of-00001"]["records"] += 1
    rewrite_manifest(assets, manifest, reseal=False)
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json: unreadable.*checksum"):
        restore_shard_checkpoint(Shard(), str(tmp_path))


def test_a_manifest_naming_a_path_instead_of_a_file_is_refused(tmp_path: Path) -> None:
    _, assets, _ = damaged_checkpoint(tmp_path)
    manifest = manifest_of(assets)
    manifest["files"]["../outside"] = {"size": 1, "records": 1, "crc32c": 1}
    manifest["tables"]["a"]["files"] = ["../outside"]
    rewrite_manifest(assets, manifest)
    with pytest.raises(CheckpointCorruptError, match="not a plain file name"):
        restore_shard_checkpoint(Shard(), str(tmp_path))


def test_a_manifest_without_file_facts_still_restores(tmp_path: Path) -> None:
    """Manifests written before file facts existed restore as before (globbed files)."""
    _, assets, _ = damaged_checkpoint(tmp_path)
    manifest = manifest_of(assets)
    for key in ("files", "manifest_crc32c"):
        del manifest[key]
    for what in ("tables", "hash_filters"):
        for decl in manifest[what].values():
            del decl["files"]
    rewrite_manifest(assets, manifest, reseal=False)
    fresh = Shard()
    restore_shard_checkpoint(fresh, str(tmp_path))
    np.testing.assert_array_equal(ids_values(fresh, "b")[0], np.arange(100, 130))


# ---------------------------------------------------------------- one file per name


def test_a_table_named_x_1_does_not_read_the_parts_of_table_x(tmp_path: Path) -> None:
    group = shards(2, tables=("x", "x_1"))
    fill(group, "x", [0, 1, 2, 3], 1.0)
    fill(group, "x_1", [10, 11], 5.0)
    save(group, tmp_path)
    # shard 1's part of x is x_1-00000-of-00001: Monolith's single layout of x_1
    assert os.path.exists(tmp_path / f"model.ckpt-{STEP}.assets" / "x_1-00000-of-00001")
    fresh = [Shard(i, 2) for i in range(2)]
    for shard in fresh:
        restore_shard_checkpoint(shard, str(tmp_path))
    got = {n: sorted(int(i) for s in fresh for i in ids_values(s, n)[0]) for n in ("x", "x_1")}
    assert got == {"x": [0, 1, 2, 3], "x_1": [10, 11]}


@pytest.mark.parametrize("other", ["scope:emb", "scope-emb"])
def test_table_names_with_one_file_stem_cannot_coexist(other: str) -> None:
    shard = Shard()
    shard.create_table("scope/emb", CONFIG)
    assert file_stem(other) == file_stem("scope/emb")
    with pytest.raises(AlreadyExistsError, match="'scope/emb' exists"):
        shard.create_table(other, CONFIG)
    assert list(shard.tables) == ["scope/emb"]
    # the same name is still idempotent
    assert shard.create_table("scope/emb", CONFIG, allow_existing=True) is False


def test_filter_names_with_one_file_stem_cannot_coexist() -> None:
    shard = Shard()
    shard.create_hash_filter("f/1", OPTIONS)
    with pytest.raises(AlreadyExistsError, match="'f/1' exists"):
        shard.create_hash_filter("f:1", OPTIONS)
    assert shard.create_hash_filter("f/1", OPTIONS) is False


@pytest.mark.parametrize("name", ["hash_filter", "hash_filter_f", "hash_filter_0"])
def test_table_names_that_would_write_filter_files_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        Shard().create_table(name, CONFIG)


# ---------------------------------------------------------------- commit


def test_a_commit_missing_a_shards_part_list_commits_nothing(tmp_path: Path) -> None:
    group = shards(2)
    fill(group, "a", [1, 2], 1.0)
    save(group, tmp_path, step=1)
    save_shard_checkpoint(group[0], str(tmp_path), 2)  # shard 1 never saves step 2
    with pytest.raises(FailedPreconditionError,
                       match=r"shard\(s\) 1 of 2 .*model\.ckpt-2\.parts-1\.json"):
        commit_checkpoint(group[0], str(tmp_path), 2, 1)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-1")
    assert (tmp_path / "model.ckpt-1.assets" / "manifest.json").exists()
    assert not (tmp_path / "model.ckpt-2.assets" / "manifest.json").exists()


def test_a_table_created_after_the_save_is_not_committed(tmp_path: Path) -> None:
    (shard,) = group = shards(1)
    save_shard_checkpoint(shard, str(tmp_path), 1)
    shard.create_table("late", CONFIG)
    with pytest.raises(FailedPreconditionError, match="'late'"):
        commit_checkpoint(group[0], str(tmp_path), 1, 0)
    assert latest_checkpoint(str(tmp_path)) is None
