"""``kill -9`` of a shard process: during training (issue 7, item 2a) and during a save (2b).

Real shard processes (``local_cluster``), real gRPC, the real ``ps-admin``. An oracle
(one in-process reference :class:`Shard` per shard, fed exactly the part of every
update its shard acknowledged) says what each shard must hold; it is compared entry by
entry (values, optimizer state, timestamps, as ``EntryDump`` bytes), so a lost or a
doubled update on any shard fails the test.

(a) The trainer keeps one :class:`PsClient` throughout. A shard is killed in the middle
of a step (after the step's lookups, before its update); the update fails on that shard
only, the operator restarts it and restores only that shard with ``ps-admin restore``
from the latest checkpoint, and the trainer resends the failed part of its batch to
that shard only (the others applied theirs). The restored shard must equal
the checkpoint exactly (read back independently from the checkpoint files), the other
shards must have lost nothing, and at the end every shard must equal the oracle.

(b) A shard is killed while it writes its part of a checkpoint: the previous checkpoint
stays the latest and restores completely.
"""

from __future__ import annotations

import collections
import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import PsClient, PsError, PsNotFound, PsUnavailable, RetryPolicy
from ps_client.testing import LocalCluster, local_cluster
from ps_server.checkpoint import checkpoints, filter_dump, table_files
from ps_server.checkpoint.entry_dump import lookup_entry
from ps_server.engine import configs
from ps_server.engine.shard import FilterOptions, Shard
from tests.faults.support import Oracle, thresholds
from tests.integration.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = 1_700_000_000
FILTER = "MonolithHashFilter"
FILTER_OPTIONS = FilterOptions(
    enable_hash_filter=True, filter_type="sliding_hash_filter",
    occurrence_threshold_config=thresholds(2), capacity=20_000, split_num=7,
)
#: Quick to give up on a dead shard, as a trainer that handles failures would be.
RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2)


def emb_config() -> object:
    return configs.table_config(4, optimizer=configs.adagrad(0.1))


def shard_of_address(cluster: LocalCluster, error: PsError) -> int:
    assert error.address is not None, error
    return cluster.addresses.index(error.address)


def ps_admin_restore(address: str, shard_index: int, model_dir: Path) -> str:
    """``ps-admin --addresses=<one shard> --shards=<its index> restore --model_dir=...``
    as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "ps_server.admin_cli", f"--addresses={address}",
         f"--shards={shard_index}", "restore", f"--model_dir={model_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def checkpoint_shard(prefix: str, shard_index: int, num_shards: int) -> Shard:
    """Shard ``shard_index``'s part of a checkpoint, read straight from its files."""
    shard = Shard(shard_index, num_shards)
    shard.create_hash_filter(FILTER, FILTER_OPTIONS)
    shard.create_table("emb", emb_config(), hash_filter=FILTER)
    assets = checkpoints.asset_dir(prefix)
    table_files.restore_table(shard.table("emb"), os.path.join(assets, "emb"),
                              shard_index=shard_index, num_shards=num_shards)
    filter_dump.restore_filter(shard.hash_filter(FILTER).hash_filter,
                               os.path.join(assets, f"hash_filter_{shard_index}"))
    return shard


def filter_files_of(cluster: LocalCluster, shard: int, basename: Path) -> list[bytes]:
    """Shard ``shard``'s live filter, written to files by the shard itself."""
    import grpc

    with grpc.insecure_channel(cluster.addresses[shard]) as channel:
        files = ps_grpc.ParameterServerStub(channel).SaveHashFilter(
            pb.HashFilterFilesRequest(hash_filter=FILTER, basename=str(basename)),
            timeout=60).files
    return [Path(f).read_bytes() for f in files]


