"""MovieLens-100k for the example: fetched at run time from RecBole's wheel, never shipped.

The data set is not ours to redistribute. RecBole's wheel on PyPI carries a copy in
RecBole's atomic-file format (``recbole/dataset_example/ml-100k/ml-100k.inter|.user|.item``),
so the first run downloads that wheel with ``pip download recbole==1.2.1 --no-deps``
(pinned by version and sha256), reads the three files straight out of it (no install,
no import of RecBole) and caches the parsed arrays as ``ml-100k.npz`` under the cache
directory (default ``~/.cache/monolith-ps/movielens``). Later runs read the ``.npz``.

Features per rating (all ids are dense, from 0):

* ``user``, ``item``: the rows of the ``.user`` / ``.item`` files, in file order;
* ``age``: the user's age in MovieLens-1M's 7 buckets (<18, 18-24, 25-34, 35-44,
  45-49, 50-55, 56+);
* ``gender``, ``occupation``: sorted vocabularies of the ``.user`` file;
* ``zip``: the first 3 characters of the zip code (the area; the full code is almost
  one per user), sorted vocabulary;
* ``genre``: the movie's genres, a multi-hot bag (``class:token_seq`` of the ``.item``
  file; 19 genres, an item may have several, a few have none).

Label: rating >= 4. Split: a seeded permutation, ``test_fraction`` of the ratings held out.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

RECBOLE_VERSION = "1.2.1"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
WHEEL_DIR = "recbole/dataset_example/ml-100k"
DEFAULT_CACHE = Path.home() / ".cache" / "monolith-ps" / "movielens"
CACHE_FORMAT = 1  # bump when the parsed arrays change meaning

AGE_BOUNDS = np.array([18, 25, 35, 45, 50, 56])  # np.digitize: 7 buckets
SINGLE_FIELDS = ("user", "item", "age", "gender", "occupation", "zip")
FIELDS = (*SINGLE_FIELDS, "genre")

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class MovieLens:
    """Parsed ratings: one row per rating, features as dense ids."""

    columns: dict[str, I64]  # SINGLE_FIELDS -> int64[n]
    genre_values: I64  # genres of item i: genre_values[genre_offsets[i]:genre_offsets[i+1]]
    genre_offsets: I64  # int64[num_items + 1]
    labels: npt.NDArray[np.float32]  # 1.0 when rating >= 4
    vocab: dict[str, int]  # FIELDS -> number of ids

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, test_fraction: float = 0.2, seed: int = 2024) -> tuple[I64, I64]:
        """``(train_rows, test_rows)``: a seeded permutation, deterministic for a seed."""
        perm = np.random.default_rng(seed).permutation(len(self)).astype(np.int64)
        n_test = round(len(self) * test_fraction)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])

    def batch(self, rows: I64) -> tuple[dict[str, tuple[I64, I64]], npt.NDArray[np.float32]]:
        """``({field: (values, offsets)}, labels)`` for ``rows``: ``torch.nn.EmbeddingBag``
        input (bag ``b`` is ``values[offsets[b]:offsets[b+1]]``), one bag per row."""
        n = rows.shape[0]
        one_each = np.arange(n, dtype=np.int64)
        out = {f: (self.columns[f][rows], one_each) for f in SINGLE_FIELDS}
        items = self.columns["item"][rows]
        starts = self.genre_offsets[items]
        lengths = self.genre_offsets[items + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        # Position j of bag b reads genre_values[starts[b] + j]: one gather, no loop.
        within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths)
        out["genre"] = (self.genre_values[np.repeat(starts, lengths) + within], offsets)
        return out, self.labels[rows]


# ------------------------------------------------------------------ parsing


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """RecBole's atomic file: a header of ``name:type`` columns, tab-separated rows."""
    lines = text.splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return header, rows


def _vocab(values: list[str]) -> tuple[dict[str, int], I64]:
    names = sorted(set(values))
    index = {v: i for i, v in enumerate(names)}
    return index, np.array([index[v] for v in values], dtype=np.int64)


