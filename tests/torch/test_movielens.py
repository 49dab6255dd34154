"""examples/movielens: the data pipeline on synthetic RecBole files, and the DeepFM trained
through a 2-shard cluster against the same model in memory (issue 14, items 3 and 4).

No network: the files are written here in RecBole's atomic format and zipped at the
paths of RecBole's wheel, which ``data.load`` is handed instead of downloading.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ps_client import PsClient

torch = pytest.importorskip(
    "torch", reason="the [torch] extra is not installed (bash scripts/bootstrap.sh --torch)"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from movielens import data as ml  # noqa: E402 - examples/ is not a package
from movielens import train as mt  # noqa: E402

# torch.optim.Adagrad's sparse step warns that COO invariant checks are off (its own tensor).
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

GENRES = ["Action", "Comedy", "Drama", "Children's", "Sci-Fi"]
OCCUPATIONS = ["writer", "artist", "doctor", "student"]


def synthetic_texts(seed: int = 5, users: int = 12, items: int = 15, ratings: int = 400
                    ) -> tuple[str, str, str]:
    """``.inter``, ``.user`` and ``.item`` texts in RecBole's format (ids not contiguous,
    files not sorted, a zip with letters, an item without genres)."""
    rng = np.random.default_rng(seed)
    user_ids = rng.permutation(np.arange(100, 100 + 3 * users, 3))
    zips = ["85711", "85702", "94043", "T8H1N", "10003", "94110"]
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    for k, u in enumerate(user_ids):
        user.append(f"{u}\t{[12, 18, 24, 25, 44, 45, 55, 56, 73][k % 9]}\t{'MF'[k % 2]}\t"
                    f"{OCCUPATIONS[k % 4]}\t{zips[k % 6]}")
    item_ids = rng.permutation(np.arange(1, 2 * items + 1, 2))
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for k, i in enumerate(item_ids):
        genres = "" if k == 3 else " ".join(GENRES[(k + j) % 5] for j in range(1 + k % 3))
        item.append(f"{i}\tMovie {k} (Part {k})\t{1990 + k}\t{genres}")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for _ in range(ratings):
        inter.append(f"{rng.choice(user_ids)}\t{rng.choice(item_ids)}\t"
                     f"{rng.integers(1, 6)}\t{rng.integers(8e8, 9e8)}")
    return "\n".join(inter) + "\n", "\n".join(user) + "\n", "\n".join(item) + "\n"


def fake_wheel(path: Path, texts: tuple[str, str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("recbole/__init__.py", "")
        for kind, text in zip(("inter", "user", "item"), texts, strict=True):
            z.writestr(f"{ml.WHEEL_DIR}/ml-100k.{kind}", text)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> ml.MovieLens:
    return ml.load(tmp_path / "cache", wheel=fake_wheel(tmp_path / "rb.whl", synthetic_texts()))


# ---------------------------------------------------------------- the data pipeline


def test_features_follow_the_files(tmp_path: Path) -> None:
    inter, user, item = synthetic_texts()
    d = ml.load(tmp_path / "cache", wheel=fake_wheel(tmp_path / "rb.whl", (inter, user, item)))
    urows = [line.split("\t") for line in user.splitlines()[1:]]
    irows = [line.split("\t") for line in item.splitlines()[1:]]
    rrows = [line.split("\t") for line in inter.splitlines()[1:]]
    assert len(d) == len(rrows) == 400
    assert d.vocab == {"user": 12, "item": 15, "age": 7, "gender": 2, "occupation": 4,
                       "zip": 5, "genre": 5}
    uindex = {r[0]: k for k, r in enumerate(urows)}
    iindex = {r[0]: k for k, r in enumerate(irows)}
    zip3 = sorted({r[4][:3] for r in urows})
    genres = sorted(GENRES)
    bucket = {12: 0, 18: 1, 24: 1, 25: 2, 44: 3, 45: 4, 55: 5, 56: 6, 73: 6}
    for n, (u, i, rating, _) in enumerate(rrows):  # a reference, row by row
        ur = urows[uindex[u]]
        assert d.columns["user"][n] == uindex[u]
        assert d.columns["item"][n] == iindex[i]
        assert d.columns["age"][n] == bucket[int(ur[1])]
        assert d.columns["gender"][n] == ["F", "M"].index(ur[2])
        assert d.columns["occupation"][n] == sorted(OCCUPATIONS).index(ur[3])
        assert d.columns["zip"][n] == zip3.index(ur[4][:3])
        assert d.labels[n] == (float(rating) >= 4)
    for k, r in enumerate(irows):
        bag = d.genre_values[d.genre_offsets[k]:d.genre_offsets[k + 1]].tolist()
        assert bag == [genres.index(g) for g in r[3].split()]
    assert d.genre_offsets[4] == d.genre_offsets[3]  # the item without genres: empty bag


def test_batch_gathers_genre_bags(dataset: ml.MovieLens) -> None:
    rows = np.array([5, 0, 399, 5, 17], dtype=np.int64)
    feats, labels = dataset.batch(rows)
    assert set(feats) == set(ml.FIELDS)
    np.testing.assert_array_equal(labels, dataset.labels[rows])
    for f in ml.SINGLE_FIELDS:
        np.testing.assert_array_equal(feats[f][0], dataset.columns[f][rows])
        np.testing.assert_array_equal(feats[f][1], np.arange(5))
    values, offsets = feats["genre"]
    ends = [*offsets[1:].tolist(), len(values)]
    for b, r in enumerate(rows):
        it = dataset.columns["item"][r]
        expect = dataset.genre_values[dataset.genre_offsets[it]:dataset.genre_offsets[it + 1]]
        np.testing.assert_array_equal(values[offsets[b]:ends[b]], expect)


def test_split_is_deterministic_and_complete(dataset: ml.MovieLens) -> None:
    train, test = dataset.split(0.25, seed=3)
    assert len(test) == 100 and len(train) == 300
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(400))
    again = dataset.split(0.25, seed=3)
    np.testing.assert_array_equal(again[0], train)
    assert not np.array_equal(dataset.split(0.25, seed=4)[1], test)


def test_cache_is_read_without_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    first = ml.load(tmp_path / "c", wheel=fake_wheel(tmp_path / "rb.whl", synthetic_texts()))
    assert (tmp_path / "c" / "ml-100k.npz").exists()

    def no_network(cache_dir: Path) -> Path:
        raise AssertionError("the cached arrays must be used")

    monkeypatch.setattr(ml, "download_wheel", no_network)
    again = ml.load(tmp_path / "c")
    assert again.vocab == first.vocab
    for f in ml.SINGLE_FIELDS:
        np.testing.assert_array_equal(again.columns[f], first.columns[f])
    np.testing.assert_array_equal(again.genre_values, first.genre_values)
    np.testing.assert_array_equal(again.genre_offsets, first.genre_offsets)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_unknown_ids_are_refused() -> None:
    inter, user, item = synthetic_texts()
    with pytest.raises(ValueError, match="unknown user_id"):
        ml.parse(inter + "7\t1\t5\t1\n", user, item)


def test_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.4).astype(np.float32)
    scores = np.round(rng.normal(size=300), 1).astype(np.float32)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert mt.auc(labels, scores) == pytest.approx(pairs / (pos.size * neg.size), abs=1e-12)


# ---------------------------------------------------------------- shards against memory

DIM, LR, IAV, STD = 4, 0.1, 0.1, 0.3


def args(**over: object) -> argparse.Namespace:
    a = mt.parse_args(["--epochs", "1", "--batch_size", "32", "--dim", str(DIM),
                       "--lr", str(LR), "--initial_accumulator_value", str(IAV),
                       "--init_std", str(STD), "--test_fraction", "0.25"])
    vars(a).update(over)
    return a


def sharded_rows(sparse: mt.ShardedEmbeddingBagCollection, vocab: dict[str, int]
                 ) -> dict[str, np.ndarray]:
    return {f.name: f.table.lookup(np.arange(vocab[f.name])) for f in sparse.features}



@pytest.mark.integration
def test_one_adagrad_step_matches_the_formula(client: PsClient, dataset: ml.MovieLens) -> None:
    """One step on each side against ``w - lr * g / sqrt(iav + g^2)`` (g: the summed
    gradient of the batch's occurrences, from torch's autograd)."""
    rows = mt.initial_rows(dataset.vocab, DIM, STD, seed=1)
    feats, labels = next(mt.batches(dataset, np.arange(64, dtype=np.int64), 64))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    memory = mt.InMemorySparse(rows, LR, IAV)
    loss_fn(mt.DeepFM(DIM, seed=2)(memory(feats)), labels).backward()
    grads = {f: memory._bag[f].weight.grad.to_dense().double().numpy() for f in ml.FIELDS}
    memory.apply_gradients(0)

    sharded = mt.sharded_sparse(client, rows, LR, IAV, pipelined=False)
    loss_fn(mt.DeepFM(DIM, seed=2)(sharded(feats)), labels).backward()
    sharded.apply_gradients(0)
    on_shards = sharded_rows(sharded, dataset.vocab)
    sharded.close()

    for f in ml.FIELDS:
        g = grads[f]
        expect = rows[f] - LR * g / np.sqrt(IAV + g * g)
        assert np.any(g != 0), f
        np.testing.assert_allclose(memory.weights()[f], expect, rtol=1e-6, atol=1e-7,
                                   err_msg=f"in memory, {f}")
        np.testing.assert_allclose(on_shards[f], expect, rtol=1e-6, atol=1e-7,
                                   err_msg=f"shards, {f}")


@pytest.mark.integration
@pytest.mark.parametrize("pipelined", [False, True])
def test_training_through_shards_equals_training_in_memory(
    client: PsClient, dataset: ml.MovieLens, pipelined: bool
) -> None:
    """The example's loop, 10 Adagrad steps (ids repeat within and across batches): the
    shards' rows equal torch's up to float32 summation order, and so does the AUC."""
    a = args()
    rows = mt.initial_rows(dataset.vocab, DIM, STD, seed=1)

    memory = mt.InMemorySparse(rows, LR, IAV)
    memory_model = mt.DeepFM(DIM, seed=2)
    memory_auc = mt.train(dataset, memory, memory_model, a, log=False)

    sharded = mt.sharded_sparse(client, rows, LR, IAV, pipelined=pipelined)
    sharded_model = mt.DeepFM(DIM, seed=2)
    sharded_auc = mt.train(dataset, sharded, sharded_model, a, log=False)
    on_shards = sharded_rows(sharded, dataset.vocab)
    sharded.close()

    in_memory = memory.weights()
    moved = 0
    for f in ml.FIELDS:
        moved += int(np.sum(np.any(in_memory[f] != rows[f], axis=1)))
        # Measured: at most 6e-8 apart (a few ulps of rows up to 0.8).
        np.testing.assert_allclose(on_shards[f], in_memory[f], rtol=1e-6, atol=3e-7,
                                   err_msg=f)
    assert moved > 20  # it trained
    for p, q in zip(sharded_model.parameters(), memory_model.parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6,
                                   atol=3e-7)
    assert sharded_auc == pytest.approx(memory_auc, abs=1e-3)