def test_kill_9_mid_training_restart_restore_one_shard_and_resume(tmp_path: Path) -> None:
    num_shards, victim = 3, 1
    steps, checkpoint_step, kill_from = 36, 12, 22
    model_dir = tmp_path / "model"
    rng = np.random.default_rng(2024)
    universe = np.concatenate([np.arange(-1200, 1200, dtype=np.int64) * 7919,
                               np.array([-(2**63), 2**63 - 1, -1, 0], dtype=np.int64)])
    oracle = Oracle(num_shards)
    oracle.create_filter(FILTER, FILTER_OPTIONS)
    oracle.create_table("emb", emb_config(), hash_filter=FILTER)
    lr = 0.05

    with local_cluster(num_shards) as cluster, \
            PsClient(cluster.addresses, timeout=30, retry=RETRY) as client:
        filters = client.create_hash_filters(True, thresholds(2), capacity=20_000, split_num=7)
        table = client.create_table(emb_config(), name="emb", hash_filters=filters,
                                    learning_rate_fns=(lr,))
        at_checkpoint: list[Shard] = []
        prefix = ""
        recoveries: list[str] = []
        acked: collections.Counter[tuple[int, int]] = collections.Counter()  # (step, shard)

        def owned(shard: int) -> np.ndarray:
            return universe[np.mod(universe, num_shards) == shard]

        def entries(shard: int) -> list[bytes]:
            return table.lookup_entry(owned(shard))

        def recover(error: PsError, where: str) -> None:
            """The operator's job, then the trainer's checks, then back to training."""
            assert shard_of_address(cluster, error) == victim, error
            recoveries.append(where)
            before = [entries(s) for s in range(num_shards) if s != victim]  # live shards
            cluster.restart(victim)
            out = ps_admin_restore(cluster.addresses[victim], victim, model_dir)
            assert f"restored {prefix}" in out, out
            # The restored shard is the checkpoint, exactly: as read from its files...
            saved = checkpoint_shard(prefix, victim, num_shards)
            assert entries(victim) == lookup_entry(saved.table("emb"), owned(victim))
            assert filter_files_of(cluster, victim, tmp_path / "restored" / "hf") == \
                [Path(p).read_bytes() for p in filter_dump.list_filter_files(
                    os.path.join(checkpoints.asset_dir(prefix), f"hash_filter_{victim}"))]
            # ... and as the oracle had it when the checkpoint was saved.
            assert entries(victim) == lookup_entry(at_checkpoint[victim].table("emb"),
                owned(victim))
            info = client.shard_infos()[victim].tables[0]
            assert info.size == saved.table("emb").size()
            # No other shard lost (or gained) anything meanwhile.
            assert [entries(s) for s in range(num_shards) if s != victim] == before
            oracle.shards[victim] = copy.deepcopy(at_checkpoint[victim])

        for step in range(1, steps + 1):
            ids = rng.choice(universe, size=600)  # repeats: dedup off, every one a step
            noise = rng.normal(size=(ids.size, 4)).astype(np.float32)
            while True:
                try:
                    values = table.lookup(ids)
                    break
                except (PsUnavailable, PsNotFound) as e:
                    recover(e, "lookup")
            np.testing.assert_array_equal(values, oracle.lookup("emb", ids))
            if step == kill_from:
                cluster.kill(victim)  # SIGKILL, and wait until the process is gone
            grads = (0.1 * values + noise).astype(np.float32)
            pending = list(range(num_shards))
            while pending:
                part = np.isin(np.mod(ids, num_shards), pending)
                try:
                    table.apply_gradients(ids[part], grads[part], step, req_time=T0 + step)
                except (PsUnavailable, PsNotFound) as e:
                    # Every other shard applied its part: only the failed one is retried.
                    failed = shard_of_address(cluster, e)
                    done = [s for s in pending if s != failed]
                    oracle.apply_gradients("emb", ids[part], grads[part], [lr], step,
                                           req_time=T0 + step, shards=done)
                    acked.update((step, s) for s in done)
                    pending = [failed]
                    recover(e, "update")
                    continue
                oracle.apply_gradients("emb", ids[part], grads[part], [lr], step,
                                       req_time=T0 + step, shards=pending)
                acked.update((step, s) for s in pending)
                pending = []
            if step == checkpoint_step:
                prefix = client.save_checkpoint(str(model_dir), step)
                at_checkpoint = oracle.snapshot()

        assert recoveries == ["update"], recoveries
        # Every shard's part of every step was acknowledged exactly once.
        assert acked == {(step, s): 1 for step in range(1, steps + 1)
                         for s in range(num_shards)}
        # Zero lost, zero doubled: every entry of every shard (values, Adagrad
        # accumulators, timestamps) and every table clock equals the oracle's.
        for s in range(num_shards):
            assert entries(s) == lookup_entry(oracle.shards[s].table("emb"), owned(s)), s
        infos = client.shard_infos()
        assert [(i.tables[0].size, i.tables[0].max_update_ts) for i in infos] == [
            (o.table("emb").size(), o.table("emb").max_update_ts) for o in oracle.shards]
        assert [i.hash_filters[0].fill_ratio for i in infos] == [
            float(o.hash_filter(FILTER).hash_filter.num_elements.sum()) / 20_000
            for o in oracle.shards]


