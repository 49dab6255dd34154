"""Two data-parallel trainers (torchrun, DDP over gloo) sharing a 2-shard cluster (issue 14,
item 2).

Two real shard servers on loopback; ``torchrun --standalone --nproc_per_node=2
examples/ddp/train.py`` in a child process; then:

* both ranks finished and wrote their report;
* the dense parameters are identical on both ranks (same SHA-256) and equal to a
  one-process reference;
* the rows on the shards are what SGD gives when every rank's gradient of its own loss
  is applied: ``w <- w - lr * sum over ranks of d loss_r / d w`` per step, the dense part
  ``p <- p - lr * mean over ranks of d loss_r / d p``. The reference computes that in
  memory (``torch.nn.functional.embedding_bag`` over zero-initialised tensors), never from
  the shards. Ids overlap across ranks, so the shards really combine both ranks' pushes.

``--sync_sparse`` makes the run deterministic (a barrier after every push: the lookups of
step ``t`` see every rank's pushes of steps ``< t`` and none of step ``t``); the one-step
run without it checks the guarantee DDP gives by itself: a step's all-reduce orders every
rank's lookup of that step before any rank's push of it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ps_client import PsClient
from tests.integration.conftest import REPO, start_inprocess_server

torch = pytest.importorskip(
    "torch", reason="the [torch] extra is not installed (bash scripts/bootstrap.sh --torch)"
)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = REPO / "examples" / "ddp" / "train.py"
WORLD, BATCH, DIM, HIDDEN, SEED, LR, DENSE_LR = 2, 16, 4, 8, 7, 0.5, 0.3


def load_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


train = load_train()


@contextlib.contextmanager
def two_shards() -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_inprocess_server(shard_index=i, num_shards=2))
                   for i in range(2)]
        yield [s.address for s in servers]


def run_trainers(addresses: list[str], tmp_path: Path, steps: int,
                 *flags: str) -> list[dict[str, object]]:
    """torchrun 2 ranks of examples/ddp/train.py; their reports, rank order."""
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", str(TRAIN),
        f"--addresses={','.join(addresses)}", f"--model_dir={tmp_path / 'model'}",
        f"--steps={steps}", f"--batch_size={BATCH}", f"--dim={DIM}", f"--hidden={HIDDEN}",
        f"--seed={SEED}", "--optimizer=sgd", f"--lr={LR}", f"--dense_lr={DENSE_LR}",
        f"--report_dir={report_dir}", "--timeout=60", *flags,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"
    reports = [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rank"] for r in reports] == list(range(WORLD))
    assert all(r["world_size"] == WORLD and r["steps"] == steps for r in reports)
    return reports


def reference(steps: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The same training in one process: user rows, item rows, dense state."""
    fn = torch.nn.functional
    data = train.click_data(SEED, steps * WORLD * BATCH)
    num_items = int(max(data.items.max(), data.history.max())) + 1
    users = torch.zeros(int(data.users.max()) + 1, DIM, requires_grad=True)
    items = torch.zeros(num_items, DIM, requires_grad=True)
    tower = train.Tower(DIM, HIDDEN, SEED)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(steps):
        params = [users, items, *tower.parameters()]
        for p in params:
            p.grad = None
        for rank in range(WORLD):  # gradients add up over the ranks
            features, labels = train.rank_batch(data, step, rank, WORLD, BATCH)
            emb = {
                name: fn.embedding_bag(features[name][0], weight, features[name][1], mode=mode)
                for name, weight, mode in (("user", users, "sum"), ("item", items, "sum"),
                                           ("history", items, "mean"))
            }
            loss_fn(tower(emb), labels).backward()
        with torch.no_grad():
            users -= LR * users.grad  # each rank's own gradient, all applied
            items -= LR * items.grad
            for p in tower.parameters():
                p -= DENSE_LR * (p.grad / WORLD)  # DDP: the mean over the ranks
    dense = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
    return users.detach().numpy(), items.detach().numpy(), dense


def check_against_reference(addresses: list[str], reports: list[dict[str, object]],
                            steps: int) -> None:
    # Dense: identical on both ranks, and the reference's.
    assert reports[0]["dense_sha256"] == reports[1]["dense_sha256"]
    users, items, dense = reference(steps)
    rank_dense = reports[0]["dense"]
    assert isinstance(rank_dense, dict)
    assert set(rank_dense) == set(dense)
    for name, value in dense.items():
        np.testing.assert_allclose(np.asarray(rank_dense[name], np.float32), value,
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    # Sparse: the rows on the shards (ids the data never used are zeros on both sides).
    with PsClient(addresses) as client:
        got_users = client.table("ddp_user").lookup(np.arange(users.shape[0]))
        got_items = client.table("ddp_item").lookup(np.arange(items.shape[0]))
    assert np.count_nonzero(np.abs(users).sum(1)) > 10  # it trained
    # Rows are ~1e-3; one rank's update missing would be ~1e-4 off; float32 order ~1e-9.
    np.testing.assert_allclose(got_users, users, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got_items, items, rtol=1e-5, atol=1e-8)


def test_ranks_share_ids() -> None:
    """The data set makes both ranks push the same ids in one step (what the sparse
    checks rely on to test that the shards add up both ranks' updates)."""
    data = train.click_data(SEED, WORLD * BATCH)
    ranks = [train.rank_batch(data, 0, r, WORLD, BATCH)[0] for r in range(WORLD)]
    shared = np.intersect1d(ranks[0]["item"][0].numpy(), ranks[1]["item"][0].numpy())
    assert shared.size > 0


def test_two_trainers_two_shards_synchronous_sparse(tmp_path: Path) -> None:
    steps = 4
    with two_shards() as addresses:
        reports = run_trainers(addresses, tmp_path, steps, "--sync_sparse")
        check_against_reference(addresses, reports, steps)
        # Rank 0 saved both halves of the checkpoint at the shared step count.
        assert reports[0]["checkpoint"] == str(tmp_path / "model" / f"model.ckpt-{steps}")
        assert (tmp_path / "model" / f"dense-{steps}.pt").is_file()
        assert (tmp_path / "model" / "checkpoint").is_file()


def test_one_asynchronous_step_applies_both_ranks(tmp_path: Path) -> None:
    with two_shards() as addresses:
        reports = run_trainers(addresses, tmp_path, 1)
        check_against_reference(addresses, reports, 1)
