"""ps_client.torch against a real 2-shard cluster: training through the shards is training.

The proof (issue 14, item 4): one tiny model, data, seed and SGD learning rate trained
with ``ShardedEmbedding`` on the shards and with ``torch.nn.Embedding(sparse=True)`` +
``torch.optim.SGD`` in memory ends with the same embeddings up to float32 summation
order. Then: exact gradients of the bag modes, the step API's misuse errors, the
collection's fused path, and pipelining at staleness 0 equal to no pipelining, bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient, Table
from ps_server.engine.configs import adagrad, sgd, table_config

torch = pytest.importorskip(
    "torch", reason="the [torch] extra is not installed (bash scripts/bootstrap.sh --torch)"
)

from ps_client.torch import (  # noqa: E402 - needs torch
    Feature,
    ShardedEmbedding,
    ShardedEmbeddingBag,
    ShardedEmbeddingBagCollection,
    prefetching,
)

pytestmark = pytest.mark.integration

VOCAB, DIM, FIELDS, BATCH, STEPS, LR = 40, 4, 3, 16, 25, 0.1
_names = itertools.count()


def new_table(client: PsClient, dim: int = DIM, optimizer: eht.OptimizerConfig | None = None,
              lr: float = LR, init: np.ndarray | None = None) -> Table:
    table = client.create_table(
        table_config(dim, optimizer=optimizer or sgd()), name=f"torch_t{next(_names)}",
        learning_rate_fns=(lr,),
    )
    if init is not None:
        table.assign(np.arange(init.shape[0]), init)
    return table


def data(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(ids[BATCH, FIELDS], labels[BATCH])``; ids repeat inside a batch
    and across batches (negative ids too, so both shards own ids of every batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, VOCAB, size=(BATCH, FIELDS))
        labels = (rng.random(BATCH) < 0.4).astype(np.float32)
        out.append((torch.from_numpy(ids - VOCAB // 2), torch.from_numpy(labels)))
    return out


class Tower(torch.nn.Module):
    """The dense part: a linear layer over the concatenated field embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(FIELDS * DIM, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb.reshape(emb.shape[0], -1)).squeeze(-1)


def initial_rows() -> np.ndarray:
    return np.random.default_rng(11).normal(0, 0.5, size=(VOCAB, DIM)).astype(np.float32)


