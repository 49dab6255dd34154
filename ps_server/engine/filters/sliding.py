"""Monolith's sliding hash filter: counting cells in a ring of splits, vectorized.

Layout (docs/semantics.md §3.2). ``n = max(split_num, 5)`` splits (``split_num < 5`` is
refused unless ``allow_small_split_num``, Monolith's quirk: 5 allocated, ``split_num``
reported and saved), each an array
of ``total_size + 64`` ``uint16`` cells, ``split_capacity = capacity // (n - 1)`` and
``total_size = int(split_capacity * 1.2)``. A cell is ``(signature << 4) | count``
with ``signature = (uint64(id) >> 17) & 0xFFF`` and a 4-bit count saturating at 15;
0 means empty. New ids go to split ``head``; when it holds ``split_capacity - 1``
elements, ``head`` moves on and the split after the new head is cleared, so the
splits behind ``head`` keep the counts of the last ``n - 2`` windows.

Probing. ``find(split, id)`` looks at 16 consecutive cells from
``h(id) % total_size`` and takes the first that is empty or carries the id's
signature. ``h`` is the splitmix64 finalizer (:func:`mix64`) of ``uint64(id)``: fixed,
so saved cells mean the same in every process (Monolith's ``absl::Hash`` is
process-seeded; cell positions were never portable).

``add(id, k)`` (k = min(count, 15)) returns the count before adding: forward search
over ``head`` then ``head + 1``; none -> ``failure_count += 1`` and 15; a non-empty cell
-> saturating add; an empty cell -> backward search of up to
``min(head_increment, n - 2)`` earlier splits for a non-empty cell, whose count is
carried into the new cell; then, if split ``head`` is full, advance.

Vectorization. Within a stretch of the batch where ``head`` stays put only splits
``head`` and ``head + 1`` are written, so the forward search is one path of 32 cells.
Distinct keys ``(h % total_size, signature)`` resolve to the first empty-or-matching
cell of their path. Sequentially a key takes the first cell of its path that carried
its signature before the window, or was empty and is not taken by an earlier key (by
first occurrence) of another signature; keys whose empty candidate no other key can
reach keep it, the others are settled by iterating that definition (it only looks at
earlier keys, so it converges to the sequential result, in blocks of keys in order).
Per cell, counts are cumulative sums of ``k`` saturating at 15, and the first
occurrence on a fresh cell does the backward search. The batch is cut after the
occurrence that fills split ``head``; the rest is processed after the advance. The
result is bit-for-bit the sequential algorithm (the tests compare it with a per-id
model). Speed: the work per window is a few dozen numpy passes, so a filter whose
head advances every few hundred occurrences (capacity far below a batch's distinct
ids) is much slower per id than one at a realistic capacity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protos import contract
from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.filters.base import Counts, FilterSplit, HashFilter, as_counts
from ps_server.engine.filters.thresholds import ThresholdConfig, Thresholds
from ps_server.engine.types import Ids, Mask, as_ids
from ps_server.errors import CheckpointCorruptError, ConfigError, ConfigMismatchError

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SPLIT_NUM",
    "FILL_RATE",
    "MAX_COUNT",
    "MAX_FORWARD_STEP",
    "MAX_STEP",
    "PADDING",
    "SlidingHashFilter",
    "mix64",
    "signatures",
]

DEFAULT_CAPACITY = contract.DEFAULT_FILTER_CAPACITY
DEFAULT_SPLIT_NUM = contract.DEFAULT_FILTER_SPLIT_NUM
MIN_CAPACITY = 300
MIN_SPLIT_NUM = 5
MAX_FORWARD_STEP = 2
MAX_STEP = 16  # cells examined per probe
PADDING = 64  # cells after total_size in each split's array
FILL_RATE = 1.2
MAX_COUNT = 15

_PATH = MAX_FORWARD_STEP * MAX_STEP  # forward path: 16 cells of head, 16 of head+1
_MIN_WINDOW = 256
_SETTLE_BLOCK = 2048  # contested keys settled together
_CROWDED = 0.5  # contested keys per forward cell above which blocks shrink
_MAX_WINDOW = 1 << 24
_I64 = npt.NDArray[np.int64]
_U64 = npt.NDArray[np.uint64]


def mix64(x: _U64) -> _U64:
    """splitmix64's finalizer (Stafford variant 13), the filter's fixed 64-bit hash.

    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31`` over ``uint64`` (wrapping).
    """
    z = x.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def signatures(ids: Ids) -> _I64:
    """The 12-bit cell signature of each id: ``(uint64(id) >> 17) & 0xFFF``."""
    return ((ids.view(np.uint64) >> np.uint64(17)) & np.uint64(0xFFF)).astype(np.int64)


class SlidingHashFilter(HashFilter):
    """Counting filter over a ring of ``split_num`` splits (Monolith's default filter).

    :param capacity: elements the whole filter is sized for; raised to 300 if smaller.
    :param split_num: number of splits (files on save); must be >= 5 unless
        ``allow_small_split_num``.
    :param thresholds: per-slot thresholds (see :class:`HashFilter`).
    :param allow_small_split_num: Monolith's behaviour for ``1 <= split_num < 5``:
        allocate 5 splits (:attr:`allocated_splits`, sizes and ``max_backward_step``
        from 5) but report ``split_num`` (in metas and :attr:`split_num`), so a save
        writes and a restore reads only the first ``split_num`` splits; the others are
        neither saved nor restored. Off by default: such a config is refused.
    :raises ConfigError: ``split_num < 5`` (unless allowed; always for < 1), a negative
        capacity, a capacity too small for the splits (no cell per split), or an
        invalid thresholds config.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        split_num: int = DEFAULT_SPLIT_NUM,
        thresholds: ThresholdConfig | Thresholds = None,
        *,
        allow_small_split_num: bool = False,
    ) -> None:
        super().__init__(thresholds)
        capacity, split_num = int(capacity), int(split_num)
        if split_num < MIN_SPLIT_NUM and not (allow_small_split_num and split_num >= 1):
            raise ConfigError(
                f"sliding hash filter split_num must be >= {MIN_SPLIT_NUM}, got {split_num} "
                "(Monolith silently uses 5 splits but still reports the smaller number; "
                "allow_small_split_num=True reproduces that)"
            )
        if capacity < 0:
            raise ConfigError(f"sliding hash filter capacity must be >= 0, got {capacity}")
        self.capacity = max(capacity, MIN_CAPACITY)
        self._split_num = split_num
        self._splits = max(split_num, MIN_SPLIT_NUM)
        n = self._splits
        self.split_capacity = self.capacity // (n - MAX_FORWARD_STEP + 1)
        self.total_size = int(self.split_capacity * FILL_RATE)
        if self.total_size < 1:
            raise ConfigError(
                f"capacity {self.capacity} is too small for {n} splits "
                f"(split capacity {self.split_capacity} gives no cells)"
            )
        self.max_backward_step = n - MAX_FORWARD_STEP
        self._width = self.total_size + PADDING
        self.cells = np.zeros((n, self._width), dtype=np.uint16)
        self.num_elements = np.zeros(n, dtype=np.int64)
        self.split_failure_counts = np.zeros(n, dtype=np.int64)
        self.head = 0
        self.head_increment = 0
        self.failure_count = 0
        self._window = _MAX_WINDOW  # occurrences per window (a speed hint, not state)

    # ------------------------------------------------------------------ properties

    @property
    def split_num(self) -> int:
        """Reported split count: metas and the number of files a save writes."""
        return self._split_num

    @property
    def allocated_splits(self) -> int:
        """Splits in the ring: ``split_num``, or 5 for a smaller ``split_num``."""
        return self._splits

    def __repr__(self) -> str:
        return (
            f"SlidingHashFilter(capacity={self.capacity}, split_num={self._split_num}, "
            f"head={self.head}, head_increment={self.head_increment}, "
            f"failure_count={self.failure_count})"
        )

    # ------------------------------------------------------------------ counting

    def _filter(
        self, ids: Ids, counts: Counts, thresholds: npt.NDArray[np.int64], with_table: bool
    ) -> Mask:
        counted = np.flatnonzero(thresholds > 0)
        filtered = np.zeros(ids.shape[0], dtype=np.bool_)
        if counted.size == 0:
            return filtered
        sub = ids[counted]
        pos = self._positions(sub)
        sig = signatures(sub)
        k = np.minimum(counts[counted], MAX_COUNT).astype(np.int64)
        old = self._add_batch(pos, sig, k)
        filtered[counted] = old < thresholds[counted]
        return filtered

    def add(self, ids: Ids, counts: Counts) -> _I64:
        """Monolith's ``add`` for each occurrence in order; returns the old counts.

        Counts every occurrence regardless of thresholds (:meth:`should_be_filtered`
        is the admission API). ``ids`` int64[n], ``counts`` >= 1 (clamped to 15).

        :raises BadTensorError, DimMismatchError: invalid ids or counts.
        """
        ids = as_ids(ids)
        k = np.minimum(as_counts(counts, ids.shape[0]), MAX_COUNT).astype(np.int64)
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self._add_batch(self._positions(ids), signatures(ids), k)

    def peek(self, ids: Ids) -> _I64:
        """Monolith's ``get``: the count ``add`` would return now, without counting."""
        ids = as_ids(ids)
        pos, sig = self._positions(ids), signatures(ids)
        n = self._splits
        result = np.full(ids.shape[0], MAX_COUNT, dtype=np.int64)
        pending = np.arange(ids.shape[0])
        fresh = np.zeros(0, dtype=np.int64)
        for step in range(MAX_FORWARD_STEP):
            if pending.size == 0:
                break
            vals = self._find((self.head + step) % n, pos[pending], sig[pending])
            valid = vals >= 0
            found = pending[valid]
            nonempty = vals[valid] > 0
            result[found[nonempty]] = vals[valid][nonempty] & MAX_COUNT
            fresh = np.concatenate([fresh, found[~nonempty]])
            pending = pending[~valid]
        if fresh.size:
            result[fresh] = self._backward(pos[fresh], sig[fresh])
        return result

    def _positions(self, ids: Ids) -> _I64:
        h = mix64(ids.view(np.uint64))
        return (h % np.uint64(self.total_size)).astype(np.int64)

    def _find(self, split: int, pos: _I64, sig: _I64) -> _I64:
        """Value of the first empty-or-matching cell of each probe in ``split``; -1 if none."""
        row = self.cells[split]
        out = np.full(pos.shape[0], -1, dtype=np.int64)
        active = np.arange(pos.shape[0])
        for step in range(MAX_STEP):
            if active.size == 0:
                break
            v = row[pos[active] + step].astype(np.int64)
            ok = (v == 0) | ((v >> 4) == sig[active])
            out[active[ok]] = v[ok]
            active = active[~ok]
        return out

    def _backward(self, pos: _I64, sig: _I64) -> _I64:
        """Count found by the backward search (0 if none) for keys new in the window."""
        n = self._splits
        base = np.zeros(pos.shape[0], dtype=np.int64)
        active = np.arange(pos.shape[0])
        for back in range(1, min(self.head_increment, self.max_backward_step) + 1):
            if active.size == 0:
                break
            vals = self._find((self.head - back) % n, pos[active], sig[active])
            hit = vals > 0
            base[active[hit]] = vals[hit] & MAX_COUNT
            active = active[~hit]
        return base

    def _add_batch(self, pos: _I64, sig: _I64, k: _I64) -> _I64:
        """Sequential ``add`` semantics over occurrences in order; returns old counts."""
        m = pos.shape[0]
        old = np.empty(m, dtype=np.int64)
        start = 0
        while start < m:
            stop = min(m, start + self._window)
            used = self._add_window(
                pos[start:stop], sig[start:stop], k[start:stop], old[start:stop]
            )
            # A head advance cuts the window short and the rest is processed again. Size
            # windows on what was consumed, so a small filter (frequent advances) does
            # not reprocess long tails; grow back while windows run to the end.
            if used == stop - start:
                self._window = min(self._window * 2, _MAX_WINDOW)
            else:
                self._window = max(_MIN_WINDOW, 4 * used)
            start += used
        return old

    def _add_window(self, pos: _I64, sig: _I64, k: _I64, out: _I64) -> int:
        """Process occurrences while ``head`` is fixed; write ``out``; return how many."""
        m = pos.shape[0]
        n, width = self._splits, self._width
        head, nxt = self.head, (self.head + 1) % n
        flat = self.cells.reshape(-1)

        # Group occurrences by key (pos, sig), keeping occurrence order inside groups.
        key = pos * 4096 + sig
        occ_bits = max(1, (m - 1).bit_length())
        if (self.total_size - 1).bit_length() + 12 + occ_bits <= 63:
            packed = np.sort((key << occ_bits) | np.arange(m, dtype=np.int64))
            by_key = packed & ((1 << occ_bits) - 1)
            sorted_key = packed >> occ_bits
        else:
            by_key = np.argsort(key, kind="stable")
            sorted_key = key[by_key]
        starts_mask = np.empty(m, dtype=np.bool_)
        starts_mask[0] = True
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=starts_mask[1:])
        group_starts = np.flatnonzero(starts_mask)
        first = by_key[group_starts]  # first occurrence of each key (also its order)
        key_of_occ = np.empty(m, dtype=np.int64)
        key_of_occ[by_key] = np.cumsum(starts_mask) - 1
        kpos, ksig = pos[first], sig[first]
        nkeys = first.shape[0]

        # Forward path of each key against the cells as they were before this window.
        cand_j = np.full(nkeys, _PATH, dtype=np.int64)
        cand_cell = np.full(nkeys, -1, dtype=np.int64)
        cand_val = np.zeros(nkeys, dtype=np.int64)
        active = np.arange(nkeys)
        for j in range(_PATH):
            if active.size == 0:
                break
            cell = (head if j < MAX_STEP else nxt) * width + kpos[active] + (j % MAX_STEP)
            v = flat[cell].astype(np.int64)
            ok = (v == 0) | ((v >> 4) == ksig[active])
            hit = active[ok]
            cand_j[hit] = j
            cand_cell[hit] = cell[ok]
            cand_val[hit] = v[ok]
            active = active[~ok]
        fresh_keys = np.flatnonzero((cand_j < _PATH) & (cand_val == 0))
        if fresh_keys.size > 1:
            self._settle_claims(fresh_keys, first, kpos, ksig, cand_j, cand_cell, head, nxt)
        key_cell = cand_cell  # -1: the forward search fails for every occurrence
        key_fresh = flat[np.maximum(key_cell, 0)] == 0
        key_fresh &= key_cell >= 0

        # Occurrences grouped by cell, in occurrence order.
        occ_cell = key_cell[key_of_occ]
        valid_cells = key_cell[key_cell >= 0]
        shared = valid_cells.size > 1 and bool(
            (np.diff(np.sort(valid_cells)) == 0).any()
        )
        if not shared:
            by_cell = by_key
            cell_starts_mask = starts_mask
        else:
            uniq, cell_rank = np.unique(key_cell, return_inverse=True)
            rank_of_occ = cell_rank[key_of_occ].astype(np.int64)
            if (uniq.size - 1).bit_length() + occ_bits <= 63:
                packed = np.sort((rank_of_occ << occ_bits) | np.arange(m, dtype=np.int64))
                by_cell = packed & ((1 << occ_bits) - 1)
                sorted_rank = packed >> occ_bits
            else:
                by_cell = np.argsort(rank_of_occ, kind="stable")
                sorted_rank = rank_of_occ[by_cell]
            cell_starts_mask = np.empty(m, dtype=np.bool_)
            cell_starts_mask[0] = True
            np.not_equal(sorted_rank[1:], sorted_rank[:-1], out=cell_starts_mask[1:])
        g_starts = np.flatnonzero(cell_starts_mask)
        group = np.cumsum(cell_starts_mask) - 1  # group of each position in by_cell order
        g_cell = occ_cell[by_cell[g_starts]]
        g_first = by_cell[g_starts]
        g_key = key_of_occ[g_first]
        g_fresh = key_fresh[g_key]
        g_valid = g_cell >= 0

        # Where split `head` becomes full: the first new cell after which it holds
        # split_capacity - 1 elements (the check follows every new-entry add).
        used = m
        advance = False
        new_groups = np.flatnonzero(g_fresh)
        if new_groups.size:
            event_order = np.argsort(g_first[new_groups])
            ev_first = g_first[new_groups][event_order]
            ev_in_head = (g_cell[new_groups][event_order] // width) == head
            head_after = np.minimum(
                self.num_elements[head] + np.cumsum(ev_in_head), self.split_capacity
            )
            full = np.flatnonzero(head_after >= self.split_capacity - 1)
            if full.size:
                used = int(ev_first[full[0]]) + 1
                advance = True

        # Old count of each occurrence: min(base + earlier k on the same cell, 15).
        k_sorted = k[by_cell]
        csum = np.cumsum(k_sorted)
        before = csum - k_sorted
        before -= before[g_starts][group]
        in_window = by_cell < used
        g_base = np.zeros(g_starts.shape[0], dtype=np.int64)
        g_live = g_valid & ~g_fresh
        g_base[g_live] = flat[g_cell[g_live]].astype(np.int64) & MAX_COUNT
        g_new = np.flatnonzero(g_fresh & (g_first < used))
        if g_new.size:
            g_base[g_new] = self._backward(kpos[g_key[g_new]], ksig[g_key[g_new]])
        occ_valid = g_valid[group]
        old_sorted = np.where(
            occ_valid, np.minimum(g_base[group] + before, MAX_COUNT), MAX_COUNT
        )
        keep = in_window
        out[by_cell[keep]] = old_sorted[keep]
        self.failure_count += int(np.count_nonzero(keep & ~occ_valid))

        # Write the touched cells and element counts.
        g_added = np.bincount(group[keep], weights=k_sorted[keep], minlength=g_starts.shape[0])
        touched = np.flatnonzero(g_valid & (g_first < used))
        if touched.size:
            total = np.minimum(g_base[touched] + g_added[touched].astype(np.int64), MAX_COUNT)
            flat[g_cell[touched]] = ((ksig[g_key[touched]] << 4) | total).astype(np.uint16)
        if g_new.size:
            in_head = int(np.count_nonzero(g_cell[g_new] // width == head))
            for split, grown in ((head, in_head), (nxt, g_new.size - in_head)):
                if grown:
                    self.num_elements[split] = min(
                        int(self.num_elements[split]) + grown, self.split_capacity
                    )
        if advance:
            self._advance()
        return used

    def _settle_claims(
        self,
        fresh_keys: _I64,
        order: _I64,
        kpos: _I64,
        ksig: _I64,
        cand_j: _I64,
        cand_cell: _I64,
        head: int,
        nxt: int,
    ) -> None:
        """Resolve keys whose empty candidate cell another key might take first.

        Sequentially, key ``u`` (keys ordered by first occurrence) gets the first cell
        of its path that carries its signature before the window, or is empty before
        the window and not taken by an earlier key of another signature. That
        definition only looks at earlier keys, so iterating it from the pre-window
        candidates fixes at least one more key per pass and stops at the unique
        solution (in practice after a few passes). Keys no other key can reach are
        certain from the start and left out.

        Updates ``cand_j``/``cand_cell`` in place (``-1`` cell: the path is all taken).
        """
        width = self._width
        # Reach of each fresh key: its path from the candidate on, as at most two
        # intervals of flat cell indices. A candidate inside only its own key's reach
        # can be taken by nobody else.
        j = cand_j[fresh_keys]
        p = kpos[fresh_keys]
        in_head = j < MAX_STEP
        lo = [np.where(in_head, head * width + p + j, nxt * width + p + j - MAX_STEP)]
        hi = [np.where(in_head, head * width + p + MAX_STEP, nxt * width + p + MAX_STEP)]
        lo.append(nxt * width + p[in_head])
        hi.append(nxt * width + p[in_head] + MAX_STEP)
        starts = np.sort(np.concatenate(lo))
        ends = np.sort(np.concatenate(hi))
        points = cand_cell[fresh_keys]
        cover = np.searchsorted(starts, points, side="right") - np.searchsorted(
            ends, points, side="right"
        )
        contested = fresh_keys[cover > 1]
        if contested.size == 0:
            return

        # Keys only look at earlier keys: settle blocks of keys in first-occurrence
        # order, each against the final cells of the blocks before it.
        contested = contested[np.argsort(order[contested])]
        steps = np.arange(_PATH, dtype=np.int64)
        step_offset = np.where(steps < MAX_STEP, head, nxt) * width + steps % MAX_STEP
        flat = self.cells.reshape(-1)
        fixed_cell = np.zeros(0, dtype=np.int64)  # sorted cells taken by settled keys
        fixed_sig = np.zeros(0, dtype=np.int64)
        # Crowded splits make long chains of displaced keys: settle fewer at a time.
        crowded = contested.shape[0] > _CROWDED * MAX_FORWARD_STEP * self.total_size
        block_size = _SETTLE_BLOCK // 8 if crowded else _SETTLE_BLOCK
        for b0 in range(0, contested.shape[0], block_size):
            block = contested[b0 : b0 + block_size]
            sig = ksig[block]
            # Eligible cells: empty before the window or carrying the key's signature,
            # up to the first of the latter (the key stops there).
            paths = kpos[block][:, None] + step_offset[None, :]
            v = flat[paths].astype(np.int64)
            match = (v != 0) & ((v >> 4) == sig[:, None])
            eligible = (v == 0) | match
            eligible &= (np.cumsum(match, axis=1) - match) == 0
            e_row, e_step = np.nonzero(eligible)
            e_cell = paths[e_row, e_step]
            e_match = match[e_row, e_step]
            row_start = np.searchsorted(e_row, np.arange(block.shape[0] + 1))
            choice = _settle_block(e_row, e_cell, e_match, sig, row_start, fixed_cell, fixed_sig)
            ok = choice >= 0
            safe = np.maximum(choice, 0)
            cand_cell[block] = np.where(ok, e_cell[safe], -1)
            cand_j[block] = np.where(ok, e_step[safe], _PATH)
            if b0 + block_size < contested.shape[0]:
                took = choice[ok]
                took = took[~e_match[took]]
                cells = np.concatenate([fixed_cell, e_cell[took]])
                sigs = np.concatenate([fixed_sig, sig[e_row[took]]])
                fixed_cell, first = np.unique(cells, return_index=True)
                fixed_sig = sigs[first]

    def _advance(self) -> None:
        n = self._splits
        self.head = (self.head + 1) % n
        self.head_increment += 1
        cleared = (self.head + 1) % n
        self.cells[cleared] = 0
        self.num_elements[cleared] = 0
        self.split_failure_counts[cleared] = 0

    # ------------------------------------------------------------------ state

    def _meta(self, index: int) -> eht.HashFilterSplitMetaDump:
        meta = eht.HashFilterSplitMetaDump()
        meta.failure_count = int(self.split_failure_counts[index])
        meta.total_size = self.total_size
        meta.num_elements = int(self.num_elements[index])
        meta.fill_rate = FILL_RATE
        shared = meta.sliding_hash_filter_meta
        shared.split_num = self._split_num
        shared.max_forward_step = MAX_FORWARD_STEP
        shared.max_backward_step = self.max_backward_step
        shared.max_step = MAX_STEP
        shared.head = self.head
        shared.head_increment = self.head_increment
        shared.failure_count = self.failure_count
        return meta

    def export_splits(self, *, allocated: bool = False) -> list[FilterSplit]:
        """One :class:`FilterSplit` per saved split; ``cells`` are read-only views.

        :param allocated: every allocated split instead (differs only when a
            ``split_num < 5`` was allowed: the splits past ``split_num`` are never saved).
        """
        out = []
        for i in range(self._splits if allocated else self._split_num):
            view = self.cells[i].view()
            view.flags.writeable = False
            out.append(FilterSplit(self._meta(i), view))
        return out

    @property
    def cells_per_split(self) -> int:
        """Length of each split's cell array: ``total_size + 64``."""
        return self._width

    def check_split_meta(
        self, index: int, meta: eht.HashFilterSplitMetaDump, source: str = ""
    ) -> None:
        where = source or f"split {index}"
        if not meta.HasField("sliding_hash_filter_meta"):
            raise ConfigMismatchError(f"{where}: no sliding_hash_filter_meta in the split meta")
        shared = meta.sliding_hash_filter_meta
        expected = {
            "split_num": self._split_num,
            "max_forward_step": MAX_FORWARD_STEP,
            "max_backward_step": self.max_backward_step,
            "max_step": MAX_STEP,
        }
        for field, want in expected.items():
            got = getattr(shared, field)
            if got != want:
                raise ConfigMismatchError(
                    f"{where}: {field} is {got} in the checkpoint but {want} in the live filter"
                )
        if meta.total_size != self.total_size:
            raise ConfigMismatchError(
                f"{where}: total_size is {meta.total_size} in the checkpoint but "
                f"{self.total_size} in the live filter (capacity {self.capacity}, "
                f"split_num {self._split_num})"
            )
        if shared.head >= self._splits:
            raise CheckpointCorruptError(
                f"{where}: head {shared.head} is out of range for {self._splits} splits"
            )

    def check_split(self, index: int, split: FilterSplit, source: str = "") -> None:
        self.check_split_meta(index, split.meta, source)
        where = source or f"split {index}"
        cells = split.cells
        if cells.dtype != np.uint16 or cells.shape != (self._width,):
            raise ConfigMismatchError(
                f"{where}: expected uint16[{self._width}] cells, "
                f"got {cells.dtype}{list(cells.shape)}"
            )

    def _check_consistent(self, splits: Sequence[FilterSplit], sources: Sequence[str]) -> None:
        first = splits[0].meta.sliding_hash_filter_meta
        ref = (first.head, first.head_increment, first.failure_count)
        for i, split in enumerate(splits[1:], start=1):
            s = split.meta.sliding_hash_filter_meta
            if (s.head, s.head_increment, s.failure_count) != ref:
                raise CheckpointCorruptError(
                    f"{sources[i] or f'split {i}'}: filter-wide meta (head, head_increment, "
                    f"failure_count) = {(s.head, s.head_increment, s.failure_count)} differs "
                    f"from {sources[0] or 'split 0'}: {ref}"
                )

    def _import(self, splits: Sequence[FilterSplit]) -> None:
        shared = splits[0].meta.sliding_hash_filter_meta
        for i, split in enumerate(splits):
            self.cells[i] = split.cells
            self.num_elements[i] = split.meta.num_elements
            self.split_failure_counts[i] = split.meta.failure_count
        self.head = int(shared.head)
        self.head_increment = int(shared.head_increment)
        self.failure_count = int(shared.failure_count)


def _settle_block(
    e_row: _I64,
    e_cell: _I64,
    e_match: npt.NDArray[np.bool_],
    sig: _I64,
    row_start: _I64,
    fixed_cell: _I64,
    fixed_sig: _I64,
) -> _I64:
    """Chosen eligible entry of each row of a block (``-1``: all taken), rows in order.

    Row ``r`` takes its first entry that carried its signature before the window, or is
    not held by an earlier row (or a settled earlier block, ``fixed_*``) of another
    signature. Iterated from everyone's first entry; only rows whose entries up to
    their choice changed hands are re-examined, until nothing moves.
    """
    rows = sig.shape[0]
    n_entries = e_row.shape[0]
    # Entries held by a settled earlier block under another signature never open up.
    if fixed_cell.shape[0]:
        at = np.minimum(np.searchsorted(fixed_cell, e_cell), fixed_cell.shape[0] - 1)
        closed = (fixed_cell[at] == e_cell) & (fixed_sig[at] != sig[e_row]) & ~e_match
    else:
        closed = np.zeros(n_entries, dtype=np.bool_)
    entry_ids = np.arange(n_entries, dtype=np.int64)
    nonempty = row_start[1:] > row_start[:-1]
    first_entry = np.where(nonempty, row_start[:-1], -1)
    choice = np.full(rows, -1, dtype=np.int64)
    choice[nonempty] = first_entry[nonempty]
    todo = np.ones(rows, dtype=np.bool_)
    while True:
        # Holder of each cell claimed now: the earliest row choosing it (not a match).
        claims = np.flatnonzero(choice >= 0)
        claims = claims[~e_match[choice[claims]]]
        held_cell, first = np.unique(e_cell[choice[claims]], return_index=True)
        held_row = claims[first]  # claims ascend, so the first is the earliest row
        held_sig = sig[held_row]
        # Re-examine the entries of rows to do.
        ent = todo[e_row]
        idx = entry_ids[ent]
        rr = e_row[idx]
        blocked = closed[idx].copy()
        if held_cell.shape[0]:
            at = np.minimum(np.searchsorted(held_cell, e_cell[idx]), held_cell.shape[0] - 1)
            blocked |= (
                (held_cell[at] == e_cell[idx])
                & (held_row[at] < rr)
                & (held_sig[at] != sig[rr])
                & ~e_match[idx]
            )
        candidate = np.where(blocked, n_entries, idx)
        best = np.full(rows, n_entries, dtype=np.int64)
        np.minimum.at(best, rr, candidate)
        todo_rows = np.flatnonzero(todo)
        new = np.where(best[todo_rows] < n_entries, best[todo_rows], -1)
        moved = todo_rows[new != choice[todo_rows]]
        if moved.size == 0:
            return choice
        old_cells = e_cell[choice[moved][choice[moved] >= 0]]
        choice[todo_rows] = new
        new_cells = e_cell[choice[moved][choice[moved] >= 0]]
        changed = np.unique(np.concatenate([old_cells, new_cells]))
        # Rows with an entry up to their choice (all entries if failed) on a changed cell.
        at = np.minimum(np.searchsorted(changed, e_cell), changed.shape[0] - 1)
        touched = changed[at] == e_cell
        limit = np.where(choice >= 0, choice, n_entries)[e_row]
        touched &= entry_ids <= limit
        todo = np.zeros(rows, dtype=np.bool_)
        todo[e_row[touched]] = True
