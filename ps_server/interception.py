"""Server interceptors that wrap a method's handler, each handler wrapped once.

grpc.aio asks every interceptor for the handler of every call. The shard's wrapping
interceptors (RPC metrics, the drain gate, the request guards) would build the same
closures and a new ``RpcMethodHandler`` for the same method on each call;
:class:`WrappingInterceptor` keeps the wrapper built for a method's handler and hands
it out again while that method's inner handler is the same object, so a call costs a
dict lookup. Only methods that have a handler are kept (a bounded set), and an inner
handler made per call (a refusal) is simply wrapped again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

__all__ = ["WrappingInterceptor"]


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base of interceptors that replace a handler by a wrapper of it.

    Subclasses implement :meth:`wrap`; it must depend only on the method and the
    handler (not on the call), since its result is reused for later calls.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to use for ``method`` (e.g. ``/svc/Method``) instead of
        ``handler``; ``handler`` itself when there is nothing to add."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
