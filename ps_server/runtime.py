"""One shard at run time: where engine work runs, under which locks, and what it may touch.

:class:`ShardRuntime` sits between the servicers (which only translate protos to
arrays and errors to statuses) and the engine's :class:`~ps_server.engine.Shard`. It
owns:

* **execution** — engine work (numpy) runs on a thread pool, never on the event loop.
  Once started, an engine call finishes even if its RPC is cancelled, and keeps its
  locks until then (:meth:`ShardRuntime.run`);
* **locks** (:class:`~ps_server.locks.ShardLocks`) — calls on one table are
  serialized by that table's lock, calls on different tables run side by side; a call
  that can count ids in a hash filter also holds the filter's lock (tables may share a
  filter); locks are taken in one global order, so multi-table calls cannot deadlock;
  creation and whole checkpoints hold the shard exclusively. The admin service and
  periodic eviction go through the same runtime, so they never interleave with data
  calls either;
* **exactly once** (:meth:`ShardRuntime.apply_once`) — a write with a request tag runs
  at most once per tag: its outcome is kept in the shard's
  :class:`~ps_server.ledger.RequestLedger` (recorded under the request's locks once the
  engine call ended, even if the RPC was cancelled meanwhile), and a repeat gets that
  outcome again without being applied; untagged writes are applied every time;
* **policy** — every save/restore path is confined to the data root
  (:func:`~ps_server.paths.resolve_path`); an answer larger than the message limit is
  refused with ``RESOURCE_EXHAUSTED`` naming the limit; filter defaults;
* **memory reuse** — the engine's scratch arrays freed by one call are kept by the
  C allocator for the next (:func:`keep_freed_memory`), instead of being handed back
  to the kernel and faulted in again page by page;
* **cluster identity** — the id of the cluster the shard belongs to (``--cluster_id``,
  or adopted from the first client through :meth:`ShardRuntime.join_cluster`); the
  engine knows only its index and count;
* **operations** — per-table and per-filter files, whole checkpoints (save, commit,
  restore or validate) and eviction, each reported to the :class:`ShardEvents`
  (readiness during restores, metrics, the admin Stats history).

It knows no gRPC and no service protos: errors leave it as
:class:`~ps_server.errors.ShardError`\\ s for :mod:`ps_server.status` to translate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from protos import contract
from ps_server.checkpoint import (
    checkpoints,
    entry_dump,
    filter_dump,
    monolith_export,
    table_files,
)
from ps_server.checkpoint.checkpoints import CheckpointResult
from ps_server.config import cluster_id_problem
from ps_server.engine import FilterOptions, Shard, ShardDescription
from ps_server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from ps_server.ledger import Outcome, RequestLedger
from ps_server.locks import ShardLocks
from ps_server.paths import DataRoot, resolve_path

__all__ = [
    "CheckpointOutcome",
    "CheckpointResult",
    "NO_EVENTS",
    "ShardEvents",
    "ShardRuntime",
    "TableEvicted",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class CheckpointOutcome:
    """One finished checkpoint operation, as reported to :class:`ShardEvents`.

    :param op: ``save`` | ``commit`` | ``restore`` | ``validate``.
    :param start_time: unix seconds when it started (after the locks were taken).
    :param seconds: how long it ran.
    :param result: what it did; None when it failed.
    :param nbytes: total size of ``result.files`` (0 when it failed).
    :param error: what failed (None when it succeeded).
    """

    op: str
    start_time: float
    seconds: float
    result: CheckpointResult | None
    nbytes: int
    error: BaseException | None


@dataclass(frozen=True)
class TableEvicted:
    """Outcome of evicting one table: entries deleted and entries left."""

    table: str
    evicted: int
    remaining: int


class ShardEvents(Protocol):
    """What the runtime reports besides its answers (``ps_server.lifecycle.ShardOps``)."""

    def restoring(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a restore changes the shard (readiness is NOT_SERVING)."""
        ...

    def checkpoint_done(self, outcome: CheckpointOutcome) -> None:
        """A checkpoint operation finished (successfully or not)."""
        ...

    def evicted(self, table: str, count: int, trigger: str) -> None:
        """``count`` expired entries were deleted from ``table`` (``trigger``:
        ``admin`` or ``periodic``)."""
        ...


