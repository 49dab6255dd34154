"""DeepFM on MovieLens-100k whose sparse part lives on the shards (``ps_client.torch``).

``bash examples/movielens/run.sh`` trains it twice and prints both test AUCs: through a
local 2-shard cluster, and ``--in_memory`` with plain ``torch.nn.EmbeddingBag`` +
``torch.optim.Adagrad``. Same data, split, seed, initial rows and learning rates.

The model (DeepFM): each of the 7 fields (user, item, age, gender, occupation, zip,
genre bag) has an embedding ``[w, v_1..v_k]`` — the first-order weight and the factor
vector in one row, so one lookup serves both halves:
``logit = b + sum_f w_f + 0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2) + MLP(v_1 .. v_F)``.
The dense part (``b`` and the MLP) is trained by ``torch.optim.Adam`` in both variants.

The sparse part is trained with Adagrad, on the shards (``ShardedEmbeddingBagCollection``,
one table per field, one fused round trip per shard, the next batch's lookup prefetched
while this one computes) or in memory (``torch.optim.Adagrad``). Both compute the same
update (docs/semantics.md §5.1 against torch's Adagrad):

* Monolith's Adagrad: ``norm = initial_accumulator_value``; ``norm += g^2``;
  ``w -= lr / sqrt(norm) * g`` — no epsilon;
* torch's: ``state_sum = initial_accumulator_value``; ``state_sum += g^2``;
  ``w -= lr * g / (sqrt(state_sum) + eps)`` — so torch runs with ``eps=0`` (allowed;
  ``initial_accumulator_value > 0`` keeps the root positive) and the same
  ``initial_accumulator_value``;
* torch sums the occurrences of an id in a batch (a sparse gradient is coalesced)
  and makes one step; the shards do the same with ``enable_dedup=True`` (without it,
  every occurrence would be its own Adagrad step, a different optimizer).

What is left is float32 rounding: the order of the summed occurrences and
``lr / sqrt(n) * g`` against ``lr * (g / sqrt(n))``, an ulp or so per step.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: `movielens.data`

from movielens.data import FIELDS, I64, MovieLens, load
from ps_client import PsClient
from ps_client.testing import local_cluster
from ps_client.torch import Feature, ShardedEmbeddingBagCollection, prefetching
from ps_server.engine import configs

# torch.optim.Adagrad's sparse step builds a COO tensor and warns that invariant checks
# are off; it is torch's own, valid tensor.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

MODES = {f: ("mean" if f == "genre" else "sum") for f in FIELDS}

Batch = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


class Sparse(Protocol):
    """What the loop needs of a sparse side: a forward and a step."""

    def __call__(self, features: Any) -> dict[str, torch.Tensor]: ...
    def apply_gradients(self, global_step: int) -> None: ...
    def flush(self) -> None: ...
    def train(self, mode: bool = True) -> Any: ...


def initial_rows(vocab: dict[str, int], dim: int, std: float, seed: int
                 ) -> dict[str, npt.NDArray[np.float32]]:
    """The embedding rows both variants start from (``[w, v]``, dim + 1 columns)."""
    rng = np.random.default_rng(seed)
    return {f: rng.normal(0.0, std, size=(vocab[f], dim + 1)).astype(np.float32)
            for f in FIELDS}


class InMemorySparse(torch.nn.Module):
    """The reference: ``torch.nn.EmbeddingBag(sparse=True)`` per field + ``torch.optim.Adagrad``."""

    def __init__(self, rows: dict[str, npt.NDArray[np.float32]], lr: float,
                 initial_accumulator_value: float) -> None:
        super().__init__()
        self.bags = torch.nn.ModuleDict()
        self._bag: dict[str, torch.nn.EmbeddingBag] = {}  # the same modules, typed
        for f in FIELDS:
            bag = torch.nn.EmbeddingBag(rows[f].shape[0], rows[f].shape[1], mode=MODES[f],
                                        sparse=True)
            with torch.no_grad():
                bag.weight.copy_(torch.from_numpy(rows[f]))
            self.bags[f] = self._bag[f] = bag
        # eps=0: Monolith's Adagrad has no epsilon (see the module docstring).
        self.optimizer = torch.optim.Adagrad(
            self.parameters(), lr=lr, initial_accumulator_value=initial_accumulator_value,
            eps=0.0,
        )

    def forward(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        return {f: self._bag[f](*features[f]) for f in FIELDS}

    def apply_gradients(self, global_step: int) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def flush(self) -> None:
        pass

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        return {f: self._bag[f].weight.detach().numpy().copy() for f in FIELDS}


def sharded_sparse(client: PsClient, rows: dict[str, npt.NDArray[np.float32]], lr: float,
                   initial_accumulator_value: float, pipelined: bool = True
                   ) -> ShardedEmbeddingBagCollection:
    """One Adagrad table per field on the shards, rows set to ``rows``, in one collection."""
    features = []
    for f in FIELDS:
        table = client.create_table(
            configs.table_config(
                rows[f].shape[1],
                optimizer=configs.adagrad(initial_accumulator_value=initial_accumulator_value),
            ),
            learning_rate_fns=(lr,),
        )
        table.assign(np.arange(rows[f].shape[0]), rows[f])
        features.append(Feature(f, table, MODES[f]))
    # enable_dedup: one Adagrad step per id and batch with the summed gradient, as torch.
    return ShardedEmbeddingBagCollection(client, features, enable_dedup=True,
                                         pipelined=pipelined)


class DeepFM(torch.nn.Module):
    """The dense part: bias, first-order sum, FM interaction, MLP over the factor vectors."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        layers: list[torch.nn.Module] = []
        width = len(FIELDS) * dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        layers.append(torch.nn.Linear(width, 1))
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.stack([emb[f] for f in FIELDS], dim=1)  # [batch, fields, 1 + dim]
        first, v = x[..., 0], x[..., 1:]
        fm = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.mlp(v.reshape(v.shape[0], -1)).squeeze(1)
        out: torch.Tensor = self.bias + first.sum(dim=1) + fm + deep
        return out


