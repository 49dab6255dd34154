"""``ps-admin`` as a subprocess against real ``python -m ps_server`` processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.admin_cli import Progress
from ps_server.engine import configs
from tests.integration.conftest import CLIENT_OPTIONS, REPO, ServerProcess, start_server_process
from tests.integration.test_admin import T0, expect_error, values_of
from tests.integration.test_service import assign, lookup, make_filter, make_table

pytestmark = pytest.mark.integration


def ps_admin(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``ps-admin`` script (``python -m ps_server.admin_cli`` when the
    package is not installed into this interpreter's environment)."""
    script = Path(sys.executable).with_name("ps-admin")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ps_server.admin_cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def processes(tmp_path: Path, n: int) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(start_server_process(
                tmp_path, f"--shard_index={i}", f"--num_shards={n}"))
            for i in range(n)
        ]


@contextlib.contextmanager
def stubs(procs: list[ServerProcess]) -> Iterator[list[ps_grpc.ParameterServerStub]]:
    channels = [grpc.insecure_channel(p.address, options=CLIENT_OPTIONS) for p in procs]
    try:
        yield [ps_grpc.ParameterServerStub(c) for c in channels]
    finally:
        for c in channels:
            c.close()


def addresses(procs: list[ServerProcess]) -> str:
    return "--addresses=" + ",".join(p.address for p in procs)


