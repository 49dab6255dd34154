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
* level 0 keeps at least 1.875 slots per id that ever reached it and the deeper
  levels 1.5, so about 22% of the ids go past level 0 and 27% of those reaching a
  deeper level go further: 9 levels for 65,536 ids, 11 for 4 million (the deeper
  levels are read by a fifth of a lookup's ids, so they trade load for memory);
* a level has any number of slots (no power of two): one built for more ids than
  doubling it would hold (the first build, a bulk insert such as a restore,
  ``reserve`` or a large first insert, the rebuild after eviction) gets exactly the
  slots those ids need, about 9.4 bytes per id in all (rounding level 0 up to a
  power of two took 8 to 16 bytes per id at level 0 alone, 11 in all for 1M ids); a
  level that overflows by a smaller batch doubles, rounded up to a power of two, so
  a table growing batch by batch rebuilds each id about once per doubling and
  follows the same sizes whatever its first batch.

A level only fills until the whole index is rebuilt (growth, :meth:`keep_rows`), so
an empty slot seen by a lookup stays proof of absence. Growing level ``k`` rebuilds it
and the levels below it, which is what keeps that true.

Compared with linear probing at the same load this reads at most one slot per level
instead of a run of slots, and batches resolve in a few fixed rounds instead of one
round per probe step (the longest run decides how many); the price is the deeper
levels, about 0.3 slots more per id. Slot hashes are multiply / xor-shift / multiply
with splitmix64's constants on the id plus a per-level constant; the top 32 bits
are scaled to the level's size (``(top * slots) >> 32``, Lemire's fast range).
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from ps_server.engine.types import Ids, Rows

_MUL1 = np.uint64(0x9E3779B97F4A7C15)
_MUL2 = np.uint64(0xBF58476D1CE4E5B9)
_LEVEL_SEED = 0x632BE59BD9B4E019
_MIN_SLOTS = 16
#: Slots per id that reached a level, as a fraction (the inverse of its maximum load):
#: 1.875 at level 0, which every lookup reads, 1.5 below it, which only the ~22% of
#: ids displaced from level 0 read (27% of those go one level further instead of the
#: 21% that 2 slots per id would send, for a quarter less memory).
_SLOTS_PER_ID = ((15, 8), (3, 2))
#: A level that overflows is rebuilt with at least this many times its old slots.
_GROWTH = 2
_U32 = np.uint64(32)

Slots = npt.NDArray[np.int32]


def _slots_for(n: int, level: int, old: int = 0) -> int:
    """Slots of level ``level`` built for ``n`` ids, replacing one of ``old`` slots.

    A level built for more ids than its doubling would hold (a first level, a bulk
    insert, a rebuild after eviction) gets exactly the slots those ids need; one that
    overflows by a smaller batch doubles, rounded up to a power of two so that a
    table growing batch by batch follows the same sizes whatever its first batch.
    """
    num, den = _SLOTS_PER_ID[min(level, 1)]
    need = max(_MIN_SLOTS, -(-num * n // den))
    grown = _GROWTH * old
    return need if need >= grown else 1 << (grown - 1).bit_length()


@functools.cache
def _level_seed(level: int) -> np.uint64:
    return np.uint64(level * _LEVEL_SEED % (1 << 64))


def _overflows(n: int, level: int, slots: int) -> bool:
    """Whether ``n`` ids are more than level ``level`` of ``slots`` slots may hold."""
    num, den = _SLOTS_PER_ID[min(level, 1)]
    return num * n > den * slots


class IdIndex:
    """Batch map ``id -> row``; rows are ``0 .. size-1`` in insertion order.

    :param capacity_hint: ids expected; the id column and the levels are sized for
        it (each level for a quarter of the ids reaching the one above, more than the
        ~22% that do while the hint holds), so inserting that many rarely needs a
        rebuild.
    """

    def __init__(self, capacity_hint: int = 0) -> None:
        self._size = 0
        self._ids: Ids = np.zeros(max(16, capacity_hint), dtype=np.int64)
        self._levels: list[Slots] = []
        #: ``_sizes[k]``: slots of level ``k`` as a uint64 (the fast-range multiplier).
        self._sizes: list[np.uint64] = []
        #: ``_reached[k]``: ids placed at level ``k`` or below since it was built.
        self._reached: list[int] = []
        reach = capacity_hint
        while not self._levels or reach:
            self._add_level(_slots_for(reach, len(self._levels)))
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
        h = h * _MUL1 if level == 0 else (h + _level_seed(level)) * _MUL1
        h ^= h >> np.uint64(29)
        h *= _MUL2
        h >>= _U32
        h *= self._sizes[level]
        h >>= _U32
        return h.view(np.int64)

    def _add_level(self, slots: int) -> None:
        self._levels.append(np.full(slots, -1, dtype=np.int32))
        self._sizes.append(np.uint64(slots))
        self._reached.append(0)

    def find(self, ids: Ids) -> Rows:
        """Rows of ``ids`` (``-1`` where absent); duplicates allowed."""
        n = ids.shape[0]
        if n == 0 or self._size == 0:
            return np.full(n, -1, dtype=np.int64)
        id_col = self._ids
        # An empty slot (-1) reads the last id of the column, and whether that matches
        # or not its row stays -1: so `got` is the row where the slot holds the id and
        # -1 elsewhere, and the ids to carry down are those whose slot is occupied by
        # another id (cand >= 0 but got == -1, i.e. cand != got).
        cand = np.take(self._levels[0], self._slot_of(ids, 0)).astype(np.int64)
        rows = np.where(np.take(id_col, cand) == ids, cand, -1)
        todo = np.flatnonzero(cand != rows)
        if not todo.size:
            return rows
        pending = ids[todo]
        for level in range(1, len(self._levels)):
            cand = np.take(self._levels[level], self._slot_of(pending, level)).astype(np.int64)
            got = np.where(np.take(id_col, cand) == pending, cand, -1)
            rows[todo] = got  # the rows of `todo` were -1: hits land, the others stay
            further = np.flatnonzero(cand != got)
            if not further.size:
                break
            todo, pending = todo[further], pending[further]
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
        del self._levels[:], self._sizes[:], self._reached[:]
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
            if level == len(self._levels) or _overflows(
                reached, level, self._levels[level].shape[0]
            ):
                # (Re)build this level for everything that reaches it, and redo the
                # levels below: their ids were displaced by this level's old layout.
                old = self._levels[level].shape[0] if level < len(self._levels) else 0
                if level == 0:
                    # Every row is placed or being placed: take them in column order,
                    # which reads the id column sequentially instead of row by row.
                    rows = np.arange(self._size, dtype=np.int64)
                else:
                    rows = np.concatenate([self._rows_at_or_below(level), rows])
                del self._levels[level:], self._sizes[level:], self._reached[level:]
                reached = rows.size
                self._add_level(_slots_for(reached, level, old))
            self._reached[level] = reached
            slots = self._levels[level]
            # Level 0 is always given a run of consecutive rows (appended ones, or every
            # row on a rebuild), whose ids are a slice of the column: no gather.
            keys = self._ids[rows[0] : rows[0] + rows.size] if level == 0 else self._ids[rows]
            pos = self._slot_of(keys, level)
            free = np.flatnonzero(slots[pos] < 0)
            # Several rows may aim at one free slot: one write lands, the others go on.
            at, cand = pos[free], rows[free]
            slots[at] = cand
            won = free[slots[at] == cand]
            stays = np.ones(rows.size, dtype=bool)
            stays[won] = False
            rows = rows[stays]
            level += 1
