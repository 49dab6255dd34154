"""The optimizer contract: per-entry state as columns, updates over whole batches.

Monolith keeps each entry's optimizer state inside a packed record and updates one
entry at a time. Here a table keeps, per segment, one array per state slot with a
row per entry (struct-of-arrays). An optimizer declares its slots, creates their
initial rows, and updates a batch of *distinct* rows at once.

Dump layout: each optimizer maps to one member of ``SingleOptimizerDump`` (field
``dump_field``) whose message holds the slots at the declared field numbers, so the
checkpoint codec can write and read ``OptimizerDump`` bytes without per-entry
protobuf objects.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ps_server.engine.rows import put_rows
from ps_server.engine.types import Floats, Rows

State = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class StateSlot:
    """One column group of optimizer state, and where it lives in the dump.

    :param name: the slot's name, e.g. ``"norm"``; also the dump message's field name.
    :param width: elements per entry: the segment's dim, or 1 for a scalar.
    :param dtype: ``float32`` or ``int64``.
    :param field: field number inside the optimizer's dump message.
    :param repeated: True for ``repeated float`` fields (one tag per element, unpacked);
        False for an optional scalar (``width`` must be 1).
    """

    name: str
    width: int
    dtype: np.dtype[Any]
    field: int
    repeated: bool


#: Cost of one more wave (one more occurrence of the hottest row, stepped by
#: :meth:`Optimizer.apply` on the rows still active) in distinct ids' worth of work:
#: tens of µs of numpy calls against a fraction of a µs per distinct id.
WAVE_STEP_COST = 512


class Optimizer(abc.ABC):
    """Update rule for one segment of an entry.

    Subclasses set ``dump_field`` (the ``SingleOptimizerDump`` oneof number, or
    ``None`` when the optimizer contributes no dump, as moving_average) and
    implement :meth:`slots`, :meth:`init_state` and :meth:`apply`.
    """

    dump_field: ClassVar[int | None]

    def __init__(self, config: Any, dim: int) -> None:
        self.config = config
        self.dim = dim

    @abc.abstractmethod
    def slots(self) -> tuple[StateSlot, ...]:
        """The state slots in dump-field order."""

    @abc.abstractmethod
    def init_state(self, n: int) -> State:
        """Initial state for ``n`` new entries: ``{slot: array[n, width]}``."""

    @abc.abstractmethod
    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        """One optimizer step on distinct entries, in place.

        :param params: ``float32[m, dim]`` values of the segment (gathered rows).
        :param state: ``{slot: array[m, width]}`` gathered state rows.
        :param grads: ``float32[m, dim]`` gradients (after the retriever's backward).
        :param lr: this segment's learning rate.
        :param global_step: the trainer's global step.
        """

    def check_step(self, global_step: int) -> None:
        """Refuse a ``global_step`` this optimizer cannot use, before any state changes.

        Tables call it for every segment before touching the clock, the filter or any
        entry. Most optimizers ignore the step; the default accepts anything.
        """
        return None

    def apply_sequential(
        self,
        values: Floats,
        state: State,
        rows: Rows,
        grads: Floats,
        lr: float,
        global_step: int,
        *,
        distinct: bool = False,
        repeated: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Apply one step per (row, grad) pair, in order, duplicates included.

        ``values`` is the segment's storage view ``[capacity, dim]`` and ``state`` the
        full state storage; ``rows`` may repeat, unless the caller knows they do not
        and says so with ``distinct`` (the duplicate search is then skipped). A caller
        that knows which positions may repeat passes them as ``repeated`` (a mask
        covering every occurrence of every repeated row; the others occur once), so
        only those are sorted.

        Optimizers with a run form (:meth:`has_run_form`) step every row through all
        its occurrences at once (:func:`apply_in_runs`). The others are applied in
        waves: wave k holds the k-th occurrence of every row, so rows inside a wave
        are distinct and each row sees its steps in input order; a row repeated r
        times costs r waves.
        """
        if rows.size == 0:
            return
        if distinct or not (has_duplicates(rows) if repeated is None else repeated.any()):
            self._apply_rows(values, state, rows, grads, lr, global_step)
            return
        if self.has_run_form():
            apply_in_runs(self, values, state, rows, grads, lr, global_step, repeated)
            return
        if self.rows_independent:
            self._apply_compact_waves(values, state, rows, grads, lr, global_step, repeated)
            return
        for wave in occurrence_waves(rows):
            self._apply_rows(values, state, rows[wave], grads[wave], lr, global_step)

    #: Whether :meth:`apply` computes each row from that row's inputs alone, so the
    #: rows of a wave may be stepped in any order (False for stochastic rounding,
    #: whose random draws follow the rows' order).
    rows_independent: ClassVar[bool] = True

    def _apply_compact_waves(
        self,
        values: Floats,
        state: State,
        rows: Rows,
        grads: Floats,
        lr: float,
        global_step: int,
        repeated: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Waves on one gathered copy of the touched rows: rows are ordered by number of
        occurrences (most first), so wave k steps a prefix of the copy in place, and
        the copy is scattered back once. Only the rows sharing a hash bucket with
        another (or in ``repeated``, when given) are sorted to count them; the rest
        occur once and close the copy."""
        shared = _maybe_repeated(rows) if repeated is None else repeated
        suspects = np.flatnonzero(shared)
        alone = np.flatnonzero(~shared)
        order = suspects[np.argsort(rows[suspects], kind="stable")]
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        counts = np.diff(np.r_[starts, sorted_rows.size])
        most_first = np.argsort(-counts, kind="stable")
        first = starts[most_first]
        r = np.concatenate([sorted_rows[first], rows[alone]])
        # active[k] = how many rows have more than k occurrences.
        counts_all = np.concatenate([counts, np.ones(alone.size, dtype=counts.dtype)])
        active = (r.size - np.cumsum(np.bincount(counts_all))).tolist()
        params = np.take(values, r, axis=0)
        gathered = {name: np.take(arr, r, axis=0) for name, arr in state.items()}
        firsts = np.concatenate([order[first], alone])  # each copy row's first occurrence
        for k in range(int(counts_all.max())):
            a = active[k]
            wave_grads = np.take(grads, firsts if k == 0 else order[first[:a] + k], axis=0)
            self.apply(params[:a], {name: arr[:a] for name, arr in gathered.items()},
                       wave_grads, lr, global_step)
        put_rows(values, r, params)
        for name, arr in state.items():
            put_rows(arr, r, gathered[name])

    #: Cost of one more occurrence of one row, stepped by :meth:`apply_run`, in
    #: distinct ids' worth of work (measured by ``bench/repeats_bench.py``): a table
    #: lets one request repeat an id about ``n / cost`` times (docs/semantics.md §4.2).
    run_step_cost: ClassVar[int] = 96

    def repeat_cost(self) -> int:
        """Cost of one more occurrence of one row in a request, in distinct ids' worth
        of work: :attr:`run_step_cost` with a run form, else :data:`WAVE_STEP_COST`."""
        return self.run_step_cost if self.has_run_form() else WAVE_STEP_COST

    def has_run_form(self) -> bool:
        """Whether :meth:`apply_run` can step rows through many occurrences at once
        with exactly the bits of one :meth:`apply` per occurrence. False by default:
        such optimizers are applied wave by wave (docs/semantics.md §4.2)."""
        return False

    def apply_run(
        self,
        params: Floats,
        state: State,
        grads: Floats,
        ends: npt.NDArray[np.intp],
        lr: float,
        global_step: int,
    ) -> None:
        """Step each of ``m`` distinct entries through its occurrences, in place.

        :param params: ``float32[m, dim]`` values before the first occurrence.
        :param state: ``{slot: array[m, width]}`` state before the first occurrence.
        :param grads: ``float32[c, m, dim]``: ``grads[k, j]`` is entry ``j``'s
            (k+1)-th gradient; entries with fewer than ``c`` occurrences are padded
            with zeros, which must not affect the steps before them.
        :param ends: ``ends[j]`` = entry ``j``'s number of occurrences (>= 1).
        """
        raise NotImplementedError(f"{type(self).__name__} has no run form")

    def _apply_rows(
        self,
        values: Floats,
        state: State,
        rows: Rows,
        grads: Floats,
        lr: float,
        global_step: int,
    ) -> None:
        params = np.take(values, rows, axis=0)
        gathered = {name: np.take(arr, rows, axis=0) for name, arr in state.items()}
        self.apply(params, gathered, grads, lr, global_step)
        put_rows(values, rows, params)
        for name, arr in state.items():
            put_rows(arr, rows, gathered[name])


def float_slot(name: str, width: int, field: int) -> StateSlot:
    """A ``repeated float`` slot of ``width`` elements per entry."""
    return StateSlot(name, width, np.dtype(np.float32), field, repeated=True)


def scalar_slot(name: str, field: int, dtype: Any = np.float32) -> StateSlot:
    """An optional scalar slot (``float`` or ``int64``), one element per entry."""
    return StateSlot(name, 1, np.dtype(dtype), field, repeated=False)


def has_duplicates(rows: Rows) -> bool:
    """Whether any row repeats.

    Equal rows share a bucket of a hash table of about ``4 * len(rows)`` buckets, so
    only the rows of buckets holding more than one (about a fifth of distinct rows)
    are sorted to settle it (twice as fast as sorting them all at 65,536 rows); under
    1,024 rows a sort of them all is cheaper.
    """
    n = rows.shape[0]
    if n < 2:
        return False
    if n >= 1024:
        bits = (4 * n - 1).bit_length()
        bucket = _bucket_of(rows, bits)
        crowded = np.bincount(bucket, minlength=1 << bits)[bucket] > 1
        if not crowded.any():
            return False
        rows = rows[crowded]
    s = np.sort(rows)
    return bool((s[1:] == s[:-1]).any())


def first_occurrences(rows: Rows) -> npt.NDArray[np.intp]:
    """Positions of the first occurrence of each distinct row (ascending by row)."""
    # An unstable argsort plus a per-group minimum is several times cheaper than a
    # stable sort, and the smallest position in a group is its first occurrence.
    order = np.argsort(rows)
    s = rows[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return np.minimum.reduceat(order, starts)


def repeated_positions(rows: Rows) -> npt.NDArray[np.intp]:
    """Positions (in input order) of every occurrence of the rows that repeat."""
    order = np.argsort(rows)
    s = rows[order]
    same = s[1:] == s[:-1]
    in_group = np.zeros(rows.size, dtype=bool)
    in_group[1:] |= same
    in_group[:-1] |= same
    return np.sort(order[in_group])


def occurrence_waves(rows: Rows) -> list[npt.NDArray[np.intp]]:
    """Positions grouped by occurrence rank: wave k holds the k-th occurrence of every
    row that has one, in input order. Rows inside a wave are distinct, and each row
    meets its occurrences in input order across waves."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    lengths = np.diff(np.r_[starts, sorted_rows.size])
    rank = np.arange(sorted_rows.size) - np.repeat(starts, lengths)
    # One sort by (rank, position) instead of a pass over the batch per wave.
    by_rank = order[np.lexsort((order, rank))]
    return np.split(by_rank, np.cumsum(np.bincount(rank))[:-1])


def _maybe_repeated(rows: Rows) -> npt.NDArray[np.bool_]:
    """Positions whose row shares a hash bucket (of about ``4 * len(rows)``) with
    another position's: every occurrence of a repeated row, and some others."""
    bits = (4 * rows.size - 1).bit_length()
    bucket = _bucket_of(rows, bits)
    return np.asarray(np.bincount(bucket, minlength=1 << bits)[bucket] > 1)


_FIB_HASH = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)


def _bucket_of(keys: npt.NDArray[Any], bits: int) -> npt.NDArray[np.intp]:
    """Each key's bucket among ``2**bits`` (Fibonacci hashing: the top bits of
    ``key * 2**64/phi``, which spreads any pattern of keys, consecutive rows included)."""
    k = np.asarray(keys, dtype=np.int64).view(np.uint64)
    return ((k * _FIB_HASH) >> np.uint64(64 - bits)).astype(np.intp)


def repeated_more_than(ids: npt.NDArray[Any], limit: int) -> tuple[int, int] | None:
    """``(count, value)`` of the most repeated value of ``ids`` if it occurs more than
    ``limit`` times, else None.

    Equal values share a bucket of a hash table of about ``2 * len(ids)`` buckets, so
    a value can occur more than ``limit`` times only in a bucket holding more than
    ``limit`` ids: one hash and one ``bincount`` settle most batches, and only the ids
    of such buckets (the hot ones) are sorted.
    """
    n = ids.shape[0]
    if n <= limit:
        return None
    bits = (2 * n - 1).bit_length()
    bucket = _bucket_of(ids, bits)
    heavy = np.bincount(bucket, minlength=1 << bits) > limit
    if not heavy.any():
        return None
    count, value = max_multiplicity(ids[heavy[bucket]])
    return (count, value) if count > limit else None


def max_multiplicity(ids: npt.NDArray[Any]) -> tuple[int, int]:
    """``(count, value)`` of the most repeated value of ``ids`` (``(0, 0)`` if empty)."""
    if ids.size == 0:
        return 0, 0
    s = np.sort(ids)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    lengths = np.diff(np.r_[starts, s.size])
    top = int(np.argmax(lengths))
    return int(lengths[top]), int(s[starts[top]])


def apply_in_runs(
    optimizer: Optimizer,
    values: Floats,
    state: State,
    rows: Rows,
    grads: Floats,
    lr: float,
    global_step: int,
    repeated: npt.NDArray[np.bool_] | None = None,
) -> None:
    """One step per (row, grad) pair in order, through ``optimizer.apply_run``.

    Rows are grouped by their number of occurrences into classes ``[2^e, 2^(e+1))``;
    each class is one ``apply_run`` call on a ``[c, m, dim]`` block of gradients
    padded with zeros (at most twice the class's occurrences), so the cost is a
    handful of numpy passes per class whatever the multiplicities. Rows met once take
    one plain step together; only the rows sharing a hash bucket with another are
    sorted to find them (a batch with a few hot rows is not sorted whole); a caller
    that knows the positions that may repeat passes them as ``repeated``.
    """
    shared = _maybe_repeated(rows) if repeated is None else repeated
    suspects = np.flatnonzero(shared)
    order = suspects[np.argsort(rows[suspects], kind="stable")]
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    counts = np.diff(np.r_[starts, sorted_rows.size])
    classes = np.frexp(counts.astype(np.float64))[1]  # bit length of each count
    # Rows met once: those alone in their bucket, and class 1 among the suspects.
    once = np.concatenate([np.flatnonzero(~shared), order[starts[classes == 1]]])
    if once.size:
        optimizer._apply_rows(values, state, np.take(rows, once), np.take(grads, once, axis=0),
                              lr, global_step)
    for e in np.unique(classes[classes > 1]):
        picked = np.flatnonzero(classes == e)
        n_occ = counts[picked]
        c = int(n_occ.max())
        rank = np.arange(c)[:, None]
        live = rank < n_occ[None, :]  # [c, m]
        pos = order[starts[picked][None, :] + np.minimum(rank, n_occ[None, :] - 1)]
        block = np.take(grads, pos, axis=0)  # [c, m, dim]
        block[~live] = 0
        r = sorted_rows[starts[picked]]
        params = np.take(values, r, axis=0)
        gathered = {name: np.take(arr, r, axis=0) for name, arr in state.items()}
        optimizer.apply_run(params, gathered, block, n_occ, lr, global_step)
        put_rows(values, r, params)
        for name, arr in state.items():
            put_rows(arr, r, gathered[name])


def sequence_ends(seq: Floats, ends: npt.NDArray[np.intp]) -> Floats:
    """``seq[ends[j], j]`` for each ``j``: each entry's value after its last occurrence
    in a ``[c + 1, m, ...]`` running sequence (index 0 = before the first)."""
    return seq[ends, np.arange(ends.size)]