def test_save_stats_restore_resharded_and_a_missing_checkpoint(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with processes(tmp_path, 2) as old, stubs(old) as old_stubs:
        for stub in old_stubs:
            make_table(stub, "emb", configs.table_config(2))
        # floormod(id, 2): shard 0 {-2, 0, 4, 8}, shard 1 {-5, 1, 7}.
        assign(old_stubs[0], "emb", [-2, 0, 4, 8], values_of([-2, 0, 4, 8]), req_time=T0)
        assign(old_stubs[1], "emb", [-5, 1, 7], values_of([-5, 1, 7]), req_time=T0)

        saved = ps_admin(addresses(old), "save", f"--model_dir={model_dir}",
                         "--global_step=7", "--max_to_keep=2")
        assert saved.returncode == 0, saved.stderr
        prefix = f"{model_dir}/model.ckpt-7"
        lines = saved.stdout.splitlines()
        # Not a terminal: one plain line per shard as it finishes, then the commit.
        assert sum(1 for ln in lines if ln.startswith("shard 0 ") and "4 entries" in ln) == 1
        assert sum(1 for ln in lines if ln.startswith("shard 1 ") and "3 entries" in ln) == 1
        assert any(ln.startswith("shard 0 ") and f"committed {prefix}" in ln for ln in lines)
        assert lines[-1].startswith(f"saved {prefix}: 7 entries")
        assert "\x1b[" not in saved.stdout
        index = (Path(model_dir) / "checkpoint").read_text()
        assert 'model_checkpoint_path: "model.ckpt-7"' in index

        stats = ps_admin(addresses(old), "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        shards = json.loads(stats.stdout)["shards"]
        assert [s["address"] for s in shards] == [p.address for p in old]
        assert [(s["shard_index"], s["num_shards"], s["entries"]) for s in shards] == [
            (0, 2, 4), (1, 2, 3)]
        assert [[t["name"] for t in s["tables"]] for s in shards] == [["emb"], ["emb"]]
        assert all(s["last_save"]["prefix"] == prefix for s in shards)
        assert all(s["last_restore"] is None for s in shards)
        assert all(s["state"] == "SERVING" for s in shards)

        human = ps_admin(addresses(old), "stats")
        assert human.returncode == 0, human.stderr
        assert "table emb: 4 entries" in human.stdout
        assert "table emb: 3 entries" in human.stdout

    with processes(tmp_path, 3) as new, stubs(new) as new_stubs:
        restored = ps_admin(addresses(new), "restore", f"--model_dir={model_dir}")
        assert restored.returncode == 0, restored.stderr
        assert f"restored {prefix}: 7 entries on 3 shards" in restored.stdout
        # floormod(id, 3): -5 = -2*3 + 1 → 1, -2 → 1; so {0}, {-5, -2, 1, 4, 7}, {8}.
        for stub, own in zip(new_stubs, [[0], [-5, -2, 1, 4, 7], [8]], strict=True):
            np.testing.assert_array_equal(lookup(stub, "emb", own), values_of(own))

        missing = str(tmp_path / "nothing")
        failed = ps_admin(addresses(new), "restore", f"--model_dir={missing}")
        assert failed.returncode == 1
        assert f"shard 0 ({new[0].address}) failed: NOT_FOUND: no checkpoint in" in failed.stderr
        assert "nothing was restored on any shard" in failed.stderr
        # The shards are untouched.
        np.testing.assert_array_equal(lookup(new_stubs[2], "emb", [8]), values_of([8]))


def test_evict_drain_and_an_unreachable_shard(tmp_path: Path) -> None:
    with processes(tmp_path, 1) as (proc,), stubs([proc]) as (stub,):
        config = configs.table_config(1, expire_days=1)
        make_table(stub, "t", config)
        assign(stub, "t", [1], [[1.0]], req_time=T0)
        assign(stub, "t", [2], [[2.0]], req_time=T0 + 86_400)  # id 1: age 1 day → expired
        evicted = ps_admin(addresses([proc]), "evict", "--table=t")
        assert evicted.returncode == 0, evicted.stderr
        assert "evicted 1 [t: -1 (1 left)]" in evicted.stdout

        drained = ps_admin(addresses([proc]), "drain", "--grace_seconds=1")
        assert drained.returncode == 0, drained.stderr
        assert "drained" in drained.stdout
        expect_error(lambda: lookup(stub, "t", [2]), grpc.StatusCode.UNAVAILABLE, "drained")

        dead = ps_admin(f"{addresses([proc])},127.0.0.1:1", "--timeout=5", "stats")
        assert dead.returncode == 1
        assert "shard 1 (127.0.0.1:1) failed: UNAVAILABLE" in dead.stderr
        usage = ps_admin(addresses([proc]), "save", "--model_dir=x")  # no --global_step
        assert usage.returncode == 2 and "--global_step" in usage.stderr


def test_progress_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, ["a:1", "bb:2"], tty=True)
    progress.begin(0, "saving")
    progress.begin(1, "saving")
    progress.draw()
    progress.finish(0, "done")
    progress.draw()
    text = out.getvalue()
    first, second = text.split("\x1b[2F")  # the second drawing goes back up two lines
    assert "shard 0 a:1   saving... " in first and "shard 1 bb:2  saving... " in first
    assert "shard 0 a:1   done\n" in second and "shard 1 bb:2  saving... " in second


def test_save_keeps_the_highest_step_the_latest(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    with processes(tmp_path, 1) as (proc,), stubs([proc]) as (stub,):
        make_table(stub, "emb", configs.table_config(2))
        assign(stub, "emb", [1, 2], values_of([1, 2]), req_time=T0)
        for step in ("20", "10"):
            saved = ps_admin(addresses([proc]), "save", f"--model_dir={model_dir}",
                             f"--global_step={step}", "--max_to_keep=2")
            assert saved.returncode == 0, saved.stderr
        index = (Path(model_dir) / "checkpoint").read_text()
        assert index.splitlines()[0] == 'model_checkpoint_path: "model.ckpt-20"'
        low = ps_admin(addresses([proc]), "save", f"--model_dir={model_dir}",
                       "--global_step=5", "--max_to_keep=2")
        assert low.returncode == 1
        assert "FAILED_PRECONDITION" in low.stderr
        assert "model.ckpt-5 is not among the 2 highest committed steps (kept: 10, 20)" in (
            low.stderr)
        assert "the previous checkpoint stays the latest" in low.stderr
        assert (Path(model_dir) / "checkpoint").read_text() == index
        assert sorted(os.listdir(model_dir))[:3] == [
            "checkpoint", "model.ckpt-10.assets", "model.ckpt-20.assets"]


def test_restore_into_another_shard_count_with_filters(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "model")
    ids = [-3, 0, 1, 2, 5, 8]
    with processes(tmp_path, 2) as old, stubs(old) as old_stubs:
        for stub in old_stubs:
            make_filter(stub, "gate", threshold=1, capacity=1000, split_num=5)
            make_table(stub, "emb", configs.table_config(2), hash_filter="gate")
        for k, stub in enumerate(old_stubs):
            own = [i for i in ids if i % 2 == k]
            for _ in range(2):  # counted, then admitted
                assign(stub, "emb", own, values_of(own), req_time=T0)
        saved = ps_admin(addresses(old), "save", f"--model_dir={model_dir}", "--global_step=3")
        assert saved.returncode == 0, saved.stderr
    prefix = f"{model_dir}/model.ckpt-3"
    with processes(tmp_path, 1) as new, stubs(new) as (stub,):
        refused = ps_admin(addresses(new), "restore", f"--model_dir={model_dir}")
        assert refused.returncode == 1
        assert "FAILED_PRECONDITION" in refused.stderr
        assert "'gate' (sliding_hash_filter, saved by 2 shards)" in refused.stderr
        assert "--reset_filters" in refused.stderr
        assert "nothing was restored on any shard" in refused.stderr

        reset = ps_admin(addresses(new), "restore", f"--model_dir={model_dir}",
                         "--reset_filters")
        assert reset.returncode == 0, reset.stderr
        assert f"restored {prefix}: 6 entries on 1 shards" in reset.stdout
        assert (f"shard 0 ({new[0].address}): hash filter(s) 'gate' reset to empty (saved by "
                "another shard count)") in reset.stdout
        np.testing.assert_array_equal(lookup(stub, "emb", ids), values_of(ids))
        warning = new[0].wait_for_log(r"^W\d{4} .*'gate' reset to empty")  # absl: W = WARNING
        assert prefix in warning.string


def test_export_for_monolith_and_restore_it_resharded(tmp_path: Path) -> None:
    model_dir = str(tmp_path / "monolith")
    with processes(tmp_path, 2) as old, stubs(old) as old_stubs:
        for stub in old_stubs:
            make_table(stub, "emb", configs.table_config(2))
        assign(old_stubs[0], "emb", [-2, 0, 4, 8], values_of([-2, 0, 4, 8]), req_time=T0)
        assign(old_stubs[1], "emb", [-5, 1, 7], values_of([-5, 1, 7]), req_time=T0)

        bad = ps_admin(addresses(old), "export", f"--model_dir={model_dir}",
                       "--global_step=3", "--num_ps=-1")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "num_ps" in bad.stderr
        assert "not committed" in bad.stderr

        done = ps_admin(addresses(old), "export", f"--model_dir={model_dir}",
                        "--global_step=3", "--layout=monolith-multi", "--num_ps=2")
        assert done.returncode == 0, done.stderr
        prefix = f"{model_dir}/model.ckpt-3"
        lines = done.stdout.splitlines()
        assert sum(1 for ln in lines if ln.startswith("shard 0 ") and "4 entries" in ln) == 1
        assert sum(1 for ln in lines if ln.startswith("shard 1 ") and "3 entries" in ln) == 1
        assert any(ln.startswith("shard 0 ") and f"committed {prefix}" in ln for ln in lines)
        assert lines[-1].startswith(f"exported {prefix}: 7 entries")
        assert sorted(os.listdir(prefix + ".assets")) == sorted(
            f"MonolithMultiHashTable_{ps}{meta}-{k:05d}-of-00002"
            for ps in (0, 1) for meta in ("", ".meta") for k in (0, 1))
        assert (Path(model_dir) / "checkpoint").read_text().startswith(
            'model_checkpoint_path: "model.ckpt-3"\n')
        assert os.path.getsize(prefix + ".index") == 101

    with processes(tmp_path, 3) as new, stubs(new) as new_stubs:
        for stub in new_stubs:
            make_table(stub, "emb", configs.table_config(2))
        restored = ps_admin(addresses(new), "restore", f"--model_dir={model_dir}")
        assert restored.returncode == 0, restored.stderr
        assert f"restored {prefix}: 7 entries on 3 shards" in restored.stdout
        for stub, own in zip(new_stubs, [[0], [-5, -2, 1, 4, 7], [8]], strict=True):
            np.testing.assert_array_equal(lookup(stub, "emb", own), values_of(own))
