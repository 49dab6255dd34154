"""Server interceptors that wrap a method's handler, each handler wrapped once.

grpc.aio asks every interceptor for the handler of every call. The shard's wrapping
interceptors (RPC metrics, the drain gate, the request guards) would build the same
closures and a new ``RpcMethodHandler`` for the same method on each call;
:class:`WrappingInterceptor` keeps the wrapper built for a method's handler and hands
it out again while that method's inner handler is the same object, so a call costs a
dict lookup. Only methods that have a handler are kept (a bounded set), and an inner
handler made per call (a refusal) is simply wrapped again.

grpc.aio also runs each interceptor as a coroutine of its own on every call (a
``functools.partial`` continuation, a frame and an await per interceptor), whatever
it returns: :func:`combine` installs a run of wrapping interceptors as one
(:class:`WrappingChain`), so that cost is paid once per call instead of once per
interceptor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

__all__ = ["WrappingChain", "WrappingInterceptor", "combine"]


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


class WrappingChain(WrappingInterceptor):
    """Several wrapping interceptors as one: the handler is wrapped by each in turn,
    the last one innermost, exactly as grpc.aio would chain them (the first listed is
    the outermost)."""

    def __init__(self, interceptors: Sequence[WrappingInterceptor]) -> None:
        super().__init__()
        self.interceptors: tuple[WrappingInterceptor, ...] = tuple(interceptors)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for interceptor in reversed(self.interceptors):
            handler = interceptor.wrap(method, handler)
        return handler


def combine(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
) -> list[grpc.aio.ServerInterceptor]:
    """``interceptors`` (outermost first) with each run of two or more consecutive
    :class:`WrappingInterceptor`\\ s replaced by one :class:`WrappingChain`; the
    order, and so what every call sees, is unchanged."""
    out: list[grpc.aio.ServerInterceptor] = []
    run: list[WrappingInterceptor] = []

    def flush() -> None:
        if len(run) > 1:
            out.append(WrappingChain(run))
        else:
            out.extend(run)
        run.clear()

    for interceptor in interceptors:
        if isinstance(interceptor, WrappingInterceptor):
            run.append(interceptor)
        else:
            flush()
            out.append(interceptor)
    flush()
    return out
