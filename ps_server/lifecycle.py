"""A shard's operational state: readiness, the drain gate and recent operations.

Health. The server's ``""`` service stays ``SERVING`` while the process lives
(liveness); ``monolith_ps.ParameterServer`` is the readiness signal: ``NOT_SERVING``
while a restore runs, after a Drain, and once shutdown begins. :class:`ShardOps`
drives it, counts running data-plane calls for a drain, and keeps the last outcome of
each checkpoint operation and the evictions (for the admin Stats and the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2

from protos import contract
from ps_server.engine import Shard
from ps_server.metrics import ShardMetrics
from ps_server.runtime import CheckpointOutcome

__all__ = ["ShardOps"]

_log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_READINESS_SERVICE = contract.DATA_SERVICE.full_name


class ShardOps:
    """Operational state of one shard: readiness, the drain gate, recent operations.

    Implements :class:`ps_server.runtime.ShardEvents` for the runtime and the admission
    of :class:`ps_server.guards.DrainGate`.
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
        await self._health.set(_READINESS_SERVICE, status)
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
