"""ShardedEmbeddingBagCollection as a drop-in for TorchRec's EmbeddingBagCollection.

Against a real 2-shard cluster: a TorchRec ``KeyedJaggedTensor`` in, a ``KeyedTensor``
out, equal to sums/means of the tables' own lookups of the same ids, and equal to TorchRec's
``EmbeddingBagCollection`` (CPU) holding the same weights, in its output and after one SGD
step on both. Every row and gradient here is a small dyadic fraction, so every sum is
exact in float32 whatever the summation order and the comparisons are exact.

The tests that need TorchRec skip, with the reason, when it is not installed
(``bash scripts/bootstrap.sh --torchrec``); the per-sample weights of the mapping input
are tested without it.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from ps_client import PsClient, Table
from ps_server.engine.configs import sgd, table_config

torch = pytest.importorskip(
    "torch", reason="the [torch] extra is not installed (bash scripts/bootstrap.sh --torch)"
)

from ps_client.torch import (  # noqa: E402 - needs torch
    Feature,
    ShardedEmbeddingBagCollection,
    prefetching,
)

pytestmark = pytest.mark.integration

VOCAB, LR = 12, 0.5
_names = itertools.count()


@pytest.fixture(scope="module")
def trc() -> Any:
    """The torchrec package, or the test skips."""
    return pytest.importorskip(
        "torchrec",
        reason="TorchRec is not installed (bash scripts/bootstrap.sh --torchrec installs "
               "requirements/torchrec.txt)",
    )


def dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/8 in [-2, 2): sums of a few stay exact in float32."""
    return (rng.integers(-16, 16, size=shape) / 8).astype(np.float32)


def new_table(client: PsClient, dim: int, init: np.ndarray) -> Table:
    table = client.create_table(table_config(dim, optimizer=sgd()),
                                name=f"torchrec_t{next(_names)}", learning_rate_fns=(LR,))
    table.assign(np.arange(init.shape[0]), init)
    return table


# Three features, batch 3: f0 and f1 share table t0 (sum); f2 is t1's (mean); f1's
# first bag and f2's last are empty; ids repeat inside a bag and across features; mean
# bags hold 1, 2 or 4 values (dividing by them stays exact).
KEYS = ["f0", "f1", "f2"]
VALUES = [1, 2, 1, 3, 11, 4, 4, 0, 7, 5, 5, 9]
LENGTHS = [2, 1, 1, 0, 3, 1, 2, 2, 0]  # key-major: f0's 3 bags, then f1's, then f2's
WEIGHTS = [0.5, 1.0, 2.0, -1.0, 0.25, 1.5, -0.5, 0.75, 1.0, 2.0, 0.5, 1.0]


def kjt(trc: Any, weighted: bool = False, keys: list[str] = KEYS,
        values: list[int] = VALUES, lengths: list[int] = LENGTHS) -> Any:
    return trc.KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        weights=torch.tensor(WEIGHTS[:len(values)]) if weighted else None,
    )


def expected_bags(table: Table, values: list[int], lengths: list[int], mode: str,
                  weights: list[float] | None = None) -> np.ndarray:
    """Each bag's sum (or mean) of the table's own lookups, computed here in numpy."""
    rows = table.lookup(np.array(values, dtype=np.int64))
    if weights is not None:
        rows = rows * np.array(weights, np.float32)[:, None]
    out, at = [], 0
    for n in lengths:
        bag = rows[at:at + n].sum(axis=0) if n else np.zeros(rows.shape[1], np.float32)
        out.append(bag / max(n, 1) if mode == "mean" else bag)
        at += n
    return np.array(out, dtype=np.float32)


