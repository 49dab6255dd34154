"""``torch.nn.Module`` faces of sharded tables (see :mod:`ps_client.torch`)."""

from __future__ import annotations

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
            mode: str) -> torch.Tensor:
    dim = per_value.shape[-1]
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


def _jagged_items(features: Any, names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """``{name: (values, offsets)}`` from a mapping or a TorchRec ``KeyedJaggedTensor``."""
    if isinstance(features, Mapping):
        return {k: tuple(v) for k, v in features.items()}
    keys = getattr(features, "keys", None)
    if callable(keys) and hasattr(features, "to_dict"):  # KeyedJaggedTensor, duck-typed
        out = {}
        for k, jt in features.to_dict().items():
            out[k] = (jt.values(), jt.offsets()[:-1])
        return out
    raise TypeError(
        "features must be a mapping {name: (values, offsets)} or a torchrec "
        f"KeyedJaggedTensor, got {type(features).__name__}"
    )


class ShardedEmbeddingBagCollection(_ShardedModule):
    """Several features over several tables, one fused round trip per shard.

    ``forward(features)`` takes ``{name: (values, offsets)}`` (``offsets`` as in
    ``torch.nn.EmbeddingBag``: each bag's start) or a TorchRec ``KeyedJaggedTensor``
    (its lengths-based offsets), and returns ``{name: float32[batch, dim]}``. Features
    that share a table share its lookups. Lookups go through
    :meth:`PsClient.fused_lookup` and gradients through
    :meth:`PsClient.fused_apply_gradient` with each table's learning-rate functions at
    ``global_step``; every occurrence is one optimizer step (``enable_dedup``: one summed
    step per id and table). Pipelining options as in :class:`ShardedEmbedding`.
    """

    def __init__(self, client: PsClient, features: Sequence[Feature], *,
                 enable_dedup: bool = False, pipelined: bool = False,
                 staleness: int = 0) -> None:
        super().__init__(pipelined=pipelined, staleness=staleness)
        if not features:
            raise ValueError("a collection needs at least one feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be distinct, got {names}")
        for f in features:
            _check_mode(f.mode)
        self.client = client
        self.features = tuple(features)
        self.tables: list[Table] = []
        for f in features:
            if all(f.table is not t for t in self.tables):
                self.tables.append(f.table)
        self._table_of = [next(i for i, t in enumerate(self.tables) if t is f.table)
                          for f in features]
        self.enable_dedup = bool(enable_dedup)

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

    def _split(self, features: Any) -> tuple[list[Ids], list[tuple[npt.NDArray[np.int64], int]]]:
        items = _jagged_items(features, [f.name for f in self.features])
        missing = [f.name for f in self.features if f.name not in items]
        extra = sorted(set(items) - {f.name for f in self.features})
        if missing or extra:
            raise ValueError(f"features missing: {missing}, unknown: {extra}")
        values, bags = [], []
        for f in self.features:
            v, o = items[f.name]
            flat = _as_ids(v, f"{f.name} values")
            values.append(flat)
            bags.append(_bag_index(o, flat.shape[0]))
        return values, bags

    def _per_table(self, values: list[Ids]) -> list[Ids]:
        return [
            np.concatenate([v for v, t in zip(values, self._table_of, strict=True) if t == k]
                           or [np.zeros(0, np.int64)])
            for k in range(len(self.tables))
        ]

    def _unique_of(self, *args: Any) -> list[Ids]:
        values, _ = self._split(args[0])
        return [np.unique(ids) for ids in self._per_table(values)]

    def forward(self, features: Any) -> dict[str, torch.Tensor]:
        values, bags = self._split(features)
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
        for f, v, (bag, num_bags), t in zip(self.features, values, bags, self._table_of,
                                            strict=True):
            begin = int(base[t]) + used[t] * dims[t]
            used[t] += v.shape[0]
            part = flat[begin:begin + v.shape[0] * dims[t]].reshape(-1, dims[t])
            out[f.name] = _reduce(part, bag, num_bags, f.mode)
        return out


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
