"""The disk fills up during a save (issue 7, item 2c).

Two ways to run out of room, neither needing a real disk: a 1 MiB tmpfs mounted for
the test (we run as root here and in CI; skipped where mounting is not allowed), and
a shard process whose file size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored) makes
writes fail with ``EFBIG``. Either way the save must fail with ``RESOURCE_EXHAUSTED``
saying what happened and where, leave no temporary file behind, never make the
failed checkpoint the latest, and the previous checkpoint must still restore
completely.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ps_client import PsClient, PsResourceExhausted
from ps_server import admin_cli
from ps_server.checkpoint import checkpoints
from ps_server.engine import configs
from tests.faults.support import (
    inprocess_cluster,
    shard_fingerprint,
    thresholds,
    without_clocks,
)
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

DIM = 8


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test covers a full disk)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "-tmp-" in p.name]


def fill(client: PsClient, lo: int, hi: int, req_time: int) -> None:
    ids = np.arange(lo, hi, dtype=np.int64)
    values = (ids[:, None] * 0.001 + np.arange(DIM)).astype(np.float32)
    client.table("emb").assign(ids, values, req_time=req_time)


def test_full_tmpfs_fails_the_save_clearly_and_keeps_the_previous_checkpoint(
    small_disk: Path,
) -> None:
    model_dir = small_disk / "model"
    with inprocess_cluster(2) as servers, PsClient([s.address for s in servers]) as client:
        filters = client.create_hash_filters(True, thresholds(0), capacity=2000, split_num=7)
        client.create_table(configs.table_config(DIM, optimizer=configs.adagrad()),
                            name="emb", hash_filters=filters)
        fill(client, 0, 1000, req_time=100)  # about 100 KB of table files
        first = client.save_checkpoint(str(model_dir), 1)
        saved = [shard_fingerprint(s.shard) for s in servers]

        fill(client, 1000, 30_000, req_time=200)  # about 3 MB: cannot fit in 1 MiB
        with pytest.raises(PsResourceExhausted) as info:
            client.save_checkpoint(str(model_dir), 2)
        details = info.value.details
        assert "No space left on device" in details and "ENOSPC" in details, details
        assert str(model_dir) in details, details
        assert "previous checkpoint stays the latest" in details, details

        # The failed save is not the latest and left nothing half-written behind.
        assert checkpoints.latest_checkpoint(str(model_dir)) == first
        assert not (model_dir / "model.ckpt-2.assets" / "manifest.json").exists()
        assert temporary_files(small_disk) == []

        # ps-admin says the same, shard by shard, and commits nothing either.
        err = io.StringIO()
        code = admin_cli.run([f"--addresses={servers[0].address},{servers[1].address}",
                              "save", f"--model_dir={model_dir}", "--global_step=3"],
                             out=io.StringIO(), err=err)
        assert code == 1
        assert "RESOURCE_EXHAUSTED" in err.getvalue() and "ENOSPC" in err.getvalue()
        assert "the previous checkpoint stays the latest" in err.getvalue()
        assert checkpoints.latest_checkpoint(str(model_dir)) == first
        assert temporary_files(small_disk) == []

        # The previous checkpoint restores completely (the ids added since are gone).
        assert client.restore_checkpoint(str(model_dir)) == first
        assert [without_clocks(shard_fingerprint(s.shard)) for s in servers] == [
            without_clocks(f) for f in saved]
        assert client.table("emb").size() == 1000


def test_full_tmpfs_fails_a_table_save_and_keeps_its_previous_files(small_disk: Path) -> None:
    with inprocess_cluster(1) as servers, PsClient([servers[0].address]) as client:
        client.create_table(configs.table_config(DIM, optimizer=configs.adagrad()), name="emb")
        fill(client, 0, 1000, req_time=100)
        basename = str(small_disk / "tables" / "emb")
        client.table("emb").save(basename)
        (part,) = (small_disk / "tables").iterdir()
        before = part.read_bytes()
        fill(client, 1000, 30_000, req_time=200)
        with pytest.raises(PsResourceExhausted) as info:
            client.table("emb").save(basename)
        assert "ENOSPC" in info.value.details and basename in info.value.details
        assert sorted((small_disk / "tables").iterdir()) == [part]
        assert part.read_bytes() == before
        assert temporary_files(small_disk) == []


# ---------------------------------------------------------------- RLIMIT_FSIZE

#: Runs a shard with a file size limit; writes beyond it fail with EFBIG (SIGXFSZ,
#: which would kill the process, is ignored).
_LIMITED_SHARD = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["ps_server", *sys.argv[2:]]
runpy.run_module("ps_server", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def limited_shard(workdir: Path, limit: int) -> Iterator[str]:
    """A shard process (0 of 1) whose files cannot grow past ``limit`` bytes."""
    port_file = workdir / "port"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LIMITED_SHARD, str(limit), "--port=0", "--host=127.0.0.1",
         f"--port_file={port_file}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the limited shard did not start: {proc.communicate()}")
            time.sleep(0.02)
        yield f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_file_size_limit_fails_the_save_clearly(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    with limited_shard(tmp_path, 256 * 1024) as address, PsClient([address]) as client:
        client.create_table(configs.table_config(DIM, optimizer=configs.adagrad()), name="emb")
        fill(client, 0, 500, req_time=100)  # about 50 KB
        first = client.save_checkpoint(str(model_dir), 1)
        saved = client.table("emb").lookup_entry(np.arange(500))

        fill(client, 500, 10_000, req_time=200)  # about 1 MB in one file: over the limit
        with pytest.raises(PsResourceExhausted) as info:
            client.save_checkpoint(str(model_dir), 2)
        details = info.value.details
        assert "File too large" in details and "EFBIG" in details, details
        assert str(model_dir) in details, details
        assert checkpoints.latest_checkpoint(str(model_dir)) == first
        assert not (model_dir / "model.ckpt-2.assets" / "manifest.json").exists()
        assert temporary_files(tmp_path) == []

        assert client.restore_checkpoint(str(model_dir)) == first
        assert client.table("emb").size() == 500
        assert client.table("emb").lookup_entry(np.arange(500)) == saved
