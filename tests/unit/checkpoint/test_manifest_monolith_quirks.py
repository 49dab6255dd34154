"""A table's ``monolith_quirks`` survives our checkpoints (the manifest's table
declaration), and manifests written without the key restore tables without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ps_server.checkpoint import checkpoints
from ps_server.checkpoint.checkpoints import (
    commit_checkpoint,
    restore_shard_checkpoint,
    save_shard_checkpoint,
)
from ps_server.engine import configs
from ps_server.engine.shard import Shard
from ps_server.errors import CheckpointCorruptError

CONFIG = configs.table_config(2, optimizer=configs.adagrad())
STEP = 3


def saved(tmp_path: Path) -> Path:
    shard = Shard()
    shard.create_table("plain", CONFIG, saver_parallel=1)
    shard.create_table("quirky", CONFIG, saver_parallel=1, monolith_quirks=True)
    for name in ("plain", "quirky"):
        shard.table(name).assign([1, 2], np.ones((2, 2), np.float32), req_time=10)
    save_shard_checkpoint(shard, str(tmp_path), STEP)
    commit_checkpoint(shard, str(tmp_path), STEP, 0)
    return tmp_path / f"model.ckpt-{STEP}.assets" / "manifest.json"


def test_the_manifest_declares_the_option_only_where_set_and_restores_it(
        tmp_path: Path) -> None:
    manifest = json.loads(saved(tmp_path).read_text())
    assert manifest["tables"]["quirky"]["monolith_quirks"] is True
    assert "monolith_quirks" not in manifest["tables"]["plain"]
    fresh = Shard()
    restore_shard_checkpoint(fresh, str(tmp_path))
    assert fresh.table("quirky").monolith_quirks
    assert not fresh.table("plain").monolith_quirks
    assert fresh.table("quirky").size() == 2


def test_a_manifest_without_the_key_restores_tables_without_the_option(tmp_path: Path) -> None:
    path = saved(tmp_path)
    manifest = json.loads(path.read_text())
    del manifest["tables"]["quirky"]["monolith_quirks"]
    manifest["manifest_crc32c"] = checkpoints._manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    fresh = Shard()
    restore_shard_checkpoint(fresh, str(tmp_path))
    assert not fresh.table("quirky").monolith_quirks


def test_a_manifest_with_a_non_boolean_option_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["tables"]["quirky"]["monolith_quirks"] = "yes"
    manifest["manifest_crc32c"] = checkpoints._manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    fresh = Shard()
    with pytest.raises(CheckpointCorruptError, match="monolith_quirks"):
        restore_shard_checkpoint(fresh, str(tmp_path))
    assert not fresh.tables