def parse(inter: str, user: str, item: str) -> MovieLens:
    """Build the features from the texts of ``ml-100k.inter``, ``.user`` and ``.item``."""
    uh, urows = _table(user)
    users = {h: [r[uh.index(h)] for r in urows] for h in uh}
    user_index = {u: i for i, u in enumerate(users["user_id"])}
    age = np.digitize(np.array(users["age"], dtype=np.int64), AGE_BOUNDS).astype(np.int64)
    genders, gender = _vocab(users["gender"])
    occupations, occupation = _vocab(users["occupation"])
    zips, zip3 = _vocab([z[:3] for z in users["zip_code"]])

    ih, irows = _table(item)
    id_col, class_col = ih.index("item_id"), ih.index("class")
    item_index = {r[id_col]: i for i, r in enumerate(irows)}
    item_genres = [r[class_col].split() if len(r) > class_col else [] for r in irows]
    genre_index, _ = _vocab([g for gs in item_genres for g in gs])
    genre_values = np.array([genre_index[g] for gs in item_genres for g in gs], dtype=np.int64)
    genre_offsets = np.concatenate([[0], np.cumsum([len(gs) for gs in item_genres])])

    header, _ = _table(inter.split("\n", 1)[0] + "\n")
    cols = np.loadtxt(io.StringIO(inter), delimiter="\t", skiprows=1, dtype=np.float64,
                      ndmin=2)
    raw_user = cols[:, header.index("user_id")].astype(np.int64)
    raw_item = cols[:, header.index("item_id")].astype(np.int64)
    rating = cols[:, header.index("rating")]
    # Ids are looked up through the .user/.item rows (vectorized over a sorted key table).
    u = _remap(raw_user, user_index, "user_id")
    i = _remap(raw_item, item_index, "item_id")
    columns = {
        "user": u, "item": i, "age": age[u], "gender": gender[u],
        "occupation": occupation[u], "zip": zip3[u],
    }
    vocab = {
        "user": len(user_index), "item": len(item_index), "age": len(AGE_BOUNDS) + 1,
        "gender": len(genders), "occupation": len(occupations), "zip": len(zips),
        "genre": len(genre_index),
    }
    return MovieLens(columns, genre_values, genre_offsets.astype(np.int64),
                     (rating >= 4).astype(np.float32), vocab)


def _remap(raw: I64, index: dict[str, int], what: str) -> I64:
    keys = np.array([int(k) for k in index], dtype=np.int64)
    vals = np.array(list(index.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    pos = np.clip(np.searchsorted(keys, raw), 0, keys.size - 1)
    unknown = keys[pos] != raw
    if np.any(unknown):
        raise ValueError(f"ratings name {int(unknown.sum())} unknown {what}s, e.g. "
                         f"{raw[unknown][:3].tolist()}")
    return vals[pos]


# ------------------------------------------------------------------ fetching and caching


def read_wheel(wheel: Path) -> MovieLens:
    """Parse the three ml-100k files inside a RecBole wheel (a zip file)."""
    with zipfile.ZipFile(wheel) as z:
        texts = [z.read(f"{WHEEL_DIR}/ml-100k.{kind}").decode("utf-8", errors="replace")
                 for kind in ("inter", "user", "item")]
    return parse(*texts)


def download_wheel(cache_dir: Path) -> Path:
    """``pip download`` RecBole's pinned wheel (hash-checked) into ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
    if (cache_dir / name).exists():
        return cache_dir / name
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"recbole=={RECBOLE_VERSION} --hash=sha256:{RECBOLE_SHA256}\n")
        print(f"fetching MovieLens-100k: pip download recbole=={RECBOLE_VERSION} --no-deps "
              f"(RecBole's wheel ships it; not redistributed by monolith-ps)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
             "--only-binary=:all:", "-q", "-r", str(req), "-d", str(cache_dir)],
            check=True,
        )
    if not (cache_dir / name).exists():
        raise RuntimeError(f"pip download left no {name} in {cache_dir}")
    return cache_dir / name


def load(cache_dir: Path | None = None, wheel: Path | None = None) -> MovieLens:
    """MovieLens-100k from the cache, else parsed from ``wheel`` (default: downloaded)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    npz = cache_dir / "ml-100k.npz"
    if npz.exists():
        with np.load(npz) as z:
            if int(z["format"]) == CACHE_FORMAT:
                return MovieLens(
                    {f: z[f"col_{f}"] for f in SINGLE_FIELDS}, z["genre_values"],
                    z["genre_offsets"], z["labels"],
                    {f: int(n) for f, n in zip(FIELDS, z["vocab"], strict=True)},
                )
    data = read_wheel(wheel if wheel is not None else download_wheel(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_suffix(f".{os.getpid()}.tmp.npz")
    arrays: dict[str, Any] = {f"col_{f}": data.columns[f] for f in SINGLE_FIELDS}
    arrays.update(format=np.array(CACHE_FORMAT), genre_values=data.genre_values,
                  genre_offsets=data.genre_offsets, labels=data.labels,
                  vocab=np.array([data.vocab[f] for f in FIELDS], dtype=np.int64))
    np.savez_compressed(tmp, **arrays)
    tmp.replace(npz)
    return data