class _NoEvents:
    """Events nobody listens to."""

    def restoring(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    def checkpoint_done(self, outcome: CheckpointOutcome) -> None:
        pass

    def evicted(self, table: str, count: int, trigger: str) -> None:
        pass


#: The events of a runtime nobody watches.
NO_EVENTS: Final[ShardEvents] = _NoEvents()

#: The recorded outcome of every write that answered nothing (they are all alike).
_DONE: Final = Outcome.succeeded(None)


def _files_size(files: Iterable[str]) -> int:
    total = 0
    for path in files:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_size
    return total


def _check_step(global_step: int) -> None:
    if global_step < 0:
        raise InvalidArgumentError(f"global_step must be >= 0, got {global_step}")


#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

#: Freed memory a glibc arena keeps before giving its top back to the kernel.
TRIM_THRESHOLD_BYTES: Final = 64 << 20

#: Allocations from this size on get pages of their own (glibc's largest setting on
#: 64-bit); smaller ones come from the arenas and are reused.
MMAP_THRESHOLD_BYTES: Final = 32 << 20

_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Let the C allocator keep the memory of freed engine arrays for reuse (glibc only;
    elsewhere nothing changes). Idempotent; returns whether glibc took the settings.

    Why: an engine call allocates and frees megabytes of scratch (gathered rows, the
    optimizer's float64 blocks). With glibc's defaults the worker thread's arena gives
    its free top back to the kernel (``madvise``) once it passes a threshold that
    adapts to the largest block freed so far, so a shard of a 4-shard cluster, whose
    calls are a quarter the size, faulted ~1,100 fresh pages back in on every
    65,536-id ``ApplyGradients`` (its 16,384-id share): 6 ms of engine CPU against
    10 ms for the whole batch on one shard (measured here). Fixed thresholds keep what a
    call frees for the next call; blocks of 32 MiB and more are still mapped and
    unmapped on their own, so a restore's big temporaries do not stay resident.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # gnu_get_libc_version exists in glibc only (musl's mallopt does nothing).
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    _allocator_tuned = ok
    return ok


class _Job(Generic[_T]):
    """One piece of engine work handed to the executor, answered on the event loop.

    Lighter than ``loop.run_in_executor`` plus ``asyncio.shield`` (one future instead
    of three chained ones, one callback per call): the worker thread runs ``work``
    and hands its result or exception to the loop, which sets :attr:`future` unless
    the caller was cancelled meanwhile, and marks the job ended either way.

    :param check: ``check(rpc, result)`` runs on the worker thread after ``work``
        when ``rpc`` is not None (the answer's size limit).
    """

    __slots__ = ("_check", "_ended", "_ended_waiter", "_loop", "_rpc", "_work", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[[], _T],
                 rpc: str | None, check: Callable[[str, object], None]) -> None:
        self._loop = loop
        self._work = work
        self._rpc = rpc
        self._check = check
        self._ended = False
        self._ended_waiter: asyncio.Future[None] | None = None
        self.future: asyncio.Future[_T] = loop.create_future()

    def run(self) -> None:
        """On the worker thread: run the work, hand its outcome to the loop."""
        try:
            result = self._work()
            if self._rpc is not None:
                self._check(self._rpc, result)
        except BaseException as e:  # handed to the awaiting coroutine, as an executor does
            self._hand_over(None, e)
            return
        self._hand_over(result, None)

    def _hand_over(self, result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._deliver, result, error)

    def _deliver(self, result: Any, error: BaseException | None) -> None:
        self._ended = True
        waiter = self._ended_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        future = self.future
        if future.cancelled():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    async def ended(self) -> None:
        """Return once the work ended, whatever cancellations arrive meanwhile."""
        if self._ended:
            return
        waiter = self._ended_waiter = self._loop.create_future()
        while not self._ended:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([waiter])


class ShardRuntime:
    """Execution, locks, exactly-once, paths and operations of one :class:`Shard`.

    :param shard: the state served.
    :param executor: where engine work runs (the caller owns and shuts it down).
    :param data_root: save/restore paths must resolve inside it ("" = any path).
    :param max_message_bytes: answers larger than this are refused with
        ``RESOURCE_EXHAUSTED`` naming the limit (instead of gRPC's generic failure).
    :param locks: the shard's locks; None: new ones.
    :param events: told about checkpoint operations and evictions (None: nobody).
    :param ledger: outcomes of recent tagged writes (None: a new one with the default
        limits).
    :param default_filter_capacity: sliding filter capacity when a creation leaves it 0.
    :param default_filter_split_num: split count when a creation leaves it 0.
    :param cluster_id: the cluster this shard belongs to ("" = none yet: the first
        :meth:`join_cluster` sets it).
    """

    def __init__(
        self,
        shard: Shard,
        executor: concurrent.futures.Executor,
        *,
        data_root: str = "",
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
        locks: ShardLocks | None = None,
        events: ShardEvents | None = None,
        ledger: RequestLedger | None = None,
        default_filter_capacity: int = contract.DEFAULT_FILTER_CAPACITY,
        default_filter_split_num: int = contract.DEFAULT_FILTER_SPLIT_NUM,
        cluster_id: str = "",
    ) -> None:
        problem = cluster_id_problem(cluster_id)
        if problem:
            raise InvalidArgumentError(f"cluster_id {problem}")
        keep_freed_memory()
        self.shard: Final = shard
        self.executor: Final = executor
        self.data_root: Final = data_root
        #: Confinement of every file the checkpoint code derives below a request's path.
        self.confinement: Final = DataRoot.of(data_root)
        self.max_message_bytes: Final = max_message_bytes
        self.locks: Final = locks if locks is not None else ShardLocks()
        self.events: ShardEvents = events if events is not None else NO_EVENTS
        self.ledger: Final = ledger if ledger is not None else RequestLedger()
        self.default_filter_capacity: Final = default_filter_capacity
        self.default_filter_split_num: Final = default_filter_split_num
        self._cluster_id = cluster_id

    # ---------------------------------------------------------------- execution

    async def run(
        self,
        rpc: str,
        work: Callable[[], _T],
        *,
        tables: Iterable[str] = (),
        table_filters: bool = False,
        filters: Iterable[str] = (),
        exclusive: bool = False,
    ) -> _T:
        """Run ``work`` on the executor holding the locks it needs.

        :param rpc: name used in errors (e.g. an oversized answer).
        :param tables: tables ``work`` touches (each must exist: ``UnknownTableError``).
        :param table_filters: also lock the hash filters of ``tables``.
        :param filters: hash filters ``work`` touches.
        :param exclusive: hold the whole shard (creation, whole checkpoints).
        """
        async with self.locks.hold(self.shard, tables=tables, table_filters=table_filters,
                                   filters=filters, exclusive=exclusive):
            return await self._execute(rpc, work)

    async def apply_once(
        self,
        rpc: str,
        client_id: str,
        seq: int,
        work: Callable[[], _T],
        *,
        tables: Iterable[str] = (),
        table_filters: bool = False,
        filters: Iterable[str] = (),
    ) -> tuple[_T, bool]:
        """:meth:`run` for a write: at most once per ``(client_id, seq)`` tag.

        An empty ``client_id`` or ``seq`` 0 means untagged: applied every time.

        :returns: ``(answer, replayed)``: ``replayed`` is True when the answer is the
            recorded one of an earlier request with the same tag (nothing was applied
            now). A recorded error is raised again instead.
        :raises InvalidArgumentError: the tag was used by another RPC, or its client id
            is too long.
        :raises FailedPreconditionError: the tag is older than its client's window.
        """
        if not client_id or not seq:
            return await self.run(rpc, work, tables=tables, table_filters=table_filters,
                                  filters=filters), False
        ledger = self.ledger
        first = await ledger.claim(client_id, seq, rpc)
        if first is not None:
            replayed: _T = first.replay()  # type: ignore[assignment]  # recorded by us
            return replayed, True
        ended: list[Outcome] = []  # set on the worker thread once the engine call ended

        def recorded() -> _T:
            try:
                result = work()
                self._check_size(rpc, result)
            except Exception as e:
                ended.append(Outcome.failed(e))
                raise
            ended.append(_DONE if result is None else Outcome.succeeded(result))
            return result

        try:
            async with self.locks.hold(self.shard, tables=tables,
                                       table_filters=table_filters, filters=filters):
                try:
                    return await self._execute(rpc, recorded, checked=False), False
                finally:
                    if ended:  # also when the RPC was cancelled meanwhile
                        ledger.record(client_id, seq, ended[0])
        finally:
            if not ended:  # refused before the engine ran (e.g. unknown table), cancelled
                ledger.release(client_id, seq)

    def _check_size(self, rpc: str, result: object) -> None:
        """Refuse an answer (encoded ``bytes`` or a message) over ``max_message_bytes``."""
        if isinstance(result, bytes):
            size = len(result)
        elif isinstance(result, Message):
            size = result.ByteSize()
        else:
            return
        if size > self.max_message_bytes:
            raise ResourceExhaustedError(
                f"{rpc}: the response would be {size} bytes, over the shard's "
                f"max_message_bytes={self.max_message_bytes}; ask for fewer ids per "
                "call or raise the limit on both ends"
            )

    async def _execute(self, rpc: str, work: Callable[[], _T], *, checked: bool = True) -> _T:
        job = _Job(asyncio.get_running_loop(), work, rpc if checked else None, self._check_size)
        self.executor.submit(job.run)
        try:
            return await job.future
        except asyncio.CancelledError:
            # The engine call cannot be interrupted: keep the locks until it is done.
            await job.ended()
            raise

    def path(self, path: str, what: str, *, prefix: bool = True) -> str:
        """``path`` resolved inside the data root (see :func:`~ps_server.paths.resolve_path`)."""
        return resolve_path(path, self.data_root, what, prefix=prefix)

    # ---------------------------------------------------------------- entry dumps

    def entry_dumps(self, table: str, ids: Any) -> list[bytes]:
        """Engine work (call inside :meth:`run`): each id's serialized ``EntryDump``
        (``b""`` if missing), as Monolith writes it."""
        return entry_dump.encode_selection(self.shard.select_entries(table, ids))

    def entry_dump_page(self, table: str, shard_idx: int, num_shards: int, limit: int,
                        offset: int) -> tuple[int, list[bytes]]:
        """Engine work (call inside :meth:`run`): the next cursor and a page of
        ``table``'s entries as serialized ``EntryDump``\\ s with ids."""
        cursor, selection = self.shard.entries_page(table, shard_idx, num_shards, limit,
                                                    offset)
        return cursor, entry_dump.encode_selection(selection)

    # ---------------------------------------------------------------- shard info

    async def describe(self) -> ShardDescription:
        """What the shard holds (a snapshot read without table locks)."""
        return await self.run("GetShardInfo", self.shard.describe)

    # ---------------------------------------------------------------- cluster identity

    @property
    def cluster_id(self) -> str:
        """The cluster this shard belongs to ("" = none yet)."""
        return self._cluster_id

    def join_cluster(self, cluster_id: str, shard_index: int, num_shards: int) -> bool:
        """Make this shard a member of ``cluster_id`` as shard ``shard_index`` of
        ``num_shards``: a shard without an id adopts it, the same id again is OK.

        Runs on the event loop (no engine work, nothing to lock).

        :returns: whether the id was adopted now.
        :raises InvalidArgumentError: an empty, unprintable or too long id.
        :raises FailedPreconditionError: the shard is another shard (index or count)
            or belongs to another cluster; the message names both.
        """
        problem = cluster_id_problem(cluster_id)
        if not cluster_id or problem:
            raise InvalidArgumentError(f"JoinCluster: cluster_id {problem or 'is empty'}")
        shard = self.shard
        mine = (self._cluster_id, shard.shard_index, shard.num_shards)
        if (shard_index, num_shards) != mine[1:] or self._cluster_id not in ("", cluster_id):
            here = f"cluster {self._cluster_id!r}" if self._cluster_id else "no cluster yet"
            raise FailedPreconditionError(
                f"JoinCluster asked this shard to be shard {shard_index} of {num_shards} of "
                f"cluster {cluster_id!r}, but it is shard {shard.shard_index} of "
                f"{shard.num_shards} of {here}; check the client's list of addresses"
            )
        if self._cluster_id:
            return False
        self._cluster_id = cluster_id
        _log.info("shard %d/%d joined cluster %r", shard.shard_index, shard.num_shards,
                  cluster_id)
        return True

    # ---------------------------------------------------------------- creation

    async def create_hash_filter(
        self,
        name: str,
        *,
        enable_hash_filter: bool,
        filter_type: str = "",
        occurrence_threshold_config: bytes = b"",
        capacity: int = 0,
        split_num: int = 0,
        equal_probability: bool = False,
    ) -> bool:
        """Create filter ``name`` (True) or find it with equal options (False).

        Empty ``filter_type`` and zero ``capacity`` / ``split_num`` take the defaults.
        """
        options = FilterOptions(
            enable_hash_filter=enable_hash_filter,
            filter_type=filter_type or contract.DEFAULT_FILTER_TYPE,
            occurrence_threshold_config=occurrence_threshold_config,
            capacity=capacity or self.default_filter_capacity,
            split_num=split_num or self.default_filter_split_num,
            equal_probability=equal_probability,
        )
        return await self.run(
            "CreateHashFilter", lambda: self.shard.create_hash_filter(name, options),
            exclusive=True,
        )

    async def create_table(
        self,
        name: str,
        config: bytes,
        *,
        hash_filter: str = "",
        extra_restore_names: Sequence[str] = (),
        saver_parallel: int = -1,
        allow_existing: bool = False,
        monolith_quirks: bool = False,
    ) -> bool:
        """Create table ``name`` (True), or find it with the same config when
        ``allow_existing`` (False)."""
        return await self.run(
            "CreateTable",
            lambda: self.shard.create_table(
                name, config, hash_filter=hash_filter,
                extra_restore_names=list(extra_restore_names),
                saver_parallel=saver_parallel, allow_existing=allow_existing,
                monolith_quirks=monolith_quirks,
            ),
            exclusive=True,
        )

    # ---------------------------------------------------------------- table and filter files

    async def save_table(self, table: str, basename: str) -> table_files.SaveResult:
        """Write ``table``'s part files ``<basename>_<shard>-…`` (inside the data root)."""
        path = self.path(basename, "basename")

        def work() -> table_files.SaveResult:
            slot = self.shard.table_slot(table)
            return table_files.save_table(slot.table, path, shard_index=self.shard.shard_index,
                                          nshards=slot.saver_parallel, root=self.confinement)

        return await self.run("SaveTable", work, tables=[table])

    async def restore_table(self, table: str, basename: str, *, validate_only: bool = False
                            ) -> table_files.RestoreResult:
        """Read every part file of ``basename`` into ``table``, keeping the ids this shard
        owns; all or nothing (``validate_only``: check, change nothing)."""
        path = self.path(basename, "basename")

        def work() -> table_files.RestoreResult:
            return table_files.restore_table(
                self.shard.table(table), path, shard_index=self.shard.shard_index,
                num_shards=self.shard.num_shards, validate_only=validate_only,
                root=self.confinement,
            )

        return await self.run("RestoreTable", work, tables=[table])

    async def save_filter(self, name: str, basename: str) -> list[str]:
        """Write hash filter ``name``'s files; return them."""
        path = self.path(basename, "basename")
        return await self.run(
            "SaveHashFilter",
            lambda: filter_dump.save_filter(self.shard.hash_filter(name).hash_filter, path,
                                            root=self.confinement),
            filters=[name],
        )

    async def restore_filter(self, name: str, basename: str, *, validate_only: bool = False
                             ) -> list[str]:
        """Read hash filter ``name``'s files (``validate_only``: check only); return them."""
        path = self.path(basename, "basename")

        def work() -> list[str]:
            flt = self.shard.hash_filter(name).hash_filter
            return filter_dump.restore_filter(flt, path, validate_only=validate_only,
                                              root=self.confinement) or []

        return await self.run("RestoreHashFilter", work, filters=[name])

    # ---------------------------------------------------------------- checkpoints

    async def _checkpoint(
        self, op: str, work: Callable[[], CheckpointResult], *, restoring: bool = False
    ) -> tuple[CheckpointResult, int]:
        """Run a whole-checkpoint ``work`` exclusively; report it to the events.

        :returns: ``(result, total bytes of its files)``.
        """
        events = self.events
        started = time.time()
        t0 = time.perf_counter()

        def measured() -> tuple[CheckpointResult, int]:
            result = work()
            return result, _files_size(result.files)

        async with events.restoring() if restoring else contextlib.nullcontext():
            try:
                result, nbytes = await self.run(op, measured, exclusive=True)
            except BaseException as e:
                events.checkpoint_done(CheckpointOutcome(
                    op, started, time.perf_counter() - t0, None, 0, e))
                raise
        events.checkpoint_done(CheckpointOutcome(
            op, started, time.perf_counter() - t0, result, nbytes, None))
        return result, nbytes

    async def save_checkpoint(self, model_dir: str, global_step: int
                              ) -> tuple[CheckpointResult, int]:
        """This shard's part of checkpoint ``global_step`` (see
        :func:`~ps_server.checkpoint.checkpoints.save_shard_checkpoint`).

        :returns: ``(result, bytes written)``.
        :raises InvalidArgumentError: empty ``model_dir`` or a negative step.
        :raises PathOutsideRootError: ``model_dir`` is outside the data root.
        """
        path = self.path(model_dir, "model_dir", prefix=False)
        _check_step(global_step)
        return await self._checkpoint(
            "save", lambda: checkpoints.save_shard_checkpoint(self.shard, path, global_step,
                                                              root=self.confinement))

    async def commit_checkpoint(
        self, model_dir: str, global_step: int, max_to_keep: int
    ) -> tuple[CheckpointResult, int]:
        """Manifest and ``checkpoint`` index of checkpoint ``global_step`` (see
        :func:`~ps_server.checkpoint.checkpoints.commit_checkpoint`).

        :raises InvalidArgumentError: empty ``model_dir``, a negative step or
            ``max_to_keep``.
        """
        path = self.path(model_dir, "model_dir", prefix=False)
        _check_step(global_step)
        return await self._checkpoint(
            "commit",
            lambda: checkpoints.commit_checkpoint(self.shard, path, global_step, max_to_keep,
                                                  root=self.confinement),
        )

    async def export_checkpoint(
        self, model_dir: str, global_step: int, layout: str, num_ps: int, *, commit: bool
    ) -> tuple[CheckpointResult, int]:
        """Export step ``global_step`` in Monolith's layout for ``num_ps`` parameter
        servers: this shard's files, or (``commit``) the check of every shard's files,
        ``model.ckpt-<step>.index`` and the ``checkpoint`` index (see
        :mod:`~ps_server.checkpoint.monolith_export`).

        :raises InvalidArgumentError: empty ``model_dir``, a negative step, an unknown
            layout or ``num_ps`` out of range.
        :raises FailedPreconditionError: the step holds a monolith-ps checkpoint; a
            SERVING table; (commit) a shard's or parameter server's files are missing.
        :raises PathOutsideRootError: ``model_dir`` is outside the data root.
        """
        path = self.path(model_dir, "model_dir", prefix=False)
        _check_step(global_step)
        monolith_export.check_request(layout, num_ps)
        write = monolith_export.commit_export if commit else monolith_export.export_shard
        return await self._checkpoint(
            "export-commit" if commit else "export",
            lambda: write(self.shard, path, global_step, layout=layout, num_ps=num_ps,
                          root=self.confinement),
        )

    async def restore_checkpoint(
        self, model_dir: str, prefix: str, validate_only: bool, *, reset_filters: bool = False
    ) -> tuple[CheckpointResult, int]:
        """Restore (or validate) a checkpoint into this shard, all or nothing (see
        :func:`~ps_server.checkpoint.checkpoints.restore_shard_checkpoint`).

        While a real restore runs, :meth:`ShardEvents.restoring` is held.

        :param prefix: ``""`` = the latest.
        :param reset_filters: a checkpoint of another shard count restores with its
            file-saving filters emptied (logged at WARNING, naming them) instead of
            being refused.
        :returns: ``(result, bytes read)``; the result's prefix is ``""`` when
            ``model_dir`` holds no checkpoint.
        """
        path = self.path(model_dir, "model_dir", prefix=False)
        if prefix and not os.path.dirname(prefix):
            # A bare model.ckpt-<step> lies in model_dir (as the checkpoint code takes
            # it), not at the top of the data root.
            prefix = os.path.join(model_dir, prefix)
        resolved = self.path(prefix, "prefix") if prefix else None

        def work() -> CheckpointResult:
            target = resolved
            if target is None and self.data_root:
                # The index is just a file: the checkpoint it names must be in the root too.
                latest = checkpoints.latest_checkpoint(path, root=self.confinement)
                if latest is not None:
                    target = self.path(latest, f"the latest checkpoint of {model_dir!r}")
            return checkpoints.restore_shard_checkpoint(self.shard, path, target, validate_only,
                                                        root=self.confinement,
                                                        reset_filters=reset_filters)

        op = "validate" if validate_only else "restore"
        result, nbytes = await self._checkpoint(op, work, restoring=not validate_only)
        if result.reset_filters and not validate_only:
            _log.warning(
                "restored %s into shard %d of %d with hash filter(s) %s reset to empty: "
                "their state was saved by another shard count and cannot move to the new "
                "owner shards (reset_filters)", result.prefix, self.shard.shard_index,
                self.shard.num_shards, ", ".join(map(repr, result.reset_filters)))
        return result, nbytes

    # ---------------------------------------------------------------- eviction

    async def evict(self, tables: Sequence[str] | None, trigger: str) -> list[TableEvicted]:
        """Delete the expired entries of ``tables`` (None: every table) now.

        Expiry follows each table's ``slot_expire_time_config`` against its own clock,
        whatever its ``enable_feature_eviction`` says (that only schedules periodic
        runs). Each table is evicted under its own lock, one after the other.

        :param trigger: ``admin`` or ``periodic`` (reported to the events).
        :raises UnknownTableError: a named table does not exist (nothing evicted).
        """
        if tables is None:
            names = sorted(self.shard.tables)
        else:
            names = list(tables)
            for name in names:
                self.shard.table_slot(name)
        out: list[TableEvicted] = []
        for name in names:
            def work(name: str = name) -> TableEvicted:
                return TableEvicted(name, *self.shard.evict_expired(name))

            try:
                done = await self.run("Evict", work, tables=[name])
            except NotFoundError:
                if tables is None:
                    continue  # dropped meanwhile (a failed restore's rollback)
                raise
            if done.evicted:
                _log.info("evicted %d expired entries of table %r (%s)",
                          done.evicted, name, trigger)
            self.events.evicted(name, done.evicted, trigger)
            out.append(done)
        return out