def torchrec_pair(client: PsClient, trc: Any, *, weighted: bool = False,
                  **options: Any) -> tuple[Any, ShardedEmbeddingBagCollection, dict[str, Table]]:
    """TorchRec's EBC and ours over the same configs, holding the same (dyadic) weights."""
    from torchrec.modules.embedding_configs import PoolingType

    configs = [
        trc.EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=VOCAB,
                               feature_names=["f0", "f1"]),
        trc.EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=VOCAB,
                               feature_names=["f2"],
                               pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
    ]
    ebc = trc.EmbeddingBagCollection(tables=configs, is_weighted=weighted,
                                     device=torch.device("cpu"))
    rng = np.random.default_rng(5)
    tables = {}
    for cfg in configs:
        init = dyadic(rng, (VOCAB, cfg.embedding_dim))
        with torch.no_grad():
            ebc.embedding_bags[cfg.name].weight.copy_(torch.from_numpy(init))
        tables[cfg.name] = new_table(client, cfg.embedding_dim, init)
    ours = ShardedEmbeddingBagCollection.from_torchrec_configs(
        client, configs, tables, is_weighted=weighted, **options)
    return ebc, ours, tables


def test_keyed_jagged_tensor_in_keyed_tensor_out(client: PsClient, trc: Any) -> None:
    rng = np.random.default_rng(1)
    t0, t1 = new_table(client, 4, dyadic(rng, (VOCAB, 4))), new_table(client, 3,
                                                                      dyadic(rng, (VOCAB, 3)))
    coll = ShardedEmbeddingBagCollection(
        client, [Feature("f0", t0), Feature("f1", t0), Feature("f2", t1, "mean")])
    out = coll(kjt(trc))
    assert isinstance(out, trc.KeyedTensor)
    assert out.keys() == KEYS
    assert out.length_per_key() == [4, 4, 3]
    assert out.values().shape == (3, 11) and out.values().requires_grad
    got = out.to_dict()
    np.testing.assert_array_equal(got["f0"].detach().numpy(),
                                  expected_bags(t0, VALUES[:4], LENGTHS[:3], "sum"))
    np.testing.assert_array_equal(got["f1"].detach().numpy(),
                                  expected_bags(t0, VALUES[4:8], LENGTHS[3:6], "sum"))
    np.testing.assert_array_equal(got["f2"].detach().numpy(),
                                  expected_bags(t1, VALUES[8:], LENGTHS[6:], "mean"))
    # The same input as a mapping gives the same tensors, as a dict.
    as_dict = coll({k: (jt.values(), jt.offsets()[:-1]) for k, jt in kjt(trc).to_dict().items()})
    for k in KEYS:
        np.testing.assert_array_equal(as_dict[k].detach().numpy(), got[k].detach().numpy())


def test_equals_torchrec_ebc_forward_and_sgd_step(client: PsClient, trc: Any) -> None:
    ebc, ours, tables = torchrec_pair(client, trc)
    features = kjt(trc)
    ref, out = ebc(features), ours(features)
    assert out.keys() == ref.keys() and out.length_per_key() == ref.length_per_key()
    np.testing.assert_array_equal(out.values().detach().numpy(),
                                  ref.values().detach().numpy())
    # One SGD step on both with the same loss: TorchRec's dense weights and our shards'
    # rows end equal (SGD: one step per occurrence sums to one step with the summed grad).
    coef = torch.from_numpy(dyadic(np.random.default_rng(2), (3, 11)))
    opt = torch.optim.SGD(ebc.parameters(), lr=LR)
    (ref.values() * coef).sum().backward()
    opt.step()
    (out.values() * coef).sum().backward()
    ours.apply_gradients(1)
    for name, table in tables.items():
        np.testing.assert_array_equal(table.lookup(np.arange(VOCAB)),
                                      ebc.embedding_bags[name].weight.detach().numpy())


def test_weighted_equals_torchrec_weighted_ebc(client: PsClient, trc: Any) -> None:
    ebc, ours, tables = torchrec_pair(client, trc, weighted=True)
    assert ours.is_weighted()
    features = kjt(trc, weighted=True)
    out = ours(features)
    np.testing.assert_array_equal(out.values().detach().numpy(),
                                  ebc(features).values().detach().numpy())
    np.testing.assert_array_equal(
        out.to_dict()["f2"].detach().numpy(),
        expected_bags(tables["t1"], VALUES[8:], LENGTHS[6:], "sum", WEIGHTS[8:]))
    with pytest.raises(ValueError, match="no per-sample weights"):
        ours(kjt(trc))


