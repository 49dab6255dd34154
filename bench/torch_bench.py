"""PyTorch training benchmark: ``ps_client.torch`` on local shards against in-memory torch.

A synthetic Criteo-shaped model: 26 sparse features (one id each, Zipf-distributed over
``--vocab`` ids per feature, all in one table of dim 16), 13 dense features, a
two-layer MLP over their concatenation, BCE loss, SGD (lr 0.05) on both parts. It is
trained for ``--steps`` batches of ``--batch`` examples:

* **in memory**: ``torch.nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SGD`` (the baseline);
* **sharded**: ``ShardedEmbeddingBagCollection`` (26 features, one fused lookup and one
  fused push per step) on 1 and 2 local shard processes, synchronous, pipelined with
  staleness 0 (exact) and pipelined with staleness 1.

With TorchRec installed (``bash scripts/bootstrap.sh --torchrec``) the same model is also
trained with TorchRec's ``EmbeddingBagCollection`` on CPU (one table, the 26 features,
fed a ``KeyedJaggedTensor``): as TorchRec builds it (a dense gradient of the whole
table, ``torch.optim.SGD``; 3 steps only, each takes seconds at full size) and with its
``EmbeddingBag``s switched to sparse gradients (the fast way to train it unsharded on
CPU); and ``ShardedEmbeddingBagCollection`` runs once more fed the same
``KeyedJaggedTensor`` (the drop-in swap, returning a ``KeyedTensor``).

It prints training examples/s, the ratio to the in-memory baseline measured in the same
run (and, with TorchRec, to TorchRec's sparse-gradient EBC), and the time of a step split
into lookup wait, compute (forward, backward, dense step, bookkeeping) and push wait.
Needs the ``[torch]`` extra (``bash scripts/bootstrap.sh --torch``); without it, it says
so and exits 0.

Measured here (``--steps 40 --batch 1024``, vocab 100k, 2 cores shared with other
work, so noisy): in memory 133k ex/s; 1 shard 17.7k (0.13x) synchronous, 16.8k
pipelined at staleness 0, 24.7k at staleness 1 (0.19x); 2 shards 22.7k (0.17x), 21.1k,
27.3k (0.21x). Synchronous steps are dominated by the push wait (~27-36 ms of ~50);
at staleness 0 with Zipf ids nearly every batch shares ids with the previous one, so
the forward waits for the previous push before re-reading them: little gain; at
staleness 1 the push wait all but vanishes.

With TorchRec 1.8.0 (same flags, a later run with the machine loaded ~4x over its 2
cores, so the in-memory baseline fell to 66k ex/s): TorchRec EBC with its dense gradient
96 ex/s (a 2.6M x 16 gradient and SGD step per batch), with sparse gradients 27.5k
(0.42x in memory); ours against the latter: 1 shard 0.49x synchronous, 0.60x at
staleness 0, 0.90x at staleness 1; fed the KJT 0.81x synchronous and 1.22x at staleness
1; 2 shards 0.63x / 0.64x / 0.69x, KJT 0.69x / 0.65x. The KJT input costs nothing over
the mapping (it is sliced in numpy, no ``to_dict()``); the spread between runs here is
load noise.

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


def torchrec_or_none() -> Any:
    """The torchrec package, or None when it is not installed (it is optional)."""
    if importlib.util.find_spec("torchrec") is None:
        return None
    import torchrec

    return torchrec


def keyed_jagged(trc: Any, names: list[str], ids: npt.NDArray[np.int64]) -> Any:
    """The batch as TorchRec's input: one id per feature and example, key-major."""
    import torch

    return trc.KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1)),
        lengths=torch.ones(ids.size, dtype=torch.int64),
    )


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
    print(f"{'in-memory torch.nn.EmbeddingBag':<48} {base:>10,.0f} ex/s   1.00x")

    trc = torchrec_or_none()
    kjts = [keyed_jagged(trc, names, b[0]) for b in batches] if trc is not None else []
    ref: float | None = None
    if trc is not None:
        # The dense gradient of the whole table costs seconds a step at the full size:
        # a few steps tell its rate.
        dense_steps = min(steps, 3)
        for label, sparse, n in ((f"TorchRec EBC (CPU, dense grad, {dense_steps} steps)",
                                  False, dense_steps),
                                 ("TorchRec EBC (CPU, sparse grad)", True, steps)):
            ebc = trc.EmbeddingBagCollection(tables=[trc.EmbeddingBagConfig(
                name="t", embedding_dim=DIM, num_embeddings=SPARSE * vocab, feature_names=names,
            )], device=torch.device("cpu"))
            bag = ebc.embedding_bags["t"]
            bag.sparse = sparse
            torch.nn.init.zeros_(bag.weight)
            top = mlp()
            opt = torch.optim.SGD([*ebc.parameters(), *top.parameters()], lr=LR)
            started = time.perf_counter()
            for kjt, (_, dense, labels) in zip(kjts[:n], batches[:n], strict=True):
                x = ebc(kjt).values()
                loss = loss_fn(top(torch.cat([x, torch.from_numpy(dense)], 1)).squeeze(1),
                               torch.from_numpy(labels))
                opt.zero_grad()
                loss.backward()
                opt.step()
            rate = n * batch / (time.perf_counter() - started)
            print(f"{label:<48} {rate:>10,.0f} ex/s {rate / base:>6.2f}x")
            ref = rate
    else:
        print("(TorchRec not installed: bash scripts/bootstrap.sh --torchrec to compare with "
              "its EmbeddingBagCollection)")

    def features(b: tuple[Any, ...]) -> tuple[dict[str, tuple[Any, Any]]]:
        return ({n: (torch.from_numpy(b[0][:, i].copy()), offsets)
                 for i, n in enumerate(names)},)

    for shards in shard_counts:
        with local_cluster(shards) as cluster, PsClient(cluster.addresses) as client:
            runs: list[tuple[str, dict[str, Any], bool]] = [
                ("synchronous", {}, False),
                ("pipelined, staleness 0", {"pipelined": True}, False),
                ("pipelined, staleness 1", {"pipelined": True, "staleness": 1}, False),
            ]
            if trc is not None:
                runs += [("synchronous, KJT input", {}, True),
                         ("pipelined, staleness 1, KJT input",
                          {"pipelined": True, "staleness": 1}, True)]
            for label, options, keyed in runs:
                inputs = (lambda b: (kjts[b[3]],)) if keyed else features
                table = client.create_table(
                    configs.table_config(DIM, optimizer=configs.sgd()), learning_rate_fns=[LR]
                )
                coll = ShardedEmbeddingBagCollection(
                    client, [Feature(n, table) for n in names], **options
                )
                top = mlp()
                opt = torch.optim.SGD(top.parameters(), lr=LR)
                numbered = [(*b, i) for i, b in enumerate(batches)]
                source: Iterator[tuple[Any, ...]] = (
                    prefetching(numbered, coll, inputs=inputs) if coll.pipelined
                    else iter(numbered)
                )
                coll.step_times.reset()
                started = time.perf_counter()
                for step, b in enumerate(source):
                    out = coll(*inputs(b))
                    emb = out.values() if keyed else torch.cat([out[n] for n in names], 1)
                    x = torch.cat([emb, torch.from_numpy(b[1])], 1)
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
                vs = "" if ref is None else f" {rate / ref:>6.2f}x TorchRec"
                print(f"{f'{shards} shard(s), {label}':<48} {rate:>10,.0f} ex/s "
                      f"{rate / base:>6.2f}x{vs}   per step: lookup wait "
                      f"{t.lookup_wait * per:6.1f} ms, compute {compute * per:6.1f} ms, "
                      f"push wait {t.push_wait * per:6.1f} ms")
    return None


if __name__ == "__main__":
    sys.exit(main())