def auc(labels: npt.NDArray[np.float32], scores: npt.NDArray[np.float32]) -> float:
    """Area under the ROC curve (Mann-Whitney rank statistic, ties averaged)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0 + 1.0, ends - starts)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def batches(data: MovieLens, rows: I64, batch_size: int) -> Iterator[Batch]:
    for start in range(0, rows.shape[0], batch_size):
        feats, labels = data.batch(rows[start:start + batch_size])
        yield ({f: (torch.from_numpy(v), torch.from_numpy(o)) for f, (v, o) in feats.items()},
               torch.from_numpy(labels))


def evaluate(data: MovieLens, rows: I64, sparse: Sparse, model: DeepFM,
             batch_size: int = 8192) -> tuple[float, float]:
    """``(auc, mean log loss)`` on ``rows``."""
    sparse.flush()
    sparse.train(False)
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for feats, y in batches(data, rows, batch_size):
            scores.append(model(sparse(feats)))
            labels.append(y)
    sparse.train(True)
    model.train()
    s, y = torch.cat(scores), torch.cat(labels)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y).item()
    return auc(y.numpy(), s.numpy()), loss


def train(data: MovieLens, sparse: Sparse, model: DeepFM, args: argparse.Namespace,
          log: bool = True) -> float:
    """Train ``args.epochs`` epochs, print the test AUC after each; return the last."""
    train_rows, test_rows = data.split(args.test_fraction, args.split_seed)
    dense_opt = torch.optim.Adam(model.parameters(), lr=args.dense_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order_rng = np.random.default_rng(args.seed)
    step, test_auc = 0, float("nan")
    for epoch in range(args.epochs):
        order = order_rng.permutation(train_rows)
        if args.max_steps:
            order = order[:args.max_steps * args.batch_size]
        source: Iterator[Batch] = batches(data, order, args.batch_size)
        if getattr(sparse, "pipelined", False):
            source = prefetching(source, sparse, inputs=lambda b: (b[0],))  # type: ignore[arg-type]
        total, n = 0.0, 0
        for feats, labels in source:
            loss = loss_fn(model(sparse(feats)), labels)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            sparse.apply_gradients(global_step=step)
            step += 1
            total += loss.item()
            n += 1
        test_auc, test_loss = evaluate(data, test_rows, sparse, model)
        if log:
            print(f"epoch {epoch + 1}: train loss {total / max(n, 1):.4f}, "
                  f"test loss {test_loss:.4f}, test AUC {test_auc:.4f}", flush=True)
    return test_auc


def final_rows(sparse: Sparse, vocab: dict[str, int]) -> dict[str, npt.NDArray[np.float32]]:
    """Every field's embedding rows, ``[vocab, 1 + dim]``, wherever they live."""
    if isinstance(sparse, InMemorySparse):
        return sparse.weights()
    assert isinstance(sparse, ShardedEmbeddingBagCollection)
    sparse.flush()
    return {f.name: f.table.lookup(np.arange(vocab[f.name])) for f in sparse.features}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--in_memory", action="store_true",
                   help="torch.nn.EmbeddingBag + torch.optim.Adagrad instead of the shards")
    p.add_argument("--addresses", default="",
                   help="comma-separated shard addresses (default: start a local cluster)")
    p.add_argument("--num_shards", type=int, default=2, help="shards of the local cluster")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help="where the RecBole wheel and the parsed arrays are cached "
                        "(default ~/.cache/monolith-ps/movielens)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_steps", type=int, default=0, help="cap the steps of an epoch")
    p.add_argument("--dim", type=int, default=8, help="factor vector size k")
    p.add_argument("--lr", type=float, default=0.1, help="Adagrad learning rate (sparse)")
    p.add_argument("--initial_accumulator_value", type=float, default=0.1)
    p.add_argument("--init_std", type=float, default=0.01)
    p.add_argument("--dense_lr", type=float, default=3e-3, help="Adam learning rate (dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split_seed", type=int, default=2024)
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--no_pipeline", action="store_true",
                   help="shards: no prefetching (the results are the same)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--save_rows", type=Path, default=None,
                   help="write the final embedding rows of every field to this .npz")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load(args.cache_dir)
    print(f"MovieLens-100k: {len(data)} ratings, {float(data.labels.mean()):.3f} positive, "
          f"vocab {data.vocab} (loaded in {time.perf_counter() - t0:.1f}s)", flush=True)
    rows = initial_rows(data.vocab, args.dim, args.init_std, args.seed)
    model = DeepFM(args.dim, seed=args.seed)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.in_memory:
            variant = "in_memory"
            sparse: Sparse = InMemorySparse(rows, args.lr, args.initial_accumulator_value)
        else:
            variant = f"shards({args.num_shards if not args.addresses else 'given'})"
            if args.addresses:
                addresses = args.addresses.split(",")
            else:
                cluster = stack.enter_context(local_cluster(num_shards=args.num_shards))
                addresses = cluster.addresses
            client = stack.enter_context(PsClient(addresses, timeout=60))
            sparse = sharded_sparse(client, rows, args.lr, args.initial_accumulator_value,
                                    pipelined=not args.no_pipeline)
            stack.callback(sparse.close)
        test_auc = train(data, sparse, model, args)
        if args.save_rows is not None:
            saved: dict[str, Any] = dict(final_rows(sparse, data.vocab))
            np.savez_compressed(args.save_rows, **saved)
    seconds = time.perf_counter() - start
    print(f"RESULT variant={variant} test_auc={test_auc:.6f} seconds={seconds:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
