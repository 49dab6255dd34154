"""Vectorized map from int64 feature ids to dense row numbers.

Rows are dense (``0 .. size-1``) in insertion order, so tables keep their columns as
plain arrays indexed by row, and the id of row ``r`` is ``ids[r]``. The map from id
to row is a *cascade* of open-addressing levels without probing: level ``k`` is an
``int32`` array of row numbers (``-1`` = empty) with its own hash, and an id lives in
the first level whose slot for it was free when it was inserted. So:

* a lookup reads one slot per level; it stops at the level holding the id or at an
  empty slot (no id with that slot at that level was ever displaced further), and a
  batch only carries its unresolved ids down, so every round is one gather and one
  compare over a shrinking set;
* an insert writes every pending id into its slot of the current level at once; one
  id per slot wins, the others move down a level;
* each level keeps at least twice as many slots as the ids that ever reached it, so
  about 21% of the ids reaching a level go further and the number of levels grows
  with ``log(n) / log(4.7)`` (7 for 65,536 ids, 12 for 100 million).

A level only fills until the whole index is rebuilt (growth, :meth:`keep_rows`), so
an empty slot seen by a lookup stays proof of absence. Growing level ``k`` rebuilds it
and the levels below it, which is what keeps that true.

Compared with linear probing at the same load this reads at most one slot per level
instead of a run of slots, and batches resolve in a few fixed rounds instead of one
round per probe step (the longest run decides how many); the price is the deeper
levels, about 0.3 slots more per id. Slot hashes are multiply / xor-shift / multiply
with splitmix64's constants on the id plus a per-level constant, keeping the top bits.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ps_server.engine.types import Ids, Rows

_MUL1 = np.uint64(0x9E3779B97F4A7C15)
_MUL2 = np.uint64(0xBF58476D1CE4E5B9)
_LEVEL_SEED = 0x632BE59BD9B4E019
_MIN_BITS = 4
#: Slots per id that reached a level (the inverse of its maximum load).
_SLOTS_PER_ID = 2

Slots = npt.NDArray[np.int32]


def _bits_for(n: int) -> int:
    bits = _MIN_BITS
    while (1 << bits) < _SLOTS_PER_ID * n:
        bits += 1
    return bits


class IdIndex:
    """Batch map ``id -> row``; rows are ``0 .. size-1`` in insertion order.

    :param capacity_hint: ids expected; the id column and the levels are sized for
        it (each level for a quarter of the ids reaching the one above, more than the
        21% that do), so inserting that many rarely needs a rebuild.
    """

    def __init__(self, capacity_hint: int = 0) -> None:
        self._size = 0
        self._ids: Ids = np.zeros(max(16, capacity_hint), dtype=np.int64)
        self._levels: list[Slots] = []
        self._bits: list[int] = []
        #: ``_reached[k]``: ids placed at level ``k`` or below since it was built.
        self._reached: list[int] = []
        reach = capacity_hint
        while not self._levels or reach:
            self._bits.append(_bits_for(reach))
            self._levels.append(np.full(1 << self._bits[-1], -1, dtype=np.int32))
            self._reached.append(0)
            reach //= 4

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

    @property
    def num_levels(self) -> int:
        """Levels of the cascade in use."""
        return len(self._levels)

    def nbytes(self) -> int:
        """Bytes held by the index (every level and the id column)."""
        return int(self._ids.nbytes + sum(level.nbytes for level in self._levels))

    def _slot_of(self, ids: Ids, level: int) -> npt.NDArray[np.int64]:
        h = ids.view(np.uint64)
        h = h * _MUL1 if level == 0 else (h + np.uint64(level * _LEVEL_SEED % (1 << 64))) * _MUL1
        h ^= h >> np.uint64(29)
        h *= _MUL2
        h >>= np.uint64(64 - self._bits[level])
        return h.view(np.int64)

    def find(self, ids: Ids) -> Rows:
        """Rows of ``ids`` (``-1`` where absent); duplicates allowed."""
        n = ids.shape[0]
        if n == 0 or self._size == 0:
            return np.full(n, -1, dtype=np.int64)
        id_col = self._ids
        # An empty slot (-1) reads the last id of the column; `occupied` discards it.
        cand = np.take(self._levels[0], self._slot_of(ids, 0)).astype(np.int64)
        occupied = cand >= 0
        hit = occupied & (np.take(id_col, cand) == ids)
        rows = np.where(hit, cand, -1)
        todo = np.flatnonzero(occupied & ~hit)
        if not todo.size:
            return rows
        pending = ids[todo]
        for level in range(1, len(self._levels)):
            cand = np.take(self._levels[level], self._slot_of(pending, level)).astype(np.int64)
            occupied = cand >= 0
            hit = occupied & (np.take(id_col, cand) == pending)
            rows[todo[hit]] = cand[hit]
            further = occupied & ~hit
            todo, pending = todo[further], pending[further]
            if not todo.size:
                break
        return rows

    def insert_new(self, ids: Ids) -> Rows:
        """Append distinct ids known to be absent; return their new rows."""
        k = ids.shape[0]
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        if self._size + k > self._ids.shape[0]:
            grown = np.zeros(max(self._size + k, 2 * self._ids.shape[0]), dtype=np.int64)
            grown[: self._size] = self._ids[: self._size]
            self._ids = grown
        rows = np.arange(self._size, self._size + k, dtype=np.int64)
        self._ids[self._size : self._size + k] = ids
        self._size += k
        self._place(rows, 0)
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
        del self._levels[:], self._bits[:], self._reached[:]
        self._place(np.arange(self._size, dtype=np.int64), 0)

    def clear(self) -> None:
        """Remove every id (capacity is kept)."""
        self._size = 0
        for slots in self._levels:
            slots.fill(-1)
        self._reached = [0] * len(self._levels)

    def _rows_at_or_below(self, level: int) -> Rows:
        parts = [slots[slots >= 0].astype(np.int64) for slots in self._levels[level:]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _place(self, rows: Rows, level: int) -> None:
        """Give ``rows`` (distinct ids, in no level yet) slots from ``level`` down."""
        while rows.size:
            reached = rows.size + (self._reached[level] if level < len(self._levels) else 0)
            if level == len(self._levels) or (
                _SLOTS_PER_ID * reached > self._levels[level].shape[0]
            ):
                # (Re)build this level for everything that reaches it, and redo the
                # levels below: their ids were displaced by this level's old layout.
                rows = np.concatenate([self._rows_at_or_below(level), rows])
                del self._levels[level:], self._bits[level:], self._reached[level:]
                reached = rows.size
                bits = _bits_for(reached)
                self._levels.append(np.full(1 << bits, -1, dtype=np.int32))
                self._bits.append(bits)
                self._reached.append(0)
            self._reached[level] = reached
            slots = self._levels[level]
            pos = self._slot_of(self._ids[rows], level)
            free = np.flatnonzero(slots[pos] < 0)
            # Several rows may aim at one free slot: one write lands, the others go on.
            slots[pos[free]] = rows[free].astype(np.int32)
            won = free[slots[pos[free]] == rows[free]]
            stays = np.ones(rows.size, dtype=bool)
            stays[won] = False
            rows = rows[stays]
            level += 1
