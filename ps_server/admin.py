"""The ops plane of a shard: ``monolith_ps.ParameterServerAdmin``, a thin translator.

One shard per call; ``ps-admin`` (:mod:`ps_server.admin_cli`) and ``PsClient``'s
checkpoint methods fan out to every shard. The RPCs:

* ``SaveCheckpoint`` / ``CommitCheckpoint``: this shard's part of a whole checkpoint,
  then (on one shard, after every shard saved) the manifest and the ``checkpoint``
  index.
* ``RestoreCheckpoint``: validate or restore a checkpoint, all or nothing on this
  shard, creating missing tables from the manifest and keeping the ids this shard owns
  (any saving shard count). Readiness is ``NOT_SERVING`` while it runs. No checkpoint
  is ``NOT_FOUND``, or an empty prefix with ``missing_ok``. Filter state saved by
  another shard count is ``FAILED_PRECONDITION`` unless ``reset_filters`` (then those
  filters start empty and the response's ``reset_filters`` names them).

* ``ExportCheckpoint``: this shard's part of an export to Monolith's layout for a
  given parameter-server count, or (``commit``, on one shard after every shard) the
  ``.index`` and ``checkpoint`` files that make TensorFlow's ``latest_checkpoint``
  find it (:mod:`ps_server.checkpoint.monolith_export`).

These four take the data-plane token too (trainers checkpoint); the rest need the
admin token (:mod:`ps_server.security`).
* ``Evict``: delete expired entries now.
* ``Stats``: the shard's identity (index, count, cluster id), sizes, filters, last
  save/restore, state, uptime.
* ``Drain``: readiness ``NOT_SERVING``, new data-plane calls refused with
  ``UNAVAILABLE``, running ones waited for. Lasts until the process exits.

The operations run in the shard's :class:`~ps_server.runtime.ShardRuntime` (the same
locks, path policy and events as the data plane); the operational state (readiness,
drain, history) is the shard's :class:`~ps_server.lifecycle.ShardOps`. Errors become
statuses in :func:`~ps_server.status.translate_errors`.
"""

from __future__ import annotations

import time
from typing import Any, Final

import ps_server
from protos import contract
from protos import ps_service_pb2 as ps_pb2
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.errors import CheckpointNotFoundError, InvalidArgumentError
from ps_server.lifecycle import ShardOps
from ps_server.runtime import CheckpointOutcome, CheckpointResult, ShardRuntime
from ps_server.status import translate_errors

__all__ = ["ADMIN_SERVICE_NAME", "AdminServicer"]

#: Full name of the admin service.
ADMIN_SERVICE_NAME: Final = contract.ADMIN_SERVICE.full_name


def _checkpoint_response(result: CheckpointResult, nbytes: int, seconds: float
                         ) -> ps_pb2.AdminCheckpointResponse:
    return ps_pb2.AdminCheckpointResponse(
        prefix=result.prefix, files=result.files, entries=result.entries, bytes=nbytes,
        tables=result.tables, duration_seconds=seconds, reset_filters=result.reset_filters,
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
    """``monolith_ps.ParameterServerAdmin`` over a shard's runtime and operational state.

    :param runtime: the shard's :class:`~ps_server.runtime.ShardRuntime`.
    :param ops: the shard's :class:`~ps_server.lifecycle.ShardOps` (the runtime's events).
    :param grace_seconds: Drain's wait when the request leaves it 0.
    """

    def __init__(self, runtime: ShardRuntime, ops: ShardOps, *,
                 grace_seconds: float = 20.0) -> None:
        self._runtime = runtime
        self._ops = ops
        self._grace_seconds = grace_seconds

    @translate_errors
    async def SaveCheckpoint(self, request: ps_pb2.AdminSaveRequest, context: Any
                             ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._runtime.save_checkpoint(request.model_dir, request.global_step)
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def CommitCheckpoint(self, request: ps_pb2.AdminSaveRequest, context: Any
                               ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._runtime.commit_checkpoint(
            request.model_dir, request.global_step, request.max_to_keep
        )
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def RestoreCheckpoint(self, request: ps_pb2.AdminRestoreRequest, context: Any
                                ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._runtime.restore_checkpoint(
            request.model_dir, request.prefix, request.validate_only,
            reset_filters=request.reset_filters,
        )
        if not result.prefix and not request.missing_ok:
            raise CheckpointNotFoundError(
                f"no checkpoint in {request.model_dir!r}: no `checkpoint` index names one "
                "and there is not exactly one model.ckpt-<step>.assets directory; nothing "
                "was restored"
            )
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def ExportCheckpoint(self, request: ps_pb2.AdminExportRequest, context: Any
                               ) -> ps_pb2.AdminCheckpointResponse:
        t0 = time.perf_counter()
        result, nbytes = await self._runtime.export_checkpoint(
            request.model_dir, request.global_step, request.layout, request.num_ps,
            commit=request.commit,
        )
        return _checkpoint_response(result, nbytes, time.perf_counter() - t0)

    @translate_errors
    async def Evict(self, request: ps_pb2.EvictRequest, context: Any
                    ) -> ps_pb2.EvictResponse:
        done = await self._runtime.evict([request.table] if request.table else None, "admin")
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
        described = self._runtime.shard.describe()
        return ps_pb2.StatsResponse(
            shard_index=described.shard_index,
            num_shards=described.num_shards,
            version=ps_server.__version__,
            cluster_id=self._runtime.cluster_id,
            uptime_seconds=time.time() - ops.started,
            state=ops.state,
            in_flight=ops.in_flight,
            last_save=_record(ops.last.get("save")),
            last_restore=_record(ops.last.get("restore")),
            entries=described.entries,
            memory_bytes=described.memory_bytes,
            tables=[
                ps_pb2.TableStats(
                    name=t.name, entries=t.size, memory_bytes=t.memory_bytes, dim_size=t.dim,
                    hash_filter=t.hash_filter, max_update_ts=t.max_update_ts,
                    feature_eviction=t.feature_eviction,
                    evicted_entries=ops.evicted_entries.get(t.name, 0),
                )
                for t in described.tables
            ],
            hash_filters=[
                ps_pb2.HashFilterStats(
                    name=f.name, filter_type=f.filter_type, enabled=f.enabled,
                    fill_ratio=f.fill_ratio, failure_count=f.failure_count,
                    capacity=f.capacity,
                )
                for f in described.filters
            ],
        )

    @translate_errors
    async def Drain(self, request: ps_pb2.DrainRequest, context: Any) -> ps_pb2.DrainResponse:
        grace = request.grace_seconds
        if not grace >= 0:  # NaN too
            raise InvalidArgumentError(
                f"grace_seconds must be >= 0 (0 = the shard's --grace_seconds), got {grace}"
            )
        in_flight, waited = await self._ops.drain(grace or self._grace_seconds)
        return ps_pb2.DrainResponse(in_flight=in_flight, waited_seconds=waited)
