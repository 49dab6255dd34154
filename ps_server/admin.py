"""The ops side of a shard: the ``monolith_ps.ParameterServerAdmin`` service.

One shard per call; ``ps-admin`` (:mod:`ps_server.admin_cli`) fans out to every
shard. The RPCs:

* ``Save`` / ``Commit``: this shard's part of a checkpoint, then (on one shard,
  after every shard saved) the manifest and the ``checkpoint`` index.
* ``Restore``: validate or restore a checkpoint, all or nothing on this shard,
  creating missing tables from the manifest and keeping the ids this shard owns
  (any saving shard count). Readiness is ``NOT_SERVING`` while it runs.
* ``Evict``: delete expired entries now.
* ``Stats``: sizes, filters, last save/restore, state, uptime.
* ``Drain``: readiness ``NOT_SERVING``, new data-plane calls refused with
  ``UNAVAILABLE``, running ones waited for. Lasts until the process exits.

It shares the data-plane servicer's locks (an admin restore never interleaves
with a data RPC), path checks (``data_root``) and error mapping
(:func:`ps_server.service.translate_errors`).

Health. The server's ``""`` service stays ``SERVING`` while the process lives
(liveness); ``monolith_ps.ParameterServer`` is the readiness signal: ``NOT_SERVING``
while a restore runs, after a Drain, and once shutdown begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2

import ps_server
from protos import ps_service_pb2 as ps_pb2
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.engine.shard import Shard
from ps_server.errors import CheckpointNotFoundError, InvalidArgumentError
from ps_server.interception import WrappingInterceptor
from ps_server.metrics import ShardMetrics
from ps_server.service import (
    SERVICE_NAME,
    CheckpointOutcome,
    ParameterServerServicer,
    filter_stats,
    translate_errors,
)

__all__ = ["ADMIN_SERVICE_NAME", "AdminServicer", "DataPlaneGate", "ShardOps"]

_log = logging.getLogger(__name__)

#: Full name of the admin service.
ADMIN_SERVICE_NAME: Final = ps_pb2.DESCRIPTOR.services_by_name["ParameterServerAdmin"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ShardOps:
    """Operational state of one shard: readiness, the drain gate, recent operations.

    Implements :class:`ps_server.service.ShardEvents` for the data-plane servicer.
    Lives on the server's event loop.

    :param shard: the shard (its index appears in messages).
    :param health: the ``grpc_health.v1.health.aio.HealthServicer`` to drive.
    :param metrics: updated on every event (None: no metrics).
    """

    def __init__(self, shard: Shard, health: Any, *, metrics: ShardMetrics | None = None
                 ) -> None:
        self.shard = shard
        self._health = health
        self._metrics = metrics
        self.started = time.time()
        self.draining = False
        self.drained_at = 0.0
        self._restoring = 0
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The last outcome of each checkpoint op (``save``, ``commit``, ``restore``,
        #: ``validate``), failures included.
        self.last: dict[str, CheckpointOutcome] = {}
        #: Entries evicted per table since start.
        self.evicted_entries: defaultdict[str, int] = defaultdict(int)

    # ---------------------------------------------------------------- readiness

    @property
    def restoring_now(self) -> bool:
        """Whether a restore is running."""
        return self._restoring > 0

    @property
    def state(self) -> str:
        """``DRAINING``, ``RESTORING`` or ``SERVING``."""
        if self.draining:
            return "DRAINING"
        return "RESTORING" if self._restoring else "SERVING"

    async def publish(self) -> None:
        """Set the health of the ParameterServer service from the state (``""`` and the
        admin service stay SERVING). Ignored once graceful shutdown began."""
        status = SERVING if self.state == "SERVING" else NOT_SERVING
        await self._health.set(SERVICE_NAME, status)
        if self._metrics is not None:
            self._metrics.set_state(restoring=self.restoring_now, draining=self.draining)

    @contextlib.asynccontextmanager
    async def restoring(self) -> AsyncIterator[None]:
        """Readiness NOT_SERVING for the body (restores may nest or overlap)."""
        self._restoring += 1
        await self.publish()
        try:
            yield
        finally:
            self._restoring -= 1
            # Shielded: a cancelled restore RPC must still put readiness back.
            await asyncio.shield(self.publish())

    # ---------------------------------------------------------------- events

    def checkpoint_done(self, outcome: CheckpointOutcome) -> None:
        result = outcome.result
        if outcome.error is None and result is not None and not result.prefix:
            return  # a restore that found no checkpoint did nothing
        self.last[outcome.op] = outcome
        if outcome.error is None:
            _log.info(
                "%s %s: %d entries, %d bytes in %.3fs", outcome.op,
                getattr(result, "prefix", ""), getattr(result, "entries", 0),
                outcome.nbytes, outcome.seconds,
            )
        else:
            _log.warning("%s failed after %.3fs: %s", outcome.op, outcome.seconds,
                         outcome.error)
        if self._metrics is not None:
            self._metrics.observe_checkpoint(
                outcome.op, seconds=outcome.seconds, nbytes=outcome.nbytes,
                entries=int(getattr(result, "entries", 0)), ok=outcome.error is None,
            )

    def evicted(self, table: str, count: int, trigger: str) -> None:
        self.evicted_entries[table] += count
        if self._metrics is not None:
            self._metrics.observe_eviction(table, trigger, count)

    # ---------------------------------------------------------------- drain gate

    def try_enter(self) -> bool:
        """Admit one data-plane call (False once draining); pair with :meth:`leave`."""
        if self.draining:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        """A call admitted by :meth:`try_enter` finished."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def refusal(self) -> str:
        """Why a data-plane call is refused while draining."""
        shard = self.shard
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.drained_at))
        return (
            f"shard {shard.shard_index} of {shard.num_shards} was drained by an operator at "
            f"{when} and accepts no more data-plane calls; it serves again only after a "
            "restart"
        )

    async def drain(self, grace_seconds: float) -> tuple[int, float]:
        """Refuse new data-plane calls, readiness NOT_SERVING, wait for running calls.

        New calls are refused from the start, so the running ones are the last.

        :returns: ``(calls still running when the wait ended, seconds waited)``.
        """
        t0 = time.perf_counter()
        if not self.draining:
            self.draining = True
            self.drained_at = time.time()
            _log.warning("draining: refusing new data-plane calls, %d in flight",
                         self.in_flight)
        await self.publish()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_seconds)
        return self.in_flight, time.perf_counter() - t0