def test_kill_9_mid_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    num_shards, victim, n = 2, 1, 300_000
    model_dir = tmp_path / "model"
    ids = np.arange(n, dtype=np.int64)
    values = (ids[:, None] % 1000 * 0.001 + np.arange(32)).astype(np.float32)
    with local_cluster(num_shards) as cluster, \
            PsClient(cluster.addresses, timeout=60, retry=RETRY) as client:
        big = client.create_table(configs.table_config(32, optimizer=configs.adagrad()),
                                  name="big")
        filters = client.create_hash_filters(True, thresholds(1), capacity=5000, split_num=7)
        small = client.create_table(emb_config(), name="small", hash_filters=filters)
        for lo in range(0, n, 100_000):
            big.assign(ids[lo:lo + 100_000], values[lo:lo + 100_000], req_time=T0)
        for step in range(3):  # the filter admits on the second sight
            small.apply_gradients(ids[:500], np.ones((500, 4), np.float32), step,
                                  req_time=T0 + step)
        small_saved = small.lookup_entry(ids[:500])
        first = client.save_checkpoint(str(model_dir), 1)

        # Newer state, then a save that a SIGKILL interrupts on one shard.
        big.assign_add(ids[:100_000], np.ones((100_000, 32), np.float32), req_time=T0 + 9)
        small.apply_gradients(ids[:500], np.ones((500, 4), np.float32), 9, req_time=T0 + 9)
        assets = Path(checkpoints.asset_dir(checkpoints.checkpoint_prefix(str(model_dir), 2)))
        outcome: list[BaseException | str] = []

        def save() -> None:
            try:
                outcome.append(client.save_checkpoint(str(model_dir), 2))
            except BaseException as e:  # reported below
                outcome.append(e)

        saver = threading.Thread(target=save)
        saver.start()
        deadline = time.monotonic() + 30
        writing = f"big_{victim}-"
        while not (assets.is_dir() and any(
                name.startswith(writing) and "-tmp-" in name for name in os.listdir(assets))):
            assert time.monotonic() < deadline and saver.is_alive(), "the save never started"
            time.sleep(0.0005)
        cluster.kill(victim)
        # Killed mid-save: the victim's part of the big table was never completed.
        assert not [p for p in os.listdir(assets) if p.startswith(writing) and "-tmp-" not in p]
        saver.join(60)
        (error,) = outcome
        assert isinstance(error, PsError), error

        # The interrupted checkpoint is not the latest and has no manifest.
        assert checkpoints.latest_checkpoint(str(model_dir)) == first
        assert not (assets / checkpoints.MANIFEST_NAME).exists()
        assert "model.ckpt-2" not in (model_dir / "checkpoint").read_text()

        # The previous checkpoint restores completely, on the restarted shard too.
        cluster.restart(victim)
        assert client.restore_checkpoint(str(model_dir)) == first
        assert big.size() == n
        np.testing.assert_array_equal(big.lookup(ids), values)
        assert small.lookup_entry(ids[:500]) == small_saved
        infos = client.shard_infos()
        by_name = [{t.name: t.size for t in info.tables} for info in infos]
        assert [b["big"] for b in by_name] == [
            int(np.count_nonzero(ids % num_shards == s)) for s in range(num_shards)]

        # The leftovers of the killed save do not get in the way of saving step 2 again.
        second = client.save_checkpoint(str(model_dir), 2)
        assert checkpoints.latest_checkpoint(str(model_dir)) == second
        big.assign(ids[:10], np.zeros((10, 32), np.float32))
        assert client.restore_checkpoint(str(model_dir)) == second
        np.testing.assert_array_equal(big.lookup(ids[:10]), values[:10])
