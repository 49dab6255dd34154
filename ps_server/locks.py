"""The locks of one shard, shared by every service that touches its tables.

One :class:`ShardLocks` per shard process: the data-plane service
(:mod:`ps_server.service`), the admin service (:mod:`ps_server.admin`) and periodic
eviction (:mod:`ps_server.server`) all take their locks here, so an admin restore
and a data RPC can never interleave.

* The *gate* (:class:`SharedExclusiveLock`): per-table work holds it shared;
  creating tables or filters and whole-checkpoint save/restore hold it exclusively.
* One ``asyncio.Lock`` per table and per hash filter, taken (inside the shared gate)
  in one global order, so multi-table calls cannot deadlock.

Everything runs on the server's event loop; the engine work itself runs on the
executor while the locks are held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable

from ps_server.engine import Shard

__all__ = ["SharedExclusiveLock", "ShardLocks"]


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder, on one event loop.

    A waiting exclusive holder stops new shared holders from entering, so it
    cannot starve. Release never awaits, so cancellation cannot leak a hold.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _shared_may_enter(self) -> bool:
        return not self._exclusive and not self._exclusive_waiting

    async def acquire_shared(self) -> None:
        """Enter as a shared holder (pair with :meth:`release_shared`). Uncontended,
        this returns without suspending."""
        if not self._shared_may_enter():
            await self._wait_until(self._shared_may_enter)
        self._shared += 1

    def release_shared(self) -> None:
        """Leave as a shared holder."""
        self._shared -= 1
        if not self._shared:
            self._wake()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._exclusive_waiting += 1
        try:
            await self._wait_until(lambda: not self._exclusive and not self._shared)
        finally:
            self._exclusive_waiting -= 1
            self._wake()
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._wake()


class ShardLocks:
    """The gate and the per-table / per-filter locks of one shard."""

    def __init__(self) -> None:
        self._gate = SharedExclusiveLock()
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    def hold(
        self,
        shard: Shard,
        *,
        tables: Iterable[str] = (),
        table_filters: bool = False,
        filters: Iterable[str] = (),
        exclusive: bool = False,
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold what a piece of work on ``shard`` needs, for the ``async with`` body.

        :param tables: tables the work touches (each must exist).
        :param table_filters: also lock the hash filters of ``tables``.
        :param filters: hash filters the work touches (each must exist).
        :param exclusive: hold the whole shard instead (creation, whole checkpoints).
        :raises UnknownTableError, UnknownFilterError: a named table or filter does not
            exist (checked inside the gate, so a concurrent creation is seen).
        """
        if exclusive:
            return self._gate.exclusive()
        return _Held(self, shard, tables, table_filters, filters)


class _Held:
    """The shared gate plus the table and filter locks of one piece of work, as an
    async context manager (a plain class: every data call takes one, and a generator
    based one costs several times more; uncontended, entering never suspends)."""

    __slots__ = ("_filters", "_held", "_locks", "_shard", "_table_filters", "_tables")

    def __init__(self, locks: ShardLocks, shard: Shard, tables: Iterable[str],
                 table_filters: bool, filters: Iterable[str]) -> None:
        self._locks = locks
        self._shard = shard
        self._tables = tables
        self._table_filters = table_filters
        self._filters = filters
        self._held: list[asyncio.Lock] = []

    def _keys(self) -> list[tuple[str, str]]:
        shard = self._shard
        keys: set[tuple[str, str]] = set()
        for name in self._tables:
            slot = shard.table_slot(name)
            keys.add(("table", name))
            if self._table_filters and slot.hash_filter:
                keys.add(("filter", slot.hash_filter))
        for name in self._filters:
            shard.hash_filter(name)
            keys.add(("filter", name))
        return sorted(keys)

    async def __aenter__(self) -> None:
        gate = self._locks._gate
        await gate.acquire_shared()
        held = self._held
        try:
            locks = self._locks._locks
            for key in self._keys():
                lock = locks[key]
                await lock.acquire()
                held.append(lock)
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        held = self._held
        while held:
            held.pop().release()
        self._locks._gate.release_shared()
