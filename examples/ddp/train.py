"""Data-parallel PyTorch trainers sharing one cluster of shards.

Launch N copies with ``torchrun`` (see ``examples/ddp/run.sh`` and
``examples/ddp/README.md``)::

    torchrun --standalone --nproc_per_node=2 examples/ddp/train.py \\
        --addresses=127.0.0.1:50051,127.0.0.1:50052 --model_dir=/tmp/ddp_ckpt

Every rank connects its own :class:`ps_client.PsClient` to the same shards. The sparse
part (a user table and an item table, three features) is a
:class:`ps_client.torch.ShardedEmbeddingBagCollection`: each rank looks up and pushes its
own gradients, the shards apply every push (asynchronous per rank, as Monolith's
parameter-server training). The dense part (an MLP) is wrapped in
``torch.nn.parallel.DistributedDataParallel`` over gloo: its gradients are averaged
across ranks at every step, so its parameters stay identical on every rank.

The conventions this example fixes (the README says what each guarantees):

* rank 0 creates the tables (or attaches to them when they exist already), then
  ``torch.distributed.barrier()``; the other ranks attach with ``client.table(name,
  learning_rate_fns=...)`` after it. ``create_table`` is not idempotent: a second
  creation of a name raises ``PsAlreadyExists``;
* every rank passes the shared step count ``t`` (0, 1, ...) as ``global_step``: the
  learning-rate functions give every rank the same rate at step ``t``;
* rank ``r`` of ``N`` reads examples ``[t*N*B + r*B, t*N*B + (r+1)*B)`` of the seeded
  synthetic click data set at step ``t`` (``B`` = ``--batch_size``);
* at the end every rank's pushes have landed (``flush`` then a barrier) and rank 0 saves
  the shards' checkpoint (``client.save_checkpoint(model_dir, steps)``) and the dense
  ``state_dict`` next to it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient, Table
from ps_client.torch import Feature, ShardedEmbeddingBagCollection, prefetching
from ps_server.engine import configs

TABLES = ("ddp_user", "ddp_item")
FEATURES = ("user", "item", "history")  # user -> ddp_user; item, history -> ddp_item

Jagged = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class ClickData:
    """The whole synthetic click data set (every rank builds the same one from the seed).

    Example ``k``: one user id, one item id, a history bag of item ids
    ``history[history_offsets[k]:history_offsets[k+1]]`` (0 to ``max_history`` long) and a
    click label drawn from hidden per-user and per-item preferences.
    """

    users: npt.NDArray[np.int64]
    items: npt.NDArray[np.int64]
    history: npt.NDArray[np.int64]
    history_offsets: npt.NDArray[np.int64]  # len(users) + 1
    labels: npt.NDArray[np.float32]


def click_data(seed: int, num_examples: int, num_users: int = 200, num_items: int = 500,
               max_history: int = 4) -> ClickData:
    """Deterministic in ``seed``: popular (small) ids are drawn more often."""
    rng = np.random.default_rng(seed)
    user_pref = rng.normal(0.0, 1.0, num_users)
    item_pref = rng.normal(0.0, 1.0, num_items)
    users = (num_users * rng.random(num_examples) ** 2).astype(np.int64)
    items = (num_items * rng.random(num_examples) ** 2).astype(np.int64)
    lengths = rng.integers(0, max_history + 1, num_examples)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    history = (num_items * rng.random(int(offsets[-1])) ** 2).astype(np.int64)
    # Mean history preference per example (0 for an empty history).
    hist_sum = np.add.reduceat(np.append(item_pref[history], 0.0), offsets[:-1]) * (lengths > 0)
    hist_mean = hist_sum / np.maximum(lengths, 1)
    logit = user_pref[users] + item_pref[items] + 0.5 * hist_mean - 0.3
    labels = (rng.random(num_examples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return ClickData(users, items, history, offsets, labels)


def rank_batch(data: ClickData, step: int, rank: int, world_size: int,
               batch_size: int) -> tuple[dict[str, Jagged], torch.Tensor]:
    """Rank ``rank``'s slice of global batch ``step``: examples
    ``[step*N*B + rank*B, step*N*B + (rank+1)*B)``, as ``{feature: (values, offsets)}``
    (``torch.nn.EmbeddingBag``'s input) and the labels."""
    begin = (step * world_size + rank) * batch_size
    end = begin + batch_size
    one = torch.arange(batch_size)
    h0, h1 = int(data.history_offsets[begin]), int(data.history_offsets[end])
    features = {
        "user": (torch.from_numpy(data.users[begin:end]), one),
        "item": (torch.from_numpy(data.items[begin:end]), one),
        "history": (torch.from_numpy(data.history[h0:h1]),
                    torch.from_numpy(data.history_offsets[begin:end] - h0)),
    }
    return features, torch.from_numpy(data.labels[begin:end])


# ---------------------------------------------------------------- model


class Tower(torch.nn.Module):
    """The dense part: an MLP over the concatenated user, item and history embeddings."""

    def __init__(self, dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(FEATURES) * dim, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([embeddings[f] for f in FEATURES], dim=1)
        out: torch.Tensor = self.net(x).squeeze(1)
        return out


def table_config(dim: int, optimizer: str) -> eht.EmbeddingHashTableConfig:
    """Zeros initializer: a row's first value does not depend on which rank creates it
    (a random initializer draws from one generator per table, in creation order)."""
    opt = configs.sgd() if optimizer == "sgd" else configs.adagrad()
    return configs.table_config(dim, optimizer=opt, initializer=configs.zeros())


def open_tables(client: PsClient, rank: int, dim: int, optimizer: str,
                lr: float) -> list[Table]:
    """Rank 0 creates the tables (or attaches when they exist: a second run on the same
    cluster continues training); everyone else attaches after the barrier. The
    learning-rate functions are client-side: every rank passes the same ones."""
    lrs = (lr,)
    if rank == 0:
        existing = set(client.tables())
        for name in TABLES:
            if name not in existing:
                client.create_table(table_config(dim, optimizer), name=name,
                                    learning_rate_fns=lrs)
    dist.barrier()
    return [client.table(name, learning_rate_fns=lrs) for name in TABLES]


def dense_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the dense parameters' bytes, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- training


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--addresses", default=os.environ.get("PS_ADDRESSES", ""),
                   help="comma-separated host:port of shard 0, 1, ... (env PS_ADDRESSES)")
    p.add_argument("--model_dir", default="", help="checkpoint directory (rank 0 saves)")
    p.add_argument("--steps", type=int, default=200, help="synchronous steps per rank")
    p.add_argument("--batch_size", type=int, default=64, help="examples per rank and step")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="data set and dense init")
    p.add_argument("--optimizer", choices=("sgd", "adagrad"), default="adagrad",
                   help="of the tables and of the dense part")
    p.add_argument("--lr", type=float, default=0.05, help="sparse learning rate")
    p.add_argument("--dense_lr", type=float, default=0.05)
    p.add_argument("--sync_sparse", action="store_true",
                   help="barrier after every push: a lookup sees every rank's earlier steps")
    p.add_argument("--pipelined", action="store_true",
                   help="prefetch the next lookup, push in the background (staleness 0)")
    p.add_argument("--report_dir", default="",
                   help="each rank writes rank<r>.json (dense digest and parameters, loss)")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    args = p.parse_args(argv)
    if not args.addresses:
        p.error("give the shard addresses: --addresses=h:p,h:p or PS_ADDRESSES")
    if args.sync_sparse and args.pipelined:
        p.error("--sync_sparse needs lookups after the barrier; it excludes --pipelined")
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
    data = click_data(args.seed, args.steps * world * args.batch_size)
    with PsClient(addresses, timeout=30) as client:
        user_table, item_table = open_tables(client, rank, args.dim, args.optimizer, args.lr)
        sparse = ShardedEmbeddingBagCollection(
            client,
            [Feature("user", user_table), Feature("item", item_table),
             Feature("history", item_table, "mean")],
            pipelined=args.pipelined,
        )
        # DDP broadcasts rank 0's initial parameters; then averages gradients each step.
        dense = DistributedDataParallel(Tower(args.dim, args.hidden, args.seed))
        opt: torch.optim.Optimizer
        if args.optimizer == "sgd":
            opt = torch.optim.SGD(dense.parameters(), lr=args.dense_lr)
        else:
            opt = torch.optim.Adagrad(dense.parameters(), lr=args.dense_lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def batches() -> Iterator[tuple[dict[str, Jagged], torch.Tensor]]:
            for step in range(args.steps):
                yield rank_batch(data, step, rank, world, args.batch_size)

        source = (prefetching(batches(), sparse, inputs=lambda b: (b[0],))
                  if args.pipelined else batches())
        losses: list[float] = []
        started = time.monotonic()
        for step, (features, labels) in enumerate(source):
            loss = loss_fn(dense(sparse(features)), labels)
            opt.zero_grad()
            loss.backward()  # DDP all-reduces the dense gradients here
            opt.step()
            sparse.apply_gradients(global_step=step)  # this rank's own sparse gradients
            if args.sync_sparse:
                dist.barrier()  # every rank's step-`step` push has landed
            losses.append(loss.item())
        sparse.close()  # waits for this rank's last push
        dist.barrier()  # ... and for every other rank's
        elapsed = time.monotonic() - started
        prefix = ""
        if rank == 0 and args.model_dir:
            prefix = client.save_checkpoint(args.model_dir, args.steps)
            torch.save(dense.module.state_dict(), Path(args.model_dir) / f"dense-{args.steps}.pt")
        window = max(1, len(losses) // 10)
        report = {
            "rank": rank, "world_size": world, "steps": args.steps,
            "dense_sha256": dense_digest(dense.module),
            "dense": {k: v.tolist() for k, v in dense.module.state_dict().items()},
            "first_loss": float(np.mean(losses[:window])),
            "last_loss": float(np.mean(losses[-window:])),
            "examples_per_s": args.steps * args.batch_size / max(elapsed, 1e-9),
            "checkpoint": prefix,
            "rows": {t.name: t.size() for t in (user_table, item_table)} if rank == 0 else {},
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        report = train(args)
        if args.report_dir:
            out = Path(args.report_dir) / f"rank{report['rank']}.json"
            out.write_text(json.dumps(report))
        print(f"[rank {report['rank']}/{report['world_size']}] loss "
              f"{report['first_loss']:.4f} -> {report['last_loss']:.4f}, "
              f"{report['examples_per_s']:.0f} examples/s, dense "
              f"{report['dense_sha256'][:12]}"
              + (f", {report['rows']} rows, checkpoint {report['checkpoint']}"
                 if report["rank"] == 0 else ""), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