def train_in_memory() -> np.ndarray:
    emb = torch.nn.Embedding(VOCAB, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(initial_rows()))
    tower = Tower()
    opt = torch.optim.SGD([*emb.parameters(), *tower.parameters()], lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for ids, labels in data():
        opt.zero_grad()
        loss_fn(tower(emb(ids + VOCAB // 2)), labels).backward()
        opt.step()
    return emb.weight.detach().numpy().copy()


def train_sharded(client: PsClient, **options: Any) -> tuple[np.ndarray, Table]:
    table = new_table(client)
    table.assign(np.arange(VOCAB) - VOCAB // 2, initial_rows())
    emb = ShardedEmbedding(table, **options)
    tower = Tower()
    opt = torch.optim.SGD(tower.parameters(), lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    # Ids shifted into [-VOCAB/2, VOCAB/2): row i of the in-memory table is id i - VOCAB/2.
    batches = data()
    source = prefetching(batches, emb, inputs=lambda b: (b[0],)) if emb.pipelined else batches
    for step, (ids, labels) in enumerate(source):
        opt.zero_grad()
        loss_fn(tower(emb(ids)), labels).backward()
        opt.step()
        emb.apply_gradients(step)
    emb.close()
    return table.lookup(np.arange(VOCAB) - VOCAB // 2), table


def test_sharded_sgd_equals_in_memory_sgd(client: PsClient) -> None:
    sharded, _ = train_sharded(client)
    reference = train_in_memory()
    assert not np.array_equal(reference, initial_rows())  # it trained
    # Per-occurrence steps on the shards vs one summed step in torch: float32 order only.
    np.testing.assert_allclose(sharded, reference, rtol=1e-6, atol=1e-7)


def test_pipelined_staleness_0_equals_synchronous_exactly(client: PsClient) -> None:
    synchronous, _ = train_sharded(client)
    pipelined, _ = train_sharded(client, pipelined=True, staleness=0)
    np.testing.assert_array_equal(pipelined, synchronous)


def test_pipelined_staleness_1_trains_and_flushes(client: PsClient) -> None:
    rows, _ = train_sharded(client, pipelined=True, staleness=1)
    reference = train_in_memory()
    # Stale by at most one step: close to, not necessarily equal to, the synchronous run.
    np.testing.assert_allclose(rows, reference, atol=0.05)


def test_staleness_0_forward_sees_the_previous_push(client: PsClient) -> None:
    table = new_table(client, dim=2, lr=1.0, init=np.zeros((4, 2), np.float32))
    emb = ShardedEmbedding(table, pipelined=True)
    ids = torch.tensor([1, 2])
    emb(ids).sum().backward()
    emb.prefetch(ids)  # issued before the push below: must be refreshed
    emb.apply_gradients(0)
    out = emb(ids)
    np.testing.assert_array_equal(out.detach().numpy(), -np.ones((2, 2), np.float32))
    assert emb.step_times.refreshed_ids == 2
    emb.close()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_forward_and_exact_gradients(client: PsClient, mode: str) -> None:
    init = np.random.default_rng(5).normal(size=(VOCAB, DIM)).astype(np.float32)
    table = new_table(client, init=init)
    bag = ShardedEmbeddingBag(table, mode=mode)
    values = torch.tensor([3, 7, 3, 3, 9, 1, 7])
    offsets = torch.tensor([0, 3, 3, 5])  # bag 1 is empty
    out = bag(values, offsets)
    ref = torch.nn.EmbeddingBag(VOCAB, DIM, mode=mode)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init))
    np.testing.assert_allclose(out.detach().numpy(), ref(values, offsets).detach().numpy(),
                               rtol=1e-6)
    upstream = torch.from_numpy(np.random.default_rng(6).normal(size=(4, DIM)).astype(np.float32))
    (out * upstream).sum().backward()
    bags = np.array([0, 0, 0, 2, 2, 3, 3])
    counts = np.array([3, 0, 2, 2], np.float32)
    want = upstream.numpy()[bags]
    if mode == "mean":
        want = want / counts[bags][:, None]
    (record,) = bag._records
    assert record.grad is not None
    np.testing.assert_array_equal(record.grad[0], want)  # one gradient per occurrence
    np.testing.assert_array_equal(record.ids[0], values.numpy())


@pytest.mark.parametrize("enable_dedup", [False, True])
def test_apply_gradients_is_table_apply_gradients(client: PsClient, enable_dedup: bool) -> None:
    # Adagrad, where one step per occurrence and one summed step differ.
    init = np.random.default_rng(8).normal(size=(VOCAB, DIM)).astype(np.float32)
    mine = new_table(client, optimizer=adagrad(), init=init)
    twin = new_table(client, optimizer=adagrad(), init=init)
    emb = ShardedEmbedding(mine, enable_dedup=enable_dedup)
    ids = torch.tensor([[1, 5, 1], [5, 5, 2]])
    upstream = torch.from_numpy(
        np.random.default_rng(9).normal(size=(2, 3, DIM)).astype(np.float32)
    )
    (emb(ids) * upstream).sum().backward()
    emb.apply_gradients(7)
    twin.apply_gradients(ids.reshape(-1).numpy(), upstream.reshape(-1, DIM).numpy(), 7,
                         enable_dedup=enable_dedup)
    probe = np.arange(VOCAB)
    np.testing.assert_array_equal(mine.lookup(probe), twin.lookup(probe))


def test_two_forwards_then_one_step_send_both(client: PsClient) -> None:
    table = new_table(client, dim=1, lr=1.0, init=np.zeros((3, 1), np.float32))
    emb = ShardedEmbedding(table)
    emb(torch.tensor([1])).sum().backward()
    (2 * emb(torch.tensor([1, 2]))).sum().backward()
    assert emb.pending() == 2
    emb.apply_gradients(0)
    np.testing.assert_array_equal(table.lookup([1, 2]), [[-3.0], [-2.0]])


def test_misuse_is_a_clear_error(client: PsClient) -> None:
    table = new_table(client)
    emb = ShardedEmbedding(table)
    with pytest.raises(RuntimeError, match="no gradient pending"):
        emb.apply_gradients(0)
    out = emb(torch.tensor([1, 2])).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()
    emb.apply_gradients(0)
    with pytest.raises(RuntimeError, match="no gradient pending"):
        emb.apply_gradients(1)
    # eval mode and no_grad record nothing; a forward never backpropagated is dropped.
    emb.eval()
    assert not emb(torch.tensor([1])).requires_grad
    emb.train()
    with torch.no_grad():
        emb(torch.tensor([1]))
    emb(torch.tensor([3]))
    assert emb.pending() == 0
    with pytest.raises(RuntimeError, match="no gradient pending"):
        emb.apply_gradients(2)
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="mode"):
        ShardedEmbeddingBag(table, mode="max")


def test_collection_equals_one_module_per_feature(client: PsClient) -> None:
    rng = np.random.default_rng(12)
    init_a = rng.normal(size=(VOCAB, 3)).astype(np.float32)
    init_b = rng.normal(size=(VOCAB, 2)).astype(np.float32)
    a, b = new_table(client, 3, init=init_a), new_table(client, 2, init=init_b)
    a2, b2 = new_table(client, 3, init=init_a), new_table(client, 2, init=init_b)
    coll = ShardedEmbeddingBagCollection(client, [
        Feature("user", a), Feature("item", b, "mean"), Feature("tag", a, "mean"),
    ])
    singles = {"user": ShardedEmbeddingBag(a2), "item": ShardedEmbeddingBag(b2, mode="mean"),
               "tag": ShardedEmbeddingBag(a2, mode="mean")}
    feats = {
        "user": (torch.tensor([1, 2, 1]), torch.tensor([0, 1])),
        "item": (torch.tensor([4, 4, 5, 39]), torch.tensor([0, 2])),
        "tag": (torch.tensor([2, 2, 6]), torch.tensor([0, 0])),
    }
    weights = {k: torch.from_numpy(rng.normal(size=(2, d)).astype(np.float32))
               for k, d in (("user", 3), ("item", 2), ("tag", 3))}
    out = coll(feats)
    ref = {k: singles[k](*feats[k]) for k in feats}
    for k in feats:
        np.testing.assert_array_equal(out[k].detach().numpy(), ref[k].detach().numpy())
    sum((out[k] * weights[k]).sum() for k in feats).backward()
    sum((ref[k] * weights[k]).sum() for k in feats).backward()
    coll.apply_gradients(3)
    for k in ("user", "tag", "item"):  # the collection's order: table a's features first
        singles[k].apply_gradients(3)
    probe = np.arange(VOCAB)
    np.testing.assert_array_equal(a.lookup(probe), a2.lookup(probe))
    np.testing.assert_array_equal(b.lookup(probe), b2.lookup(probe))


def test_collection_pipelined_and_jagged_type_errors(client: PsClient) -> None:
    a = new_table(client, 2, init=np.zeros((VOCAB, 2), np.float32), lr=1.0)
    coll = ShardedEmbeddingBagCollection(client, [Feature("f", a)], pipelined=True)
    feats = {"f": (torch.tensor([1, 2]), torch.tensor([0]))}
    coll.prefetch(feats)
    coll(feats)["f"].sum().backward()
    coll.prefetch(feats)
    coll.apply_gradients(0)
    np.testing.assert_array_equal(coll(feats)["f"].detach().numpy(), [[-2.0, -2.0]])
    coll.close()
    with pytest.raises(ValueError, match="missing"):
        coll({"g": (torch.tensor([1]), torch.tensor([0]))})
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        coll([1, 2])
