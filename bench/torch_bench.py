"""PyTorch training benchmark: ``ps_client.torch`` on local shards against in-memory torch.

A synthetic Criteo-shaped model: 26 sparse features (one id each, Zipf-distributed over
``--vocab`` ids per feature, all in one table of dim 16), 13 dense features, a
two-layer MLP over their concatenation, BCE loss, SGD (lr 0.05) on both parts. It is
trained for ``--steps`` batches of ``--batch`` examples:

* **in memory**: ``torch.nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SGD`` (the baseline);
* **sharded**: ``ShardedEmbeddingBagCollection`` (26 features, one fused lookup and one
  fused push per step) on 1 and 2 local shard processes, synchronous, pipelined with
  staleness 0 (exact) and pipelined with staleness 1.

It prints training examples/s, the ratio to the in-memory baseline measured in the same
run, and the time of a step split into lookup wait, compute (forward, backward, dense
step, bookkeeping) and push wait. Needs the ``[torch]`` extra (``bash
scripts/bootstrap.sh --torch``); without it, it says so and exits 0.

Measured here (``--steps 40 --batch 1024``, vocab 100k, 2 cores shared with other
work, so noisy): in memory 133k ex/s; 1 shard 17.7k (0.13x) synchronous, 16.8k
pipelined at staleness 0, 24.7k at staleness 1 (0.19x); 2 shards 22.7k (0.17x), 21.1k,
27.3k (0.21x). Synchronous steps are dominated by the push wait (~27-36 ms of ~50);
at staleness 0 with Zipf ids nearly every batch shares ids with the previous one, so
the forward waits for the previous push before re-reading them: little gain; at
staleness 1 the push wait all but vanishes.

Usage: ``python bench/torch_bench.py [--quick] [--steps N] [--batch B] [--vocab V]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

SPARSE, DENSE, DIM, LR = 26, 13, 16, 0.05

Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]


def make_batches(steps: int, batch: int, vocab: int, seed: int = 1) -> list[Batch]:
    """``(ids[batch, 26] as table ids, dense[batch, 13], labels[batch])`` per step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = np.minimum(rng.zipf(1.2, size=(batch, SPARSE)) - 1, vocab - 1)
        ids = idx + np.arange(SPARSE, dtype=np.int64)[None, :] * vocab
        dense = rng.normal(size=(batch, DENSE)).astype(np.float32)
        labels = (rng.random(batch) < 0.25).astype(np.float32)
        out.append((ids.astype(np.int64), dense, labels))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=100_000)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print("torch_bench: skipped, the [torch] extra is not installed "
              "(bash scripts/bootstrap.sh --torch)")
        return 0
    steps = args.steps or (15 if args.quick else 200)
    batch = args.batch or (256 if args.quick else 2048)
    vocab = min(args.vocab, 5_000) if args.quick else args.vocab
    run(steps, batch, vocab, shard_counts=(1,) if args.quick else (1, 2))
    return 0


def run(steps: int, batch: int, vocab: int, shard_counts: tuple[int, ...]) -> None:
    import torch

    from ps_client import PsClient
    from ps_client.testing import local_cluster
    from ps_client.torch import Feature, ShardedEmbeddingBagCollection, prefetching
    from ps_server.engine import configs

    torch.set_num_threads(1)
    batches = make_batches(steps, batch, vocab)
    names = [f"C{i + 1}" for i in range(SPARSE)]
    offsets = torch.arange(batch)

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(SPARSE * DIM + DENSE, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        )

    loss_fn = torch.nn.BCEWithLogitsLoss()
    print(f"torch_bench: {steps} steps x {batch} examples, {SPARSE} sparse features "
          f"(vocab {vocab} each, dim {DIM}), {DENSE} dense, torch {torch.__version__}")

    # ---- in memory
    emb = torch.nn.EmbeddingBag(SPARSE * vocab, DIM, mode="sum", sparse=True)
    torch.nn.init.zeros_(emb.weight)
    top = mlp()
    opt = torch.optim.SGD([*emb.parameters(), *top.parameters()], lr=LR)
    started = time.perf_counter()
    for ids, dense, labels in batches:
        flat = torch.from_numpy(ids.reshape(-1))
        x = emb(flat, torch.arange(0, flat.shape[0])).reshape(batch, SPARSE * DIM)
        loss = loss_fn(top(torch.cat([x, torch.from_numpy(dense)], 1)).squeeze(1),
                       torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    base = steps * batch / (time.perf_counter() - started)
    print(f"{'in-memory torch.nn.EmbeddingBag':<44} {base:>10,.0f} ex/s   1.00x")

    def features(b: Batch) -> tuple[dict[str, tuple[Any, Any]]]:
        return ({n: (torch.from_numpy(b[0][:, i].copy()), offsets)
                 for i, n in enumerate(names)},)

    for shards in shard_counts:
        with local_cluster(shards) as cluster, PsClient(cluster.addresses) as client:
            for label, options in (("synchronous", {}),
                                   ("pipelined, staleness 0", {"pipelined": True}),
                                   ("pipelined, staleness 1",
                                    {"pipelined": True, "staleness": 1})):
                table = client.create_table(
                    configs.table_config(DIM, optimizer=configs.sgd()), learning_rate_fns=[LR]
                )
                coll = ShardedEmbeddingBagCollection(
                    client, [Feature(n, table) for n in names], **options
                )
                top = mlp()
                opt = torch.optim.SGD(top.parameters(), lr=LR)
                source: Iterator[Batch] = (
                    prefetching(batches, coll, inputs=features) if coll.pipelined
                    else iter(batches)
                )
                coll.step_times.reset()
                started = time.perf_counter()
                for step, b in enumerate(source):
                    out = coll(*features(b))
                    x = torch.cat([out[n] for n in names] + [torch.from_numpy(b[1])], 1)
                    loss = loss_fn(top(x).squeeze(1), torch.from_numpy(b[2]))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    coll.apply_gradients(step)
                coll.close()
                elapsed = time.perf_counter() - started
                rate = steps * batch / elapsed
                t = coll.step_times
                per = 1e3 / steps
                compute = elapsed - t.lookup_wait - t.push_wait
                print(f"{f'{shards} shard(s), {label}':<44} {rate:>10,.0f} ex/s "
                      f"{rate / base:>6.2f}x   per step: lookup wait {t.lookup_wait * per:6.1f} "
                      f"ms, compute {compute * per:6.1f} ms, push wait {t.push_wait * per:6.1f} ms")
    return None


if __name__ == "__main__":
    sys.exit(main())
