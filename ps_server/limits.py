"""Limits of one shard: ids per request here, entries and bytes per shard in the engine.

* ``max_ids_per_request``: :class:`BatchLimitGuard` refuses a data-plane request
  carrying more ids with ``RESOURCE_EXHAUSTED`` before it is decoded or any lock is
  taken. (Bytes per request are capped by gRPC's ``max_message_bytes``.)
* ``max_entries_per_shard`` / ``max_bytes_per_shard``:
  :class:`~ps_server.engine.shard.ShardLimits`, checked by the tables before a write
  inserts anything (:func:`shard_limits` builds them from the config).

A refused call changes nothing and the shard keeps serving.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from ps_server import codec
from ps_server.config import ServerConfig
from ps_server.engine.shard import ShardLimits
from ps_server.interception import WrappingInterceptor
from ps_server.service import BULK_RPCS, SERVICE_NAME

__all__ = ["BatchLimitGuard", "shard_limits"]

_INT64_BYTES: Final = 8


def shard_limits(config: ServerConfig) -> ShardLimits:
    """The per-shard limits ``config`` sets."""
    return ShardLimits(
        max_entries_per_shard=config.max_entries_per_shard,
        max_bytes_per_shard=config.max_bytes_per_shard,
    )


class BatchLimitGuard(WrappingInterceptor):
    """Refuses bulk data-plane requests (:data:`~ps_server.service.BULK_RPCS`) whose
    ``ids`` tensor holds more than ``max_ids`` ids, with ``RESOURCE_EXHAUSTED``.

    Must come after :class:`~ps_server.service.MalformedRequestGuard` in the
    server's interceptors (it reads the parsed :class:`~ps_server.codec.BulkRequest`).

    :param max_ids: the limit (> 0).
    :raises ValueError: ``max_ids`` < 1.
    """

    def __init__(self, max_ids: int) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        super().__init__()
        self._max_ids = max_ids
        self._prefix = f"/{SERVICE_NAME}/"

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if (
            handler.unary_unary is None
            or not method.startswith(self._prefix)
            or method[len(self._prefix):] not in BULK_RPCS
        ):
            return handler
        inner = handler.unary_unary
        rpc = method[len(self._prefix):]
        limit = self._max_ids

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, codec.BulkRequest):
                n = len(request.tensor("ids").data) // _INT64_BYTES
                if n > limit:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{rpc}: {n:,} ids in one request, above the shard's "
                        f"max_ids_per_request={limit:,}; nothing was changed. Send the "
                        "ids in smaller batches",
                    )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
