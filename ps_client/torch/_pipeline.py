"""The lookup/push scheduler behind every module of :mod:`ps_client.torch`.

A module's sparse side is a list of tables; a *batch* is one array of distinct ids per
table. :class:`SparseSide` reads rows (``lookup``), sends gradients (``push``) and, when
pipelined, does both on background threads with the staleness bound of the module:

* pushes run in call order on one thread (step ``s`` reaches the shards before
  ``s + 1``);
* a lookup issued after ``p`` pushes were submitted waits for push ``p`` first, so it
  reflects every push up to ``p``;
* when a prefetched batch is used after more than ``staleness`` further pushes, the rows
  of its ids that those pushes touched are read again (after the last push), so a
  forward never misses more than the ``staleness`` most recent pushes of its ids.
  Rows of ids that no missed push touched cannot have changed through this module.

No torch here: arrays in, arrays out.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int64]
Rows = npt.NDArray[np.float32]
LookupFn = Callable[[Sequence[Ids]], list[Rows]]
PushFn = Callable[[Sequence[Ids], Sequence[Rows], int, int], None]


@dataclass
class StepTimes:
    """Seconds the calling thread spent waiting, summed since the last :meth:`reset`."""

    lookup_wait: float = 0.0
    push_wait: float = 0.0
    lookups: int = 0
    refreshed_ids: int = 0
    prefetch_misses: int = 0

    def reset(self) -> None:
        self.lookup_wait = self.push_wait = 0.0
        self.lookups = self.refreshed_ids = self.prefetch_misses = 0


@dataclass
class _Prefetch:
    uniq: list[Ids]
    pushes_seen: int
    future: cf.Future[list[Rows]]


@dataclass
class SparseSide:
    """Lookups and pushes of one module's tables, synchronous or pipelined."""

    lookup_fn: LookupFn
    push_fn: PushFn
    pipelined: bool = False
    staleness: int = 0
    times: StepTimes = field(default_factory=StepTimes)

    def __post_init__(self) -> None:
        if isinstance(self.staleness, bool) or not isinstance(self.staleness, int) or (
            self.staleness < 0
        ):
            raise ValueError(f"staleness must be an int >= 0, got {self.staleness!r}")
        self._lock = threading.Lock()
        self._pushes = 0  # pushes submitted so far
        self._push_futures: dict[int, cf.Future[None]] = {}
        self._pushed_ids: dict[int, list[Ids]] = {}
        self._prefetches: collections.deque[_Prefetch] = collections.deque()
        self._push_pool: cf.ThreadPoolExecutor | None = None
        self._lookup_pool: cf.ThreadPoolExecutor | None = None
        self._reported: set[int] = set()  # failed pushes whose error was raised

    # ------------------------------------------------------------ threads

    def _pools(self) -> tuple[cf.ThreadPoolExecutor, cf.ThreadPoolExecutor]:
        if self._push_pool is None or self._lookup_pool is None:
            self._push_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="ps-torch-push")
            self._lookup_pool = cf.ThreadPoolExecutor(2, thread_name_prefix="ps-torch-lookup")
        return self._push_pool, self._lookup_pool

    def close(self) -> None:
        """Wait for the pushes in flight and stop the threads (pending errors are raised)."""
        try:
            self.flush()
        finally:
            for pool in (self._push_pool, self._lookup_pool):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._push_pool = self._lookup_pool = None
            self._prefetches.clear()

    def _raise_pending(self) -> None:
        """Raise the error of the oldest failed push not raised yet."""
        for index, future in sorted(self._push_futures.items()):
            if index not in self._reported and future.done():
                error = future.exception()
                if error is not None:
                    self._reported.add(index)
                    raise error

    # ------------------------------------------------------------ lookups

    def _lookup_after(self, uniq: Sequence[Ids], after: int) -> list[Rows]:
        """Runs on a lookup thread: wait for push ``after``, then read."""
        dep = self._push_futures.get(after)
        if dep is not None:
            cf.wait([dep])  # a failed push's error is raised in the trainer's thread
        return self.lookup_fn(uniq)

    def prefetch(self, uniq: Sequence[Ids]) -> None:
        """Start reading ``uniq`` in the background (pipelined modules only)."""
        if not self.pipelined:
            return
        _, lookups = self._pools()
        seen = self._pushes
        future = lookups.submit(self._lookup_after, list(uniq), seen)
        self._prefetches.append(_Prefetch(list(uniq), seen, future))

    def _take_prefetch(self, uniq: Sequence[Ids]) -> _Prefetch | None:
        while self._prefetches:
            head = self._prefetches.popleft()
            if len(head.uniq) == len(uniq) and all(
                np.array_equal(a, b) for a, b in zip(head.uniq, uniq, strict=True)
            ):
                return head
            self.times.prefetch_misses += 1  # a batch skipped or prefetched out of order
        return None

    def rows(self, uniq: Sequence[Ids]) -> list[Rows]:
        """The rows of ``uniq`` (one array per table) within the staleness bound."""
        self._raise_pending()
        self.times.lookups += 1
        started, pushed = time.perf_counter(), self.times.push_wait
        try:
            if not self.pipelined:
                return self.lookup_fn(uniq)
            hit = self._take_prefetch(uniq)
            now = self._pushes
            if hit is None:
                self._wait_push(now)
                return self.lookup_fn(uniq)
            rows = hit.future.result()
            if now - hit.pushes_seen <= self.staleness:
                return rows
            return self._refresh(uniq, rows, hit.pushes_seen, now)
        finally:
            # Time spent waiting for a push inside the lookup counts as push wait only.
            waited = self.times.push_wait - pushed
            self.times.lookup_wait += time.perf_counter() - started - waited
            self._prune()

    def _refresh(self, uniq: Sequence[Ids], rows: list[Rows], seen: int, now: int) -> list[Rows]:
        """Read again the rows of ``uniq`` touched by pushes ``seen + 1 .. now``."""
        masks = []
        for t, ids in enumerate(uniq):
            touched = [self._pushed_ids[p][t] for p in range(seen + 1, now + 1)]
            masks.append(np.isin(ids, np.concatenate(touched)) if touched and ids.size
                         else np.zeros(ids.shape[0], dtype=bool))
        if not any(m.any() for m in masks):
            return rows
        self._wait_push(now)
        fresh = self.lookup_fn([ids[m] for ids, m in zip(uniq, masks, strict=True)])
        out = []
        for r, m, f in zip(rows, masks, fresh, strict=True):
            r = r.copy() if not r.flags.writeable else r
            r[m] = f
            out.append(r)
            self.times.refreshed_ids += int(m.sum())
        return out

    # ------------------------------------------------------------ pushes

    def push(self, ids: Sequence[Ids], grads: Sequence[Rows], global_step: int,
             req_time: int = 0) -> None:
        """Send one step's gradients; pipelined: in the background, in call order."""
        self._raise_pending()
        if not self.pipelined:
            started = time.perf_counter()
            try:
                self.push_fn(ids, grads, global_step, req_time)
            finally:
                self.times.push_wait += time.perf_counter() - started
            return
        pushes, _ = self._pools()
        with self._lock:
            self._pushes += 1
            index = self._pushes
            self._pushed_ids[index] = [np.unique(i) for i in ids]
            future = pushes.submit(self.push_fn, list(ids), list(grads), global_step, req_time)
            self._push_futures[index] = future

    def _wait_push(self, index: int) -> None:
        future = self._push_futures.get(index)
        if future is None:
            return
        started = time.perf_counter()
        cf.wait([future])
        self.times.push_wait += time.perf_counter() - started
        self._raise_pending()  # pushes run in order: every earlier one is done too

    def flush(self) -> None:
        """Wait until every push submitted so far is applied; raise a failed one's error."""
        self._wait_push(self._pushes)

    def _prune(self) -> None:
        """Forget pushed ids no outstanding prefetch can still need."""
        oldest = min((p.pushes_seen for p in self._prefetches), default=self._pushes)
        for index in [i for i in self._pushed_ids if i <= oldest]:
            del self._pushed_ids[index]
        for index in [
            i for i, f in self._push_futures.items()
            if i < oldest and f.done() and (f.exception() is None or i in self._reported)
        ]:
            del self._push_futures[index]
            self._reported.discard(index)
