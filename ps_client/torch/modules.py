"""``torch.nn.Module`` faces of sharded tables (see :mod:`ps_client.torch`)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from ps_client.client import PsClient, Table
from ps_client.learning_rate_functions import evaluate_learning_rates
from ps_client.torch._pipeline import Ids, Rows, SparseSide, StepTimes

B = TypeVar("B")

MODES = ("sum", "mean")


@dataclass(eq=False)
class _Record:
    """One forward's looked-up occurrences, waiting for their gradient."""

    ids: list[Ids]  # per table: the ids of every occurrence, in forward order
    dims: list[int]  # per table: its dim
    grad: list[Rows] | None = None  # per table: d loss / d row, one per occurrence


class _Capture(torch.autograd.Function):
    """Identity on the looked-up rows; its backward hands their gradient to the record."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, rows: torch.Tensor, record: _Record) -> Any:
        ctx.record = record
        return rows.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        record: _Record = ctx.record
        if record.grad is not None:
            raise RuntimeError(
                "ps_client.torch: a second backward through the same forward of a sharded "
                "embedding without apply_gradients() in between; its gradient was already "
                "taken (call module.apply_gradients(global_step) after each backward, or "
                "run a new forward)"
            )
        g = grad.detach().to(torch.float32).contiguous().cpu().numpy()
        sizes = [i.shape[0] * d for i, d in zip(record.ids, record.dims, strict=True)]
        parts = np.split(g, np.cumsum(sizes)[:-1])
        record.grad = [p.reshape(-1, d) for p, d in zip(parts, record.dims, strict=True)]
        return None, None, None


def _as_ids(x: Any, what: str) -> npt.NDArray[np.int64]:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{what} must be an integer tensor, got {x.dtype}")
        return x.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False).reshape(-1)


def _unique(ids: Ids) -> tuple[Ids, npt.NDArray[np.intp]]:
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, inverse.reshape(-1)


class _ShardedModule(torch.nn.Module):
    """What every module here shares: the pending records and the step API."""

    def __init__(self, *, pipelined: bool, staleness: int) -> None:
        super().__init__()
        self._records: list[_Record] = []
        # Makes the outputs require grad; not a parameter (no optimizer or DDP sees it).
        self._anchor = torch.zeros((), requires_grad=True)
        self._side = SparseSide(self._lookup_fn, self._push_fn, pipelined, staleness)

    # Subclasses provide these two.
    def _lookup_fn(self, uniq: Sequence[Ids]) -> list[Rows]:
        raise NotImplementedError

    def _push_fn(self, ids: Sequence[Ids], grads: Sequence[Rows], global_step: int,
                 req_time: int) -> None:
        raise NotImplementedError

    def _capture(self, rows: list[Rows], inverse: list[npt.NDArray[np.intp]],
                 occurrence_ids: list[Ids]) -> torch.Tensor:
        """Per-occurrence rows of every table, flattened and concatenated table by table,
        as one 1-D autograd tensor."""
        occ = [r[i].reshape(-1) for r, i in zip(rows, inverse, strict=True)]
        flat = occ[0] if len(occ) == 1 else np.concatenate(occ)
        out = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        if not (self.training and torch.is_grad_enabled()):
            return out
        record = _Record(ids=occurrence_ids, dims=[r.shape[1] for r in rows])
        self._records.append(record)
        result: torch.Tensor = _Capture.apply(self._anchor, out, record)
        return result

    @property
    def pipelined(self) -> bool:
        """True when lookups and pushes run in the background (see the package docs)."""
        return self._side.pipelined

    @property
    def staleness(self) -> int:
        """Most recent pushes of this module a pipelined forward may not reflect."""
        return self._side.staleness

    @property
    def step_times(self) -> StepTimes:
        """Seconds spent waiting for lookups and pushes (``.reset()`` to start over)."""
        return self._side.times

    def pending(self) -> int:
        """Number of forwards whose gradient was captured and not yet applied."""
        return sum(r.grad is not None for r in self._records)

    def apply_gradients(self, global_step: int, *, req_time: int = 0) -> None:
        """Send the gradients of every forward since the last call to the shards.

        Every occurrence of an id is one optimizer step on its shard (or one summed
        step per id with ``enable_dedup``), exactly as :meth:`ps_client.Table.apply_gradients`
        with the table's optimizer, learning-rate functions at ``global_step`` and hash
        filter. Forwards whose output got no gradient (not part of the loss) are
        dropped. Pipelined: the push runs in the background; its error, if any, is
        raised by the next forward, ``apply_gradients`` or :meth:`flush`.

        :raises RuntimeError: no backward since the last call (nothing to apply).
        """
        done = [r for r in self._records if r.grad is not None]
        self._records = []
        if not done:
            raise RuntimeError(
                "ps_client.torch: apply_gradients() with no gradient pending: run a forward "
                "in training mode and loss.backward() first"
            )
        num_tables = len(done[0].ids)
        ids = [np.concatenate([r.ids[t] for r in done]) for t in range(num_tables)]
        grads = [np.concatenate([r.grad[t] for r in done if r.grad is not None])
                 for t in range(num_tables)]
        self._side.push(ids, grads, int(global_step), int(req_time))

    def prefetch(self, *args: Any) -> None:
        """Start the lookup of a later forward's input now (pipelined modules; else a no-op).

        Takes the same arguments as ``forward``; the forward with equal ids uses it.
        """
        self._side.prefetch(self._unique_of(*args))

    def _unique_of(self, *args: Any) -> list[Ids]:
        raise NotImplementedError

    def flush(self) -> None:
        """Wait for every push in flight (before evaluating or checkpointing)."""
        self._side.flush()

    def close(self) -> None:
        """Flush and stop the background threads."""
        self._side.close()


class _OneTable(_ShardedModule):
    def __init__(self, table: Table, *, enable_dedup: bool, pipelined: bool,
                 staleness: int) -> None:
        if not isinstance(table, Table):
            raise TypeError(f"expected a ps_client.Table, got {type(table).__name__}")
        super().__init__(pipelined=pipelined, staleness=staleness)
        self.table = table
        self.enable_dedup = bool(enable_dedup)

    @property
    def embedding_dim(self) -> int:
        return self.table.dim_size

    def _lookup_fn(self, uniq: Sequence[Ids]) -> list[Rows]:
        return [self.table.lookup(uniq[0])]

    def _push_fn(self, ids: Sequence[Ids], grads: Sequence[Rows], global_step: int,
                 req_time: int) -> None:
        self.table.apply_gradients(ids[0], grads[0], global_step,
                                   enable_dedup=self.enable_dedup, req_time=req_time)

    def _rows_of(self, ids: Ids) -> torch.Tensor:
        uniq, inverse = _unique(ids)
        rows = self._side.rows([uniq])
        return self._capture(rows, [inverse], [ids]).reshape(-1, self.embedding_dim)


class ShardedEmbedding(_OneTable):
    """``torch.nn.Embedding`` whose rows live in a sharded :class:`ps_client.Table`.

    ``forward(ids)`` returns ``float32[*ids.shape, dim]``: the distinct ids are read
    from the shards in one call, and in training mode (``module.train()`` and grad
    enabled) the output takes part in autograd. After ``loss.backward()``,
    :meth:`apply_gradients` sends the gradient of every occurrence to the shards.

    :param enable_dedup: sum the gradients of an id's occurrences on its shard and make
        one optimizer step (default: one step per occurrence).
    :param pipelined: run lookups and pushes in the background (``prefetch``).
    :param staleness: pipelined only: a forward may miss the updates of at most this many
        of the most recent ``apply_gradients`` calls of this module (0: none).
    """

    def __init__(self, table: Table, *, enable_dedup: bool = False, pipelined: bool = False,
                 staleness: int = 0) -> None:
        super().__init__(table, enable_dedup=enable_dedup, pipelined=pipelined,
                         staleness=staleness)

    def _unique_of(self, *args: Any) -> list[Ids]:
        (ids,) = args
        return [np.unique(_as_ids(ids, "ids"))]

    def forward(self, ids: Any) -> torch.Tensor:
        shape = tuple(ids.shape) if hasattr(ids, "shape") else (len(ids),)
        flat = _as_ids(ids, "ids")
        return self._rows_of(flat).reshape(*shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.table.name!r}, dim={self.embedding_dim}"


def _bag_index(offsets: Any, n: int) -> tuple[npt.NDArray[np.int64], int]:
    """Bag of each value and the number of bags, from ``torch.nn.EmbeddingBag`` offsets."""
    off = _as_ids(offsets, "offsets")
    if off.size and (off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] > n):
        raise ValueError(
            "offsets must start at 0, never decrease and not exceed len(values); "
            f"got {off[:8].tolist()}... for {n} values"
        )
    bags = np.zeros(n, dtype=np.int64)
    if off.size > 1:
        starts = off[1:][off[1:] < n]
        np.add.at(bags, starts, 1)
        bags = np.cumsum(bags)
    return bags, int(off.size)


def _reduce(per_value: torch.Tensor, bags: npt.NDArray[np.int64], num_bags: int,
            mode: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    dim = per_value.shape[-1]
    if weights is not None:  # per-sample weights (sum mode only, checked by the caller)
        per_value = per_value * weights.reshape(-1, 1)
    index = torch.from_numpy(bags)
    out = torch.zeros(num_bags, dim, dtype=torch.float32).index_add(0, index, per_value)
    if mode == "mean":
        counts = np.bincount(bags, minlength=num_bags).astype(np.float32)
        out = out / torch.from_numpy(np.maximum(counts, 1.0))[:, None]
    return out


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class ShardedEmbeddingBag(_OneTable):
    """``torch.nn.EmbeddingBag`` (``sum`` or ``mean``) over a sharded :class:`ps_client.Table`.

    ``forward(values, offsets)`` takes ``torch.nn.EmbeddingBag``'s 1-D input: bag ``b``
    holds ``values[offsets[b]:offsets[b+1]]`` (the last bag runs to the end); an empty
    bag gives a zero row. Returns ``float32[len(offsets), dim]``. Gradients and the
    step API are those of :class:`ShardedEmbedding` (each value is one occurrence; in
    ``mean`` mode its gradient is the bag's divided by the bag's size).
    """

    def __init__(self, table: Table, *, mode: str = "sum", enable_dedup: bool = False,
                 pipelined: bool = False, staleness: int = 0) -> None:
        super().__init__(table, enable_dedup=enable_dedup, pipelined=pipelined,
                         staleness=staleness)
        self.mode = _check_mode(mode)

    def _unique_of(self, *args: Any) -> list[Ids]:
        return [np.unique(_as_ids(args[0], "values"))]

    def forward(self, values: Any, offsets: Any) -> torch.Tensor:
        flat = _as_ids(values, "values")
        bags, num_bags = _bag_index(offsets, flat.shape[0])
        return _reduce(self._rows_of(flat), bags, num_bags, self.mode)

    def extra_repr(self) -> str:
        return f"{self.table.name!r}, dim={self.embedding_dim}, mode={self.mode!r}"


# ---------------------------------------------------------------- collection


@dataclass(frozen=True)
class Feature:
    """One input feature of a :class:`ShardedEmbeddingBagCollection`: its table and bag mode."""

    name: str
    table: Table
    mode: str = "sum"


# One feature's input: its values (ids), bag starts, and per-sample weights or None.
_Jagged = tuple[Any, Any, Any]


def _is_keyed_jagged(features: Any) -> bool:
    """A TorchRec ``KeyedJaggedTensor`` (duck-typed: TorchRec is never imported to check)."""
    return all(callable(getattr(features, m, None))
               for m in ("keys", "values", "lengths", "weights_or_none"))


def _keyed_jagged_items(kjt: Any) -> dict[str, _Jagged]:
    """``{key: (values, bag starts, weights)}`` of a ``KeyedJaggedTensor``, sliced from its
    flat ``values()`` / ``lengths()`` (key-major: every bag of the first key, then the
    next key's), with one bag count per key (``stride_per_key()``, so variable batch
    sizes per key work too)."""
    keys = list(kjt.keys())
    values = kjt.values()
    weights = kjt.weights_or_none()
    lengths = _as_ids(kjt.lengths(), "KeyedJaggedTensor lengths")
    if callable(getattr(kjt, "stride_per_key", None)):
        per_key = np.asarray(kjt.stride_per_key(), dtype=np.int64).reshape(-1)
    else:
        per_key = np.full(len(keys), lengths.shape[0] // max(len(keys), 1), dtype=np.int64)
    if per_key.shape[0] != len(keys) or int(per_key.sum()) != lengths.shape[0]:
        raise ValueError(f"KeyedJaggedTensor: {lengths.shape[0]} lengths do not split into "
                         f"{len(keys)} keys of {per_key.tolist()} bags")
    value_off = np.concatenate([[0], np.cumsum(lengths)])
    key_off = np.concatenate([[0], np.cumsum(per_key)])
    out: dict[str, _Jagged] = {}
    for k, key in enumerate(keys):
        starts = value_off[key_off[k]:key_off[k + 1]]
        lo, hi = int(value_off[key_off[k]]), int(value_off[key_off[k + 1]])
        out[key] = (values[lo:hi], starts - lo, None if weights is None else weights[lo:hi])
    return out


def _jagged_items(features: Any) -> tuple[dict[str, _Jagged], bool]:
    """``{name: (values, offsets, weights)}`` and whether the input was keyed (TorchRec),
    from a mapping ``{name: (values, offsets[, per_sample_weights])}`` or a TorchRec
    ``KeyedJaggedTensor``."""
    if isinstance(features, Mapping):
        items: dict[str, _Jagged] = {}
        for k, v in features.items():
            parts = tuple(v)
            if len(parts) not in (2, 3):
                raise ValueError(f"feature {k!r}: expected (values, offsets) or "
                                 f"(values, offsets, per_sample_weights), got {len(parts)} items")
            items[k] = (parts[0], parts[1], parts[2] if len(parts) == 3 else None)
        return items, False
    if _is_keyed_jagged(features):
        return _keyed_jagged_items(features), True
    raise TypeError(
        "features must be a mapping {name: (values, offsets)} or a torchrec "
        f"KeyedJaggedTensor, got {type(features).__name__}"
    )


def _as_weights(w: Any, n: int, name: str) -> torch.Tensor:
    t = w if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    t = t.to(torch.float32).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"feature {name!r}: {t.shape[0]} per-sample weights for {n} values")
    return t


def _keyed_tensor(keys: list[str], dims: list[int], values: torch.Tensor) -> Any:
    """TorchRec's ``KeyedTensor`` (imported only here: its input was a TorchRec type)."""
    jagged = importlib.import_module("torchrec.sparse.jagged_tensor")
    return jagged.KeyedTensor(keys=keys, length_per_key=dims, values=values, key_dim=1)


