"""Vectorized map from int64 feature ids to dense row numbers.

Open addressing with linear probing over an ``int32`` slot array; each slot holds a
row number (``-1`` = empty) and the id of a row lives in :attr:`IdIndex.ids`, so a
slot costs 4 bytes. Rows are dense (``0 .. size-1``) in insertion order, which lets
tables keep their columns as plain arrays indexed by row. Lookups and inserts probe
a whole batch at once; the only Python loop is over probe distance, which stays
short because the load factor is kept at or below one half.

The slot hash is multiply / xor-shift / multiply with splitmix64's constants, keeping
the top bits: plain Fibonacci hashing clusters arithmetic id sequences badly under
linear probing, and this costs only two more vector operations.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ps_server.engine.types import Ids, Rows

_MUL1 = np.uint64(0x9E3779B97F4A7C15)
_MUL2 = np.uint64(0xBF58476D1CE4E5B9)
_MAX_LOAD = 0.5
_MIN_SLOTS_LOG2 = 4
_WINDOW = 8


class IdIndex:
    """Batch map ``id -> row``; rows are ``0 .. size-1`` in insertion order."""

    def __init__(self, capacity_hint: int = 0) -> None:
        self._size = 0
        self._ids: Ids = np.zeros(max(16, capacity_hint), dtype=np.int64)
        self._bits = _MIN_SLOTS_LOG2
        while (1 << self._bits) * _MAX_LOAD < max(capacity_hint, 1):
            self._bits += 1
        self._slots: npt.NDArray[np.int32] = np.full(1 << self._bits, -1, dtype=np.int32)

    @property
    def size(self) -> int:
        """Number of ids stored."""
        return self._size

    @property
    def ids(self) -> Ids:
        """Ids by row: ``ids[r]`` is the id stored at row ``r`` (a view, length ``size``)."""
        return self._ids[: self._size]

    @property
    def row_capacity(self) -> int:
        """Rows the id column can hold before it must grow."""
        return int(self._ids.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the index (slots and the id column)."""
        return int(self._slots.nbytes + self._ids.nbytes)

    def _slot_of(self, ids: Ids) -> npt.NDArray[np.int64]:
        h = ids.view(np.uint64) * _MUL1
        h ^= h >> np.uint64(29)
        h *= _MUL2
        return (h >> np.uint64(64 - self._bits)).astype(np.int64)

    def find(self, ids: Ids) -> Rows:
        """Rows of ``ids`` (``-1`` where absent); duplicates allowed."""
        return self._probe(ids, want_slots=False)[0]

    def find_slots(self, ids: Ids) -> tuple[Rows, npt.NDArray[np.int64]]:
        """Rows of ``ids`` (``-1`` where absent) and the slot each was found in (``-1``)."""
        rows, where = self._probe(ids, want_slots=True)
        assert where is not None
        return rows, where

    def _probe(self, ids: Ids, want_slots: bool
               ) -> tuple[Rows, npt.NDArray[np.int64] | None]:
        n = ids.shape[0]
        if n == 0 or self._size == 0:
            return np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        mask = (1 << self._bits) - 1
        pos = self._slot_of(ids)
        # First probe for everyone: most ids sit in their home slot. An empty slot
        # (-1) reads the last id of the column, which the `occupied` test discards.
        cand = self._slots[pos].astype(np.int64)
        occupied = cand >= 0
        hit = occupied & (self._ids[cand] == ids)
        rows = np.where(hit, cand, -1)
        where = np.where(hit, pos, -1) if want_slots else None
        active = np.flatnonzero(occupied & ~hit)
        # The rest probe a window of slots per round, so rounds stay few even
        # when a probe run is long.
        step = np.arange(1, _WINDOW + 1, dtype=np.int64)
        base = pos[active]
        while active.size:
            win = (base[:, None] + step) & mask
            c = self._slots[win].astype(np.int64)
            occ = c >= 0
            match = occ & (self._ids[c] == ids[active][:, None])
            stop = match | ~occ
            first = np.argmax(stop, axis=1)
            lane = np.arange(active.size)
            done = stop[lane, first]
            found = done & match[lane, first]
            idx = active[found]
            rows[idx] = c[found, first[found]]
            if where is not None:
                where[idx] = win[found, first[found]]
            active = active[~done]
            base = (base[~done] + _WINDOW) & mask
        return rows, where
        mask = (1 << self._bits) - 1
        pos = self._slot_of(ids)
        # First probe for everyone: most ids sit in their home slot.
        cand = self._slots[pos].astype(np.int64)
        hit = cand >= 0
        hit[hit] = self._ids[cand[hit]] == ids[hit]
        rows[hit] = cand[hit]
        where[hit] = pos[hit]
        active = np.flatnonzero(~hit & (cand >= 0))
        # The rest probe a window of slots per round, so rounds stay few even
        # when a probe run is long.
        step = np.arange(1, _WINDOW + 1, dtype=np.int64)
        base = pos[active]
        while active.size:
            win = (base[:, None] + step) & mask
            c = self._slots[win].astype(np.int64)
            occupied = c >= 0
            match = np.zeros(c.shape, dtype=bool)
            match[occupied] = self._ids[c[occupied]] == np.broadcast_to(
                ids[active][:, None], c.shape
            )[occupied]
            stop = match | ~occupied
            first = np.argmax(stop, axis=1)
            done = stop[np.arange(active.size), first]
            found = done & match[np.arange(active.size), first]
            idx = active[found]
            rows[idx] = c[found, first[found]]
            if where is not None:
                where[idx] = win[found, first[found]]
            active = active[~done]
            base = (base[~done] + _WINDOW) & mask
        return rows, where

    def insert_new(self, ids: Ids) -> Rows:
        """Append distinct ids known to be absent; return their new rows."""
        k = ids.shape[0]
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        self._reserve(self._size + k)
        rows = np.arange(self._size, self._size + k, dtype=np.int64)
        self._ids[self._size : self._size + k] = ids
        self._size += k
        self._place(rows)
        return rows

    def find_or_insert(self, ids: Ids) -> tuple[Rows, int]:
        """Rows of ``ids``, inserting the absent ones (in first-occurrence order).

        Returns the rows and the number of rows that existed before (new rows are
        ``>= that number``).
        """
        rows = self.find(ids)
        before = self._size
        missing = rows < 0
        if missing.any():
            new_ids, first, inverse = np.unique(
                ids[missing], return_index=True, return_inverse=True
            )
            order = np.argsort(first, kind="stable")  # insertion in first-occurrence order
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            new_rows = self.insert_new(new_ids[order])
            rows[missing] = new_rows[rank[inverse]]
        return rows, before

    def keep_rows(self, keep: npt.NDArray[np.bool_]) -> None:
        """Drop every row where ``keep`` is False; surviving rows are renumbered densely
        in their old order. Callers compact their own columns the same way."""
        kept = self._ids[: self._size][keep]
        self._size = kept.shape[0]
        self._ids[: self._size] = kept
        self._rebuild_slots()

    def clear(self) -> None:
        """Remove every id (capacity is kept)."""
        self._size = 0
        self._slots.fill(-1)

    def _reserve(self, n: int) -> None:
        if n > self._ids.shape[0]:
            grown = np.zeros(max(n, 2 * self._ids.shape[0]), dtype=np.int64)
            grown[: self._size] = self._ids[: self._size]
            self._ids = grown
        if n > (1 << self._bits) * _MAX_LOAD:
            while n > (1 << self._bits) * _MAX_LOAD:
                self._bits += 1
            self._rebuild_slots()

    def _rebuild_slots(self) -> None:
        self._slots = np.full(1 << self._bits, -1, dtype=np.int32)
        self._place(np.arange(self._size, dtype=np.int64))

    def _place(self, rows: Rows) -> None:
        """Write slot entries for ``rows`` (whose ids are distinct and not yet placed)."""
        mask = (1 << self._bits) - 1
        pos = self._slot_of(self._ids[rows])
        pending = rows
        while pending.size:
            free = self._slots[pos] < 0
            want_rows = pending[free]
            want_pos = pos[free]
            # Several rows may aim at one free slot: one write lands, the others retry.
            self._slots[want_pos] = want_rows.astype(np.int32)
            won = self._slots[want_pos] == want_rows
            retry = ~free
            retry[np.flatnonzero(free)[~won]] = True
            pending = pending[retry]
            pos = (pos[retry] + 1) & mask
