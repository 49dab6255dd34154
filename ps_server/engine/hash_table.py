"""One shard's embedding hash table: ids to float vectors plus optimizer state.

Storage is struct-of-arrays: ``values[rows, dim]`` (float32), one array per optimizer
state slot and segment, and ``timestamps[rows]`` (uint32 seconds), all indexed by the
dense rows of an :class:`~ps_server.engine.id_index.IdIndex`. Every operation works
on a whole batch; duplicates inside a batch keep Monolith's sequential meaning
(docs/semantics.md §4.2): assign keeps the last occurrence, assign_add accumulates in order,
apply_gradients runs one optimizer step per occurrence in order (or one step with
the summed gradient when ``enable_dedup``).

Storage has one spare row past the live ones that is always zero, so a lookup can
gather with row ``-1`` for missing ids and get zeros without a second pass.

SERVING tables store each value as ``decode(encode(x))`` of its segment's
compressor in float32, which is observably the same as Monolith's encoded storage
(lookups decode, assign encodes, assign_add decodes-adds-encodes) at full float32
memory cost.

Table clock (§4.3): ``max_update_ts`` is the maximum ``req_time`` over every assign,
assign_add and apply_gradients call (filtered ids included) and over restored
records; clearing the table does not reset it. Entry timestamps are uint32 seconds
set to the call's ``req_time`` on every write, even 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.compressors import RawRetriever
from ps_server.engine.entry_layout import EntryLayout, Segment
from ps_server.engine.id_index import IdIndex
from ps_server.engine.optimizers.base import (
    WAVE_STEP_COST,
    State,
    first_occurrences,
    has_duplicates,
    occurrence_waves,
    repeated_more_than,
)
from ps_server.engine.rows import put_rows
from ps_server.engine.types import Floats, Ids, Mask, Rows, as_ids, as_rows_matrix
from ps_server.errors import (
    BadTensorError,
    ConfigError,
    DimMismatchError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingEntryError,
)

if TYPE_CHECKING:
    from ps_server.engine.filters.base import HashFilter

_UINT32_MASK = 0xFFFFFFFF
# float32's smallest normal: a squared norm below it counts as a zero vector (§4.1).
_FLT_MIN = np.float32(1.17549435e-38)

#: ``guard(table_name, new_entries, new_bytes)``: called by a write that would insert
#: ``new_entries`` entries (``new_bytes`` = that many times :attr:`EmbeddingHashTable.entry_bytes`)
#: before it changes anything (clock and hash filter included); it raises to refuse.
CapacityGuard = Callable[[str, int, int], None]

#: Occurrences of one id that any ``apply_gradients`` request (without
#: ``enable_dedup``) may carry, whatever its size. Beyond it a request of ``n`` ids may
#: repeat an id up to ``n // cost`` times, ``cost`` being the table's most expensive
#: :meth:`~ps_server.engine.optimizers.base.Optimizer.repeat_cost`: each occurrence
#: past the first is one more sequential step of that row, so the repeats of an
#: accepted request cost at most about what its distinct ids cost (docs/semantics.md
#: §4.2).
REPEAT_FLOOR = 128


@dataclass
class EntryColumns:
    """A block of entries as columns (views into table storage when exported).

    :param ids: ``int64[n]``.
    :param values: ``float32[n, dim]``.
    :param states: per segment ``{slot: array[n, width]}`` (empty dicts for SERVING).
    :param timestamps: ``int64[n]`` last update seconds.
    """

    ids: Ids
    values: Floats
    states: list[State]
    timestamps: npt.NDArray[np.int64]


@dataclass(frozen=True)
class EntrySelection:
    """Entries picked for an ``EntryDump`` answer (``lookup_entry``, ``save_as_tensor``).

    :param count: answers wanted (slots not in ``positions`` stay empty).
    :param positions: ``int64[m]`` answer slot of each picked entry.
    :param values: ``float32[m, dim]``.
    :param segments: per segment its optimizer and its state rows ``{slot: array[m, w]}``.
    :param timestamps: ``int64[m]``.
    :param ids: ``int64[m]`` when the answer carries ids (pages), else None.
    """

    count: int
    positions: Ids
    values: Floats
    segments: list[tuple[Any, State]]
    timestamps: npt.NDArray[np.int64]
    ids: Ids | None


class EmbeddingHashTable:
    """A per-shard embedding table built from an ``EmbeddingHashTableConfig``.

    :param config: the table config (Monolith's message); validated here.
    :param hash_filter: the shard's filter consulted for ids not yet in the table
        (None = admit everything).
    :param name: used in error messages.
    :param seed: seed of random initializers (None = fixed default).
    :param capacity_guard: consulted before assign, assign_add and apply_gradients
        insert entries (see :data:`CapacityGuard`); restores are not guarded.
    :param monolith_quirks: behave as Monolith's C++ where we deliberately differ
        (docs/semantics.md §12): multi-segment stochastic rounding, Group AdaGrad's
        ``0/0``, Adam's restore swap (:class:`~ps_server.engine.entry_layout.EntryLayout`).
    :raises ConfigError: the config cannot be built (names the field and why).
    """

    def __init__(
        self,
        config: eht.EmbeddingHashTableConfig,
        *,
        hash_filter: HashFilter | None = None,
        name: str = "table",
        seed: int | None = None,
        capacity_guard: CapacityGuard | None = None,
        monolith_quirks: bool = False,
    ) -> None:
        if not config.HasField("entry_config"):
            raise ConfigError(f"table {name!r}: config has no entry_config")
        self.name = name
        self.config = config
        self.monolith_quirks = bool(monolith_quirks)
        self.layout = EntryLayout.from_config(
            config.entry_config, seed=seed, monolith_quirks=self.monolith_quirks
        )
        if config.skip_zero_embedding and not self.layout.serving:
            raise ConfigError(
                f"table {name!r}: skip_zero_embedding requires SERVING entries "
                "(entry_config.entry_type = SERVING)"
            )
        self.hash_filter = hash_filter
        self.capacity_guard = capacity_guard
        #: Occurrences of one id any request may carry (see :data:`REPEAT_FLOOR`).
        self.repeat_floor = REPEAT_FLOOR
        self.dim = self.layout.dim
        self.max_update_ts = 0
        cap = max(16, min(int(config.initial_capacity), 1 << 20))
        self._index = IdIndex(cap)
        self._values: Floats = np.zeros((cap + 1, self.dim), dtype=np.float32)
        self._timestamps: npt.NDArray[np.uint32] = np.zeros(cap + 1, dtype=np.uint32)
        self._states: list[State] = [
            _grow_state(seg.optimizer.init_state(0), cap + 1) if seg.optimizer else {}
            for seg in self.layout.segments
        ]
        state_row = sum(a.dtype.itemsize * a[0].size for st in self._states for a in st.values())
        #: Payload bytes of one entry: values, optimizer state, timestamp and id.
        self.entry_bytes = int(self.dim * 4 + state_row + 4 + 8)

    # ------------------------------------------------------------------ queries

    @property
    def num_segments(self) -> int:
        """Number of segments (= learning rates expected by apply_gradients)."""
        return len(self.layout.segments)

    def size(self) -> int:
        """Number of entries."""
        return self._index.size

    def nbytes(self) -> int:
        """Bytes of storage held (values, timestamps, state, index)."""
        state = sum(a.nbytes for st in self._states for a in st.values())
        return int(self._values.nbytes + self._timestamps.nbytes + state + self._index.nbytes())

    def lookup(self, ids: Any, out: Floats | None = None) -> Floats:
        """``float32[len(ids), dim]``: the lookup view of each entry, zeros if missing.

        Never inserts, never touches timestamps or the filter.

        :param out: a C-contiguous ``float32[len(ids), dim]`` to write the rows into
            (and return), e.g. a view of an answer's wire bytes.
        """
        ids_ = as_ids(ids)
        rows = self._index.find(ids_)
        # Row -1 is the spare zero row at the end of storage ("wrap" reads it and, with
        # every row valid, skips the bounds check that makes np.take copy into `out`).
        # np.take on axis 0 moves whole rows, several times faster than fancy indexing.
        out = np.take(self._values, rows, axis=0, out=out, mode="wrap")
        if not self.layout.raw_view:
            found = rows >= 0
            for seg in self.layout.segments:
                cols = seg.columns
                out[found, cols] = seg.retriever.forward(out[found, cols])
        return out

    def contains(self, ids: Any) -> Mask:
        """Whether each id has an entry."""
        return self._index.find(as_ids(ids)) >= 0

    def count_new(self, ids: Any) -> int:
        """How many distinct ids of ``ids`` have no entry (what a write could insert)."""
        ids_ = as_ids(ids)
        return _distinct_missing(ids_, self._index.find(ids_))

    def select_entries(self, ids: Any) -> EntrySelection:
        """The entries of ``ids`` for ``lookup_entry`` (encoded by the checkpoint code's
        ``EntryDump`` codec): one answer slot per id, missing ids left empty.

        :raises ServingEntryError: SERVING tables keep no entry dumps.
        """
        self._require_training("lookup_entry")
        ids_ = as_ids(ids)
        rows = self._index.find(ids_)
        found = np.flatnonzero(rows >= 0)
        cols = self._gather(rows[found])
        return EntrySelection(ids_.shape[0], found, cols.values,
                              self._segment_states(cols.states), cols.timestamps, None)

    def entries_page(
        self, shard_idx: int, num_shards: int, limit: int, offset: int
    ) -> tuple[int, EntrySelection]:
        """Up to ``limit`` entries of part ``shard_idx`` of ``num_shards`` from cursor
        ``offset`` (``save_as_tensor``), with their ids.

        Part ``i`` holds the entries with ``floormod(id, num_shards) == i``. The cursor
        is a row position (0 = start) and is opaque to callers. Returns the next cursor
        and the entries; fewer than ``limit`` means the part is exhausted. No expiry
        filtering.
        """
        self._require_training("save_as_tensor")
        if num_shards <= 0 or not 0 <= shard_idx < num_shards:
            raise InvalidArgumentError(
                f"save_as_tensor needs 0 <= shard_idx < num_shards, got {shard_idx}/{num_shards}"
            )
        if limit < 0 or offset < 0:
            raise InvalidArgumentError(f"limit and offset must be >= 0, got {limit}, {offset}")
        size = self._index.size
        picked: list[Rows] = []
        taken = 0
        pos = offset
        chunk = max(65536, 2 * limit * num_shards)
        while pos < size and taken < limit:
            stop = min(size, pos + chunk)
            hit = pos + np.flatnonzero(np.mod(self._index.ids[pos:stop], num_shards) == shard_idx)
            hit = hit[: limit - taken]
            picked.append(hit)
            taken += hit.size
            pos = int(hit[-1]) + 1 if taken == limit and hit.size else stop
        rows = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        cols = self._gather(rows)
        return pos, EntrySelection(rows.size, np.arange(rows.size), cols.values,
                                   self._segment_states(cols.states), cols.timestamps, cols.ids)

    # ------------------------------------------------------------------ writes

    def assign(self, ids: Any, values: Any, req_time: int = 0) -> None:
        """Overwrite the values of ``ids`` (later duplicates win), creating missing ids.

        Missing ids are first put to the filter, one count per occurrence, against the
        table as it was before the call; filtered occurrences are skipped. Optimizer
        state of existing entries is kept; timestamps become ``req_time``.
        """
        ids_ = as_ids(ids)
        vals = as_rows_matrix(values, ids_.shape[0], self.dim)
        req = self._check_req_time(req_time)
        rows = self._index.find(ids_)
        self._check_capacity(ids_, rows)
        self._advance_clock(req)
        admitted = self._gate_each(ids_, rows)
        if not admitted.all():
            ids_, vals, rows = ids_[admitted], vals[admitted], rows[admitted]
        if self.config.skip_zero_embedding:
            ids_, vals, rows = self._erase_zero_vectors(ids_, vals, rows)
        if ids_.size == 0:
            return
        rows = self._create_missing(ids_, rows)
        if has_duplicates(rows):
            # Keep only the last occurrence of each row.
            pick = rows.size - 1 - first_occurrences(rows[::-1])
            rows_w, vals_w = rows[pick], vals[pick]
        else:
            rows_w, vals_w = rows, vals
        put_rows(self._values, rows_w, self._encode_serving(vals_w))
        self._timestamps[rows] = np.uint32(req & _UINT32_MASK)

    def assign_add(self, ids: Any, values: Any, req_time: int = 0) -> None:
        """Add ``values`` to the entries of ``ids`` in order (duplicates accumulate).

        A missing id is put to the filter occurrence by occurrence until one is
        admitted; from then on it is present and later duplicates are not counted.
        """
        ids_ = as_ids(ids)
        vals = as_rows_matrix(values, ids_.shape[0], self.dim)
        req = self._check_req_time(req_time)
        rows = self._index.find(ids_)
        self._check_capacity(ids_, rows)
        self._advance_clock(req)
        admitted = self._gate_until_admitted(ids_, rows)
        if not admitted.all():
            ids_, vals, rows = ids_[admitted], vals[admitted], rows[admitted]
        if ids_.size == 0:
            return
        rows = self._create_missing(ids_, rows)
        if self.layout.serving:
            for wave in occurrence_waves(rows):
                r = rows[wave]
                self._values[r] = self._encode_serving(self._values[r] + vals[wave])
        else:
            np.add.at(self._values, rows, vals)
        self._timestamps[rows] = np.uint32(req & _UINT32_MASK)

    def apply_gradients(
        self,
        ids: Any,
        grads: Any,
        learning_rates: Sequence[float] | npt.ArrayLike,
        global_step: int = 0,
        *,
        enable_dedup: bool = False,
        req_time: int = 0,
    ) -> None:
        """Run the optimizers on ``(id, grad)`` pairs in order.

        :param learning_rates: one rate per segment (already evaluated at
            ``global_step``; the optimizer configs' own ``learning_rate`` is ignored
            except by RMSprop v1).
        :param enable_dedup: sum the gradients of equal ids (in occurrence order) and
            make one step and one filter call (count = occurrences) per id.
        :raises DimMismatchError, InvalidArgumentError, ServingEntryError: before any change.
        """
        self._require_training("apply_gradients")
        ids_ = as_ids(ids)
        g = as_rows_matrix(grads, ids_.shape[0], self.dim, "grads")
        lrs = self._check_learning_rates(learning_rates)
        req = self._check_req_time(req_time)
        step = int(global_step)
        for seg in self.layout.segments:
            if seg.optimizer is not None:
                seg.optimizer.check_step(step)
        found: Rows | None = None
        if not enable_dedup:
            found = self._index.find(ids_)
            if ids_.size and bool((found >= 0).all()):
                self._apply_present(ids_, found, g, lrs, step, req)
                return
            self.check_repeats(ids_)
        if ids_.size == 0:
            self._advance_clock(req)
            return
        if enable_dedup:
            uniq, first, inverse = np.unique(ids_, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # first-occurrence order for the filter
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            summed = np.zeros((uniq.size, self.dim), dtype=np.float32)
            np.add.at(summed, rank[inverse], g)
            counts = np.bincount(rank[inverse], minlength=uniq.size).astype(np.uint32)
            ids_, g = uniq[order], summed
        else:
            counts = np.ones(ids_.shape[0], dtype=np.uint32)
        rows = self._index.find(ids_) if found is None else found
        self._check_capacity(ids_, rows)
        self._advance_clock(req)
        admitted = self._gate_each(ids_, rows, counts)
        if not admitted.all():
            ids_, g, rows = ids_[admitted], g[admitted], rows[admitted]
            if ids_.size == 0:
                return
        rows = self._create_missing(ids_, rows)
        if self.layout.entrywise:  # monolith_quirks with stochastic rounding
            self.layout.optimize_entrywise(self._values, self._states, rows, g, lrs, step)
        else:
            for seg, state, lr in zip(self.layout.segments, self._states, lrs, strict=True):
                self._optimize_segment(seg, state, rows, g[:, seg.columns], float(lr), step,
                                       distinct=enable_dedup)
        self._timestamps[rows] = np.uint32(req & _UINT32_MASK)

    def _apply_present(self, ids: Ids, rows: Rows, grads: Floats,
                       lrs: npt.NDArray[np.float32], step: int, req: int) -> None:
        """apply_gradients (without dedup) when every id is present: no filter, no
        insert, and duplicates settled once from the rows (:meth:`_mark_rows`), which
        spares both the repeat check's and the optimizer's hashing of the batch."""
        old, repeated = self._mark_rows(rows)
        try:
            if repeated is not None:
                self.check_repeats(ids, suspects=ids[repeated])
            self._advance_clock(req)
            if self.layout.entrywise:  # monolith_quirks with stochastic rounding
                self.layout.optimize_entrywise(self._values, self._states, rows, grads, lrs,
                                               step)
            else:
                for seg, state, lr in zip(self.layout.segments, self._states, lrs,
                                          strict=True):
                    self._optimize_segment(seg, state, rows, grads[:, seg.columns], float(lr),
                                           step, distinct=repeated is None, repeated=repeated)
        except BaseException:
            self._timestamps[rows] = old  # the marks never outlive the call
            raise
        self._timestamps[rows] = np.uint32(req & _UINT32_MASK)

    # ------------------------------------------------------- bulk state access

    def export_columns(self, start: int = 0, stop: int | None = None) -> EntryColumns:
        """Rows ``[start, stop)`` as column views (no copy); valid until the next write."""
        size = self._index.size
        stop = size if stop is None else min(stop, size)
        start = max(0, min(start, stop))
        return EntryColumns(
            ids=self._index.ids[start:stop],
            values=self._values[start:stop],
            states=[{k: a[start:stop] for k, a in st.items()} for st in self._states],
            timestamps=self._timestamps[start:stop].astype(np.int64),
        )

    def iter_columns(self, chunk_rows: int = 65536) -> Iterator[EntryColumns]:
        """Every entry, ``chunk_rows`` at a time, as column views."""
        for start in range(0, self._index.size, chunk_rows):
            yield self.export_columns(start, start + chunk_rows)

    def upsert_columns(self, cols: EntryColumns, num_lengths: npt.NDArray[np.int64] | None = None
                       ) -> None:
        """Write restored entries: create missing ids (initializer + optimizer init),
        overwrite ``values[:, :num_lengths]``, the given optimizer state and timestamps,
        then raise the clock to the largest timestamp. Ids must be distinct.

        For SERVING tables values are re-encoded and state/timestamps are ignored
        (timestamp 0), as Monolith's restore does. With ``monolith_quirks`` an Adam
        segment's powers restore as Monolith's (swapped, see
        :meth:`~ps_server.engine.entry_layout.EntryLayout.restored_states`).
        """
        ids_ = as_ids(cols.ids)
        if ids_.size == 0:
            return
        vals = as_rows_matrix(cols.values, ids_.shape[0], self.dim)
        if has_duplicates(ids_):
            raise InvalidArgumentError(
                f"table {self.name!r}: upsert_columns needs distinct ids (keep one record "
                "per id)"
            )
        rows = self._create_missing(ids_, self._index.find(ids_), distinct=True)
        if num_lengths is None or bool((num_lengths >= self.dim).all()):
            put_rows(self._values, rows, self._encode_serving(vals))
        else:
            cur = np.take(self._values, rows, axis=0)
            take = np.arange(self.dim)[None, :] < num_lengths[:, None]
            cur[take] = vals[take]
            put_rows(self._values, rows, self._encode_serving(cur))
        if self.layout.serving:
            self._timestamps[rows] = 0
            return
        restored = self.layout.restored_states(cols.states, ids_.shape[0])
        for state, given in zip(self._states, restored, strict=True):
            for name, arr in given.items():
                put_rows(state[name], rows, arr)
        ts = np.asarray(cols.timestamps, dtype=np.int64)
        self._timestamps[rows] = (ts & _UINT32_MASK).astype(np.uint32)
        self.max_update_ts = max(self.max_update_ts, int(ts.max()))

    def reserve(self, n: int) -> None:
        """Size storage for ``n`` entries in all, so growing to ``n`` allocates nothing.

        Entries, their rows and the clock are unchanged; storage never shrinks (a
        smaller ``n`` does nothing). Meant for bulk loads that know their size, which
        otherwise grow storage by doubling (a transient second copy each time).

        :raises InvalidArgumentError: ``n`` is negative.
        """
        if n < 0:
            raise InvalidArgumentError(f"reserve needs n >= 0, got {n}")
        cap = self._values.shape[0] - 1
        if n > cap:
            values = np.zeros((n + 1, self.dim), dtype=np.float32)
            values[:cap] = self._values[:cap]
            self._values = values
            ts = np.zeros(n + 1, dtype=np.uint32)
            ts[:cap] = self._timestamps[:cap]
            self._timestamps = ts
            self._states = [_grow_state(st, n + 1) for st in self._states]
        if n > self._index.row_capacity:
            index = IdIndex(n)
            index.insert_new(self._index.ids)
            self._index = index

    def clear(self) -> None:
        """Remove every entry. The clock is kept (§4.3)."""
        self._index.clear()
        self._values[-1] = 0

    def keep_rows(self, keep: Mask) -> int:
        """Drop the entries where ``keep`` is False (by row); return how many were dropped.

        Columns are compacted in place, chunk by chunk, so no second copy of the
        table is made.
        """
        size = self._index.size
        src = np.flatnonzero(keep[:size])
        dropped = size - src.size
        if dropped == 0:
            return 0
        chunk = 1 << 16
        for start in range(0, src.size, chunk):
            s = src[start : start + chunk]
            dst = slice(start, start + s.size)
            self._values[dst] = self._values[s]
            self._timestamps[dst] = self._timestamps[s]
            for st in self._states:
                for a in st.values():
                    a[dst] = a[s]
        self._index.keep_rows(keep[:size])
        new_size = self._index.size
        self._values[new_size:size] = 0
        self._values[-1] = 0
        return dropped

    # ----------------------------------------------------------------- helpers

    def _segment_states(self, states: list[State]) -> list[tuple[Any, State]]:
        return [(seg.optimizer, st) for seg, st in zip(self.layout.segments, states, strict=True)]

    def _gather(self, rows: Rows) -> EntryColumns:
        return EntryColumns(
            ids=self._index.ids[rows],
            values=self._values[rows],
            states=[{k: a[rows] for k, a in st.items()} for st in self._states],
            timestamps=self._timestamps[rows].astype(np.int64),
        )

    def _require_training(self, op: str) -> None:
        if self.layout.serving:
            raise ServingEntryError(
                f"table {self.name!r} has SERVING entries; {op} needs TRAINING entries"
            )

    def _check_req_time(self, req_time: int) -> int:
        try:
            req = int(req_time)
        except (TypeError, ValueError) as e:
            raise BadTensorError(f"req_time must be an integer, got {req_time!r}") from e
        if req < 0:
            raise InvalidArgumentError(f"req_time must be >= 0 (seconds), got {req}")
        return req

    def _check_learning_rates(self, learning_rates: Any) -> npt.NDArray[np.float32]:
        try:
            lrs = np.asarray(learning_rates, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise BadTensorError(f"learning_rates must be floats: {e}") from e
        if lrs.shape[0] != self.num_segments:
            raise DimMismatchError(
                f"table {self.name!r} has {self.num_segments} segment(s), so it needs "
                f"{self.num_segments} learning rate(s); got {lrs.shape[0]}"
            )
        return lrs

    def repeat_cost(self) -> tuple[int, list[str]]:
        """The cost of one more occurrence of one id (:meth:`Optimizer.repeat_cost`; a
        segment whose retriever transforms the gradient steps in waves) and the names
        of the optimizers that cost it; ``(0, [])`` for a table without optimizers."""
        costs = [
            (max(seg.optimizer.repeat_cost(), WAVE_STEP_COST)
             if not isinstance(seg.retriever, RawRetriever) else seg.optimizer.repeat_cost(),
             type(seg.optimizer).__name__)
            for seg in self.layout.segments
            if seg.optimizer is not None
        ]
        if not costs:
            return 0, []
        worst = max(cost for cost, _ in costs)
        return worst, sorted({name for cost, name in costs if cost == worst})

    def repeat_limit(self, n: int) -> int | None:
        """Most occurrences of one id an ``apply_gradients`` request of ``n`` ids (without
        ``enable_dedup``) may carry: ``max(repeat_floor, n // cost)``; ``None`` when the
        table has no optimizer."""
        cost, _ = self.repeat_cost()
        return max(self.repeat_floor, n // cost) if cost else None

    def check_repeats(self, ids: Ids, *, suspects: Ids | None = None) -> None:
        """Refuse, before any change, a request repeating one id more often than
        :meth:`repeat_limit` allows for its size.

        :param suspects: when known, the ids of ``ids`` that may repeat, with all
            their occurrences (the others occur once): only they are counted."""
        if ids.size <= self.repeat_floor:
            return
        cost, names = self.repeat_cost()
        if not cost:
            return
        limit = max(self.repeat_floor, ids.size // cost)
        hot = repeated_more_than(ids if suspects is None else suspects, limit)
        if hot is not None:
            count, worst = hot
            raise ResourceExhaustedError(
                f"table {self.name!r}: id {worst} occurs {count} times in an "
                f"apply_gradients request of {ids.size} ids; the limit for a request of "
                f"that size is {limit} occurrences of one id (the larger of "
                f"{self.repeat_floor} and ids // {cost}: each occurrence past the first "
                f"is one more sequential {', '.join(names)} step of that id); split the "
                "batch, or set enable_dedup to sum each id's gradients into one step"
            )

    def _advance_clock(self, req: int) -> None:
        self.max_update_ts = max(self.max_update_ts, req)

    def _check_capacity(self, ids: Ids, rows: Rows) -> None:
        """Offer the ids a write could insert to the capacity guard, before any change.

        Every distinct missing id counts, including those the hash filter will hold
        back: the filter cannot be asked without counting them.
        """
        if self.capacity_guard is None:
            return
        n_new = _distinct_missing(ids, rows)
        if n_new:
            self.capacity_guard(self.name, n_new, n_new * self.entry_bytes)

    def _gate_each(self, ids: Ids, rows: Rows, counts: npt.NDArray[np.uint32] | None = None
                   ) -> Mask:
        """Admission of each occurrence; missing ids are counted once per occurrence."""
        admitted = np.ones(ids.shape[0], dtype=bool)
        if self.hash_filter is None:
            return admitted
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            c = np.ones(missing.size, dtype=np.uint32) if counts is None else counts[missing]
            filtered = self.hash_filter.should_be_filtered(ids[missing], c, with_table=True)
            admitted[missing[filtered]] = False
        return admitted

    def _gate_until_admitted(self, ids: Ids, rows: Rows) -> Mask:
        """assign_add gating: a missing id stops being counted once admitted.

        The batch is cut into stretches in which no id repeats, so within a stretch
        every missing occurrence is counted; ids admitted in a stretch are present
        for the following ones.
        """
        admitted = np.ones(ids.shape[0], dtype=bool)
        if self.hash_filter is None:
            return admitted
        missing = np.flatnonzero(rows < 0)
        if missing.size == 0:
            return admitted
        m_ids = ids[missing]
        prev = _previous_occurrence(m_ids)
        passed_ids = np.zeros(0, dtype=np.int64)
        start = 0
        while start < m_ids.size:
            repeats = np.flatnonzero(prev[start:] >= start)
            stop = start + int(repeats[0]) if repeats.size else m_ids.size
            seg_ids = m_ids[start:stop]
            ask = np.flatnonzero(~np.isin(seg_ids, passed_ids))
            filtered = self.hash_filter.should_be_filtered(
                seg_ids[ask], np.ones(ask.size, dtype=np.uint32), with_table=True
            )
            admitted[missing[start + ask[filtered]]] = False
            newly = seg_ids[ask[~filtered]]
            if newly.size:
                passed_ids = np.union1d(passed_ids, newly)
            start = stop
        return admitted

    def _create_missing(self, ids: Ids, rows: Rows, *, distinct: bool = False) -> Rows:
        """Insert ids whose row is -1 (initializer + optimizer init); return all rows.

        With ``distinct`` (the caller guarantees no id repeats) the absent ids are
        appended directly: no second lookup, no sort.
        """
        missing = rows < 0
        if not missing.any():
            return rows
        before = self._index.size
        if distinct:
            new_rows = self._index.insert_new(ids[missing])
        else:
            new_rows, _ = self._index.find_or_insert(ids[missing])
        rows = rows.copy()
        rows[missing] = new_rows
        n_new = self._index.size - before
        self._reserve(self._index.size)
        fresh = slice(before, before + n_new)
        for seg, state in zip(self.layout.segments, self._states, strict=True):
            init = seg.initializer.init(n_new)
            self._values[fresh, seg.columns] = (
                seg.compressor.roundtrip(init) if seg.compressor is not None else init
            )
            if seg.optimizer is not None:
                for name, arr in seg.optimizer.init_state(n_new).items():
                    state[name][fresh] = arr
        self._timestamps[fresh] = 0
        return rows

    def _reserve(self, size: int) -> None:
        cap = self._values.shape[0] - 1
        if size <= cap:
            return
        new_cap = max(size, 2 * cap)
        values = np.zeros((new_cap + 1, self.dim), dtype=np.float32)
        values[:cap] = self._values[:cap]
        self._values = values
        ts = np.zeros(new_cap + 1, dtype=np.uint32)
        ts[:cap] = self._timestamps[:cap]
        self._timestamps = ts
        self._states = [_grow_state(st, new_cap + 1) for st in self._states]

    def _encode_serving(self, values: Floats) -> Floats:
        if not self.layout.serving:
            return values
        out = np.empty_like(values)
        for seg in self.layout.segments:
            assert seg.compressor is not None
            out[:, seg.columns] = seg.compressor.roundtrip(values[:, seg.columns])
        return out

    def _erase_zero_vectors(self, ids: Ids, vals: Floats, rows: Rows) -> tuple[Ids, Floats, Rows]:
        """skip_zero_embedding: the last write of an id decides; a zero vector erases it."""
        uniq_ids, last_in_rev = np.unique(ids[::-1], return_index=True)
        last = ids.size - 1 - last_in_rev
        sq = np.einsum("ij,ij->i", vals[last], vals[last])
        zero_ids = uniq_ids[sq < _FLT_MIN]
        if zero_ids.size:
            present = self._index.find(zero_ids)
            if (present >= 0).any():
                keep = np.ones(self._index.size, dtype=bool)
                keep[present[present >= 0]] = False
                self.keep_rows(keep)
            drop = np.isin(ids, zero_ids)
            ids, vals = ids[~drop], vals[~drop]
            rows = self._index.find(ids)
        return ids, vals, rows

    def _mark_rows(self, rows: Rows) -> tuple[npt.NDArray[np.uint32], Mask | None]:
        """Find, in O(len(rows)) without hashing or sorting, the positions of ``rows``
        (valid rows) whose row occurs more than once (None when no row repeats).

        The timestamp column serves as scratch: each row's slot gets the position of
        one of its occurrences (the last written), so a position reading back another
        is an occurrence of a repeated row, and what it reads is one more. The marks
        are left in place: returns the old timestamps, which the caller must write
        back or overwrite before returning (apply_gradients sets them to the request
        time anyway)."""
        n = rows.shape[0]
        ts = self._timestamps
        old = ts[rows]
        if n > _UINT32_MASK:
            return old, (np.ones(n, dtype=bool) if has_duplicates(rows) else None)
        mark = np.arange(n, dtype=np.uint32)
        ts[rows] = mark  # fancy indexing: several times faster than put/take on 1-D
        back = ts[rows]
        repeated = back != mark
        if not repeated.any():
            return old, None
        repeated[back[repeated]] = True
        return old, repeated

    def _optimize_segment(
        self, seg: Segment, state: State, rows: Rows, grads: Floats, lr: float, step: int,
        *, distinct: bool = False, repeated: Mask | None = None,
    ) -> None:
        assert seg.optimizer is not None
        view = self._values[:, seg.columns]
        if isinstance(seg.retriever, RawRetriever):
            seg.optimizer.apply_sequential(view, state, rows, np.ascontiguousarray(grads), lr,
                                           step, distinct=distinct, repeated=repeated)
            return
        # A transforming retriever's backward reads the current value, so each wave
        # (k-th occurrence of every row) is transformed then applied.
        for wave in occurrence_waves(rows):
            r = rows[wave]
            g = seg.retriever.backward(view[r], grads[wave], step)
            seg.optimizer.apply_sequential(view, state, r, g, lr, step)


def _grow_state(state: State, n: int) -> State:
    out: State = {}
    for name, arr in state.items():
        grown = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
        grown[: arr.shape[0]] = arr
        out[name] = grown
    return out


def _distinct_missing(ids: Ids, rows: Rows) -> int:
    missing = ids[rows < 0]
    if missing.size <= 1:
        return int(missing.size)
    return int(np.unique(missing).size)


def _previous_occurrence(ids: Ids) -> npt.NDArray[np.int64]:
    """For each position, the index of the previous occurrence of the same id (-1 if none)."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    prev = np.full(ids.size, -1, dtype=np.int64)
    same = np.flatnonzero(s[1:] == s[:-1]) + 1
    prev[order[same]] = order[same - 1]
    return prev