def test_unweighted_ignores_weights_and_extra_keys(client: PsClient, trc: Any) -> None:
    """As TorchRec's EBC: an unweighted collection ignores the input's weights, and keys
    that are none of its features; a missing feature is an error."""
    ebc, ours, _ = torchrec_pair(client, trc)
    plain = ours(kjt(trc)).values().detach().numpy()
    np.testing.assert_array_equal(ours(kjt(trc, weighted=True)).values().detach().numpy(), plain)
    wider = kjt(trc, keys=[*KEYS, "other"], values=[*VALUES, 3, 3],
                lengths=[*LENGTHS, 1, 0, 1])
    np.testing.assert_array_equal(ours(wider).values().detach().numpy(), plain)
    np.testing.assert_array_equal(ebc(wider).values().detach().numpy(), plain)
    with pytest.raises(ValueError, match=r"missing: \['f2'\]"):
        ours(kjt(trc, keys=["f0", "f1"], values=VALUES[:8], lengths=LENGTHS[:6]))


def test_pipelined_keyed_jagged_equals_synchronous(client: PsClient, trc: Any) -> None:
    """Prefetching KeyedJaggedTensor batches at staleness 0 trains exactly as without."""
    rng = np.random.default_rng(9)
    batches = []
    for _ in range(4):
        lengths = rng.integers(0, 3, size=9)
        values = rng.integers(0, VOCAB, size=int(lengths.sum()))
        batches.append(kjt(trc, values=values.tolist(), lengths=lengths.tolist()))
    coef = torch.from_numpy(dyadic(rng, (3, 11)))
    finals = []
    for options in ({}, {"pipelined": True}):
        _, ours, tables = torchrec_pair(client, trc, **options)
        source = prefetching(batches, ours) if ours.pipelined else batches
        for step, batch in enumerate(source):
            (ours(batch).values() * coef).sum().backward()
            ours.apply_gradients(step)
        ours.close()
        finals.append([t.lookup(np.arange(VOCAB)) for t in tables.values()])
    for sync, piped in zip(*finals, strict=True):
        np.testing.assert_array_equal(piped, sync)


def test_mapping_per_sample_weights(client: PsClient) -> None:
    """``(values, offsets, per_sample_weights)`` with ``is_weighted=True`` (no TorchRec)."""
    rng = np.random.default_rng(4)
    t0 = new_table(client, 2, dyadic(rng, (VOCAB, 2)))
    coll = ShardedEmbeddingBagCollection(client, [Feature("a", t0)], is_weighted=True)
    values, weights = [3, 3, 5, 1], [0.5, -2.0, 1.0, 0.25]
    out = coll({"a": (torch.tensor(values), torch.tensor([0, 3]), torch.tensor(weights))})
    np.testing.assert_array_equal(out["a"].detach().numpy(),
                                  expected_bags(t0, values, [3, 1], "sum", weights))
    # The gradient of each occurrence is its weight times its bag's: one SGD step each.
    before = t0.lookup(np.arange(VOCAB))
    out["a"].sum().backward()
    coll.apply_gradients(0)
    expect = before.copy()
    for v, w in zip(values, weights, strict=True):
        expect[v] -= LR * w
    np.testing.assert_array_equal(t0.lookup(np.arange(VOCAB)), expect)
    with pytest.raises(ValueError, match="need mode 'sum'"):
        ShardedEmbeddingBagCollection(client, [Feature("a", t0, "mean")], is_weighted=True)
    with pytest.raises(ValueError, match="2 per-sample weights for 4 values"):
        coll({"a": (torch.tensor(values), torch.tensor([0]), torch.tensor([1.0, 1.0]))})