_POOLING = {"SUM": "sum", "MEAN": "mean"}


class ShardedEmbeddingBagCollection(_ShardedModule):
    """Several features over several tables, one fused round trip per shard.

    ``forward(features)`` takes ``{name: (values, offsets)}`` (``offsets`` as in
    ``torch.nn.EmbeddingBag``: each bag's start; a third item, per-sample weights, with
    ``is_weighted=True``) and returns ``{name: float32[batch, dim]}``; or a TorchRec
    ``KeyedJaggedTensor`` and returns what TorchRec's ``EmbeddingBagCollection`` returns,
    a ``KeyedTensor`` (keys in feature order, ``values()`` ``float32[batch, sum of
    dims]``), so a TorchRec model can swap its collection for this one. Keys of the
    ``KeyedJaggedTensor`` that are no feature here are ignored, as TorchRec does; the
    mapping must name exactly the features. TorchRec is never imported unless its input
    is one of its types.

    Features that share a table share its lookups. Lookups go through
    :meth:`PsClient.fused_lookup` and gradients through
    :meth:`PsClient.fused_apply_gradient` with each table's learning-rate functions at
    ``global_step``; every occurrence is one optimizer step (``enable_dedup``: one summed
    step per id and table). Pipelining options as in :class:`ShardedEmbedding`.

    :param is_weighted: as TorchRec's: bags are sums of ``weight * row`` with the input's
        per-sample weights (``KeyedJaggedTensor.weights()``), which must be given; ``sum``
        features only (as ``torch.nn.EmbeddingBag``). Unweighted, weights are ignored.
    """

    def __init__(self, client: PsClient, features: Sequence[Feature], *,
                 enable_dedup: bool = False, pipelined: bool = False,
                 staleness: int = 0, is_weighted: bool = False) -> None:
        super().__init__(pipelined=pipelined, staleness=staleness)
        if not features:
            raise ValueError("a collection needs at least one feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be distinct, got {names}")
        for f in features:
            _check_mode(f.mode)
            if is_weighted and f.mode != "sum":
                raise ValueError(f"feature {f.name!r}: per-sample weights (is_weighted=True) "
                                 f"need mode 'sum', got {f.mode!r}")
        self.client = client
        self.features = tuple(features)
        self.tables: list[Table] = []
        for f in features:
            if all(f.table is not t for t in self.tables):
                self.tables.append(f.table)
        self._table_of = [next(i for i, t in enumerate(self.tables) if t is f.table)
                          for f in features]
        self.enable_dedup = bool(enable_dedup)
        self._is_weighted = bool(is_weighted)

    @classmethod
    def from_torchrec_configs(cls, client: PsClient, configs: Iterable[Any],
                              tables: Mapping[str, Table], **options: Any
                              ) -> ShardedEmbeddingBagCollection:
        """The collection that stands for TorchRec's ``EmbeddingBagCollection(configs)``.

        Each ``EmbeddingBagConfig`` (duck-typed: ``name``, ``embedding_dim``,
        ``feature_names``, ``pooling`` SUM or MEAN) gives one feature per feature name, in
        TorchRec's output order, over ``tables[config.name]``, whose dim must match.
        ``options`` are the constructor's (``is_weighted``, ``pipelined``, ...).
        """
        features = []
        for cfg in configs:
            table = tables[cfg.name]
            if table.dim_size != int(cfg.embedding_dim):
                raise ValueError(f"table for {cfg.name!r} has dim {table.dim_size}, the config "
                                 f"{cfg.embedding_dim}")
            pooling = getattr(cfg.pooling, "name", str(cfg.pooling)).upper()
            if pooling not in _POOLING:
                raise ValueError(f"{cfg.name!r}: pooling {pooling} is not supported "
                                 f"(only {sorted(_POOLING)})")
            features += [Feature(n, table, _POOLING[pooling]) for n in cfg.feature_names]
        return cls(client, features, **options)

    def is_weighted(self) -> bool:
        """True when bags are weighted sums (TorchRec's ``is_weighted``)."""
        return self._is_weighted

    def _lookup_fn(self, uniq: Sequence[Ids]) -> list[Rows]:
        sizes = np.array([u.shape[0] for u in uniq], dtype=np.int64)
        emb, _, _, emb_off, _ = self.client.fused_lookup(
            self.tables, np.concatenate(uniq), sizes, 1
        )
        return [emb[emb_off[t]:emb_off[t + 1]].reshape(-1, tab.dim_size)
                for t, tab in enumerate(self.tables)]

    def _push_fn(self, ids: Sequence[Ids], grads: Sequence[Rows], global_step: int,
                 req_time: int) -> None:
        sizes = np.array([i.shape[0] for i in ids], dtype=np.int64)
        id_off = np.concatenate([[0], np.cumsum(sizes)])
        grad_sizes = sizes * np.array([t.dim_size for t in self.tables], dtype=np.int64)
        grad_off = np.concatenate([[0], np.cumsum(grad_sizes)])
        lrs = np.concatenate([
            evaluate_learning_rates(t.spec.learning_rate_fns, global_step) for t in self.tables
        ])
        all_ids = np.concatenate(ids)
        self.client.fused_apply_gradient(
            self.tables, all_ids, all_ids, sizes, np.concatenate([g.reshape(-1) for g in grads]),
            id_off, grad_off, lrs, req_time, global_step, 1,
            enable_grad_accumulation=self.enable_dedup,
        )

    def _split(self, features: Any) -> tuple[
        list[Ids], list[tuple[npt.NDArray[np.int64], int]], list[torch.Tensor | None], bool
    ]:
        items, keyed = _jagged_items(features)
        missing = [f.name for f in self.features if f.name not in items]
        extra = [] if keyed else sorted(set(items) - {f.name for f in self.features})
        if missing or extra:
            raise ValueError(f"features missing: {missing}, unknown: {extra}")
        values: list[Ids] = []
        bags: list[tuple[npt.NDArray[np.int64], int]] = []
        weights: list[torch.Tensor | None] = []
        for f in self.features:
            v, o, w = items[f.name]
            flat = _as_ids(v, f"{f.name} values")
            values.append(flat)
            bags.append(_bag_index(o, flat.shape[0]))
            if not self._is_weighted:
                weights.append(None)
            elif w is None:
                raise ValueError(f"feature {f.name!r}: is_weighted=True but the input has no "
                                 "per-sample weights")
            else:
                weights.append(_as_weights(w, flat.shape[0], f.name))
        return values, bags, weights, keyed

    def _per_table(self, values: list[Ids]) -> list[Ids]:
        return [
            np.concatenate([v for v, t in zip(values, self._table_of, strict=True) if t == k]
                           or [np.zeros(0, np.int64)])
            for k in range(len(self.tables))
        ]

    def _unique_of(self, *args: Any) -> list[Ids]:
        values = self._split(args[0])[0]
        return [np.unique(ids) for ids in self._per_table(values)]

    def forward(self, features: Any) -> Any:
        """``{name: float32[batch, dim]}`` for a mapping; a TorchRec ``KeyedTensor`` for a
        ``KeyedJaggedTensor``."""
        values, bags, weights, keyed = self._split(features)
        per_table = self._per_table(values)
        uniq_inv = [_unique(ids) for ids in per_table]
        rows = self._side.rows([u for u, _ in uniq_inv])
        flat = self._capture(rows, [i for _, i in uniq_inv], per_table)
        # Occurrences are laid out table by table (flattened rows), each table's
        # features in declaration order.
        dims = [t.dim_size for t in self.tables]
        base = np.concatenate([[0], np.cumsum([p.shape[0] * d
                                               for p, d in zip(per_table, dims, strict=True)])])
        used = [0] * len(self.tables)
        out: dict[str, torch.Tensor] = {}
        for f, v, (bag, num_bags), w, t in zip(self.features, values, bags, weights,
                                               self._table_of, strict=True):
            begin = int(base[t]) + used[t] * dims[t]
            used[t] += v.shape[0]
            part = flat[begin:begin + v.shape[0] * dims[t]].reshape(-1, dims[t])
            out[f.name] = _reduce(part, bag, num_bags, f.mode, w)
        if not keyed:
            return out
        names = [f.name for f in self.features]
        return _keyed_tensor(names, [int(out[n].shape[1]) for n in names],
                             torch.cat([out[n] for n in names], dim=1))


def prefetching(batches: Iterable[B], module: _ShardedModule, inputs: Any = None,
                depth: int | None = None) -> Iterator[B]:
    """Yield ``batches`` while ``module.prefetch`` reads the next ones' rows ahead.

    :param inputs: a function of a batch giving ``forward``'s arguments as a tuple
        (default: the batch itself, as one argument).
    :param depth: batches read ahead (default ``max(1, module.staleness)``).
    """
    ahead = max(1, module.staleness) if depth is None else int(depth)
    pick = inputs if inputs is not None else (lambda b: (b,))
    queue: list[B] = []
    it = iter(batches)
    for batch in it:
        module.prefetch(*pick(batch))
        queue.append(batch)
        if len(queue) > ahead:
            yield queue.pop(0)
    while queue:
        yield queue.pop(0)
