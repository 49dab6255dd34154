"""Request guards: interceptors that refuse a call before it reaches a servicer.

In the order the server installs them (after metrics and the token check):

* :class:`DrainGate` — once an operator drained the shard, new data-plane calls get
  ``UNAVAILABLE``; running ones are counted so a drain can wait for them.
* :class:`MalformedRequestGuard` — request bytes that do not parse get
  ``INVALID_ARGUMENT`` naming the method (gRPC itself would say ``UNKNOWN``).
* :class:`BatchLimitGuard` — a bulk request with more ids than
  ``--max_ids_per_request`` gets ``RESOURCE_EXHAUSTED`` before it is decoded or any
  lock is taken.

A refused call changes nothing and the shard keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import grpc
from google.protobuf.message import DecodeError

from protos import contract
from ps_server import codec
from ps_server.interception import WrappingInterceptor
from ps_server.status import abort, internal_error

__all__ = ["BatchLimitGuard", "DrainGate", "MalformedRequestGuard"]

_log = logging.getLogger(__name__)

_DATA_PREFIX: Final = f"/{contract.DATA_SERVICE.full_name}/"
_INT64_BYTES: Final = 8

_Handler = Callable[[Any, Any], Awaitable[Any]]


class Admission(Protocol):
    """Who decides whether a data-plane call may start (``ps_server.lifecycle.ShardOps``)."""

    def try_enter(self) -> bool:
        """Admit one call (False: refuse it); pair with :meth:`leave`."""
        ...

    def leave(self) -> None:
        """An admitted call finished."""
        ...

    def refusal(self) -> str:
        """Why calls are refused."""
        ...


class DrainGate(WrappingInterceptor):
    """Counts running ``monolith_ps.ParameterServer`` calls and refuses new ones with
    ``UNAVAILABLE`` while ``admission`` says no (other services pass)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self._admission = admission

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None or not method.startswith(_DATA_PREFIX):
            return handler
        inner: _Handler = handler.unary_unary
        admission = self._admission

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not admission.try_enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, admission.refusal())
            try:
                return await inner(request, context)
            finally:
                admission.leave()

        return grpc.unary_unary_rpc_method_handler(
            gated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Unparsable:
    """Stands for request bytes that did not parse (deserializers must not raise)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestGuard(WrappingInterceptor):
    """Request bytes that do not parse get ``INVALID_ARGUMENT`` naming the message.

    gRPC answers a deserializer's exception with ``UNKNOWN``; here the deserializer
    of every unary method is wrapped so it never raises, and the call is refused
    before the servicer runs. A parser bug (anything but ``DecodeError``) is logged
    and answered ``INTERNAL``, as :func:`~ps_server.status.translate_errors` does.
    """

    def wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        inner = handler.unary_unary
        method = full_method.rsplit("/", 1)[-1]

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # handed to ``guarded``: gRPC would say UNKNOWN
                return _Unparsable(e)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                error = request.error
                if not isinstance(error, DecodeError):
                    _log.error("%s: request parser failed", method, exc_info=error)
                    await abort(context, grpc.StatusCode.INTERNAL, internal_error(method))
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request is not a valid protobuf message of "
                            f"the method's request type ({error}); "
                            "check the client's protos")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


class BatchLimitGuard(WrappingInterceptor):
    """Refuses bulk data-plane requests (:data:`protos.contract.BULK_RPCS`) whose
    ``ids`` tensor holds more than ``max_ids`` ids, with ``RESOURCE_EXHAUSTED``.

    Must come after :class:`MalformedRequestGuard` (it reads the parsed
    :class:`~ps_server.codec.BulkRequest`).

    :param max_ids: the limit (> 0).
    :raises ValueError: ``max_ids`` < 1.
    """

    def __init__(self, max_ids: int) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        super().__init__()
        self._max_ids = max_ids

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rpc = method[len(_DATA_PREFIX):]
        if (
            handler.unary_unary is None
            or not method.startswith(_DATA_PREFIX)
            or rpc not in contract.BULK_RPCS
        ):
            return handler
        inner = handler.unary_unary
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