_Handler = Callable[[Any, Any], Awaitable[Any]]


class DataPlaneGate(WrappingInterceptor):
    """Counts running ``monolith_ps.ParameterServer`` calls and, once the shard is
    draining, refuses new ones with ``UNAVAILABLE`` (other services pass)."""

    def __init__(self, ops: ShardOps) -> None:
        super().__init__()
        self._ops = ops
        self._prefix = f"/{SERVICE_NAME}/"

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None or not method.startswith(self._prefix):
            return handler
        inner: _Handler = handler.unary_unary
        ops = self._ops

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not ops.try_enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, ops.refusal())
            try:
                return await inner(request, context)
            finally:
                ops.leave()

        return grpc.unary_unary_rpc_method_handler(
            gated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _checkpoint_response(result: Any, nbytes: int, seconds: float
                         ) -> ps_pb2.AdminCheckpointResponse:
    return ps_pb2.AdminCheckpointResponse(
        prefix=result.prefix, files=result.files, entries=result.entries, bytes=nbytes,
        tables=result.tables, duration_seconds=seconds,
    )


def _record(outcome: CheckpointOutcome | None) -> ps_pb2.OperationRecord | None:
    if outcome is None:
        return None
    result = outcome.result
    return ps_pb2.OperationRecord(
        op=outcome.op,
        start_time=outcome.start_time,
        duration_seconds=outcome.seconds,
        prefix=getattr(result, "prefix", ""),
        entries=int(getattr(result, "entries", 0)),
        bytes=outcome.nbytes,
        error="" if outcome.error is None else str(outcome.error) or type(outcome.error).__name__,
    )


class AdminServicer(ps_grpc.ParameterServerAdminServicer):
    """``monolith_ps.ParameterServerAdmin`` over the data-plane servicer of the shard.

    :param data: the shard's ParameterServer servicer (its locks, paths, checkpoint
        and eviction operations are reused).
    :param ops: the shard's :class:`ShardOps` (also given to ``data`` as its events).
    :param grace_seconds: Drain's wait when the request leaves it 0.
    """

    def __init__(self, data: ParameterServerServicer, ops: ShardOps, *,
                 grace_seconds: float = 20.0) -> None:
        self._data = data
        self._ops = ops
        self._grace_seconds = grace_seconds

    @translate_errors
    async def Save(self, request: ps_pb2.AdminSaveRequest, context: Any
                   ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._data.save_checkpoint(request.model_dir, request.global_step)
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def Commit(self, request: ps_pb2.AdminSaveRequest, context: Any
                     ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._data.commit_checkpoint(
            request.model_dir, request.global_step, request.max_to_keep
        )
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def Restore(self, request: ps_pb2.AdminRestoreRequest, context: Any
                      ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._data.restore_checkpoint(
            request.model_dir, request.prefix, request.validate_only
        )
        if not result.prefix:
            raise CheckpointNotFoundError(
                f"no checkpoint in {request.model_dir!r}: no `checkpoint` index names one "
                "and there is not exactly one model.ckpt-<step>.assets directory; nothing "
                "was restored"
            )
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def Evict(self, request: ps_pb2.EvictRequest, context: Any
                    ) -> ps_pb2.EvictResponse:
        done = await self._data.evict([request.table] if request.table else None, "admin")
        return ps_pb2.EvictResponse(
            tables=[
                ps_pb2.TableEviction(table=d.table, evicted=d.evicted, remaining=d.remaining)
                for d in done
            ],
            evicted=sum(d.evicted for d in done),
        )

    @translate_errors
    async def Stats(self, request: ps_pb2.StatsRequest, context: Any) -> ps_pb2.StatsResponse:
        # On the loop, without locks: answers even while a restore holds the shard.
        # Sizes are single reads; a snapshot that may race concurrent writes.
        ops = self._ops
        shard = self._data.shard
        response = ps_pb2.StatsResponse(
            shard_index=shard.shard_index,
            num_shards=shard.num_shards,
            version=ps_server.__version__,
            uptime_seconds=time.time() - ops.started,
            state=ops.state,
            in_flight=ops.in_flight,
            last_save=_record(ops.last.get("save")),
            last_restore=_record(ops.last.get("restore")),
        )
        for name, slot in sorted(list(shard.tables.items())):
            table = slot.table
            stats = ps_pb2.TableStats(
                name=name,
                entries=table.size(),
                memory_bytes=table.nbytes(),
                dim_size=table.dim,
                hash_filter=slot.hash_filter,
                max_update_ts=table.max_update_ts,
                feature_eviction=table.config.enable_feature_eviction,
                evicted_entries=ops.evicted_entries.get(name, 0),
            )
            response.tables.append(stats)
            response.entries += stats.entries
            response.memory_bytes += stats.memory_bytes
        for name, fslot in sorted(list(shard.filters.items())):
            fill, failures, capacity = filter_stats(fslot.hash_filter)
            response.hash_filters.append(ps_pb2.HashFilterStats(
                name=name,
                filter_type=fslot.options.filter_type,
                enabled=fslot.options.enable_hash_filter,
                fill_ratio=fill,
                failure_count=failures,
                capacity=capacity,
            ))
        return response

    @translate_errors
    async def Drain(self, request: ps_pb2.DrainRequest, context: Any) -> ps_pb2.DrainResponse:
        grace = request.grace_seconds
        if not grace >= 0:  # NaN too
            raise InvalidArgumentError(
                f"grace_seconds must be >= 0 (0 = the shard's --grace_seconds), got {grace}"
            )
        in_flight, waited = await self._ops.drain(grace or self._grace_seconds)
        return ps_pb2.DrainResponse(in_flight=in_flight, waited_seconds=waited)
