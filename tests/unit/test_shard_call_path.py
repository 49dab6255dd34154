"""The per-call machinery of a shard: interceptor chains, locks, the executor hop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import grpc
import pytest

from bench.service_bench import table_config
from ps_server.engine import Shard
from ps_server.errors import NotFoundError, ResourceExhaustedError
from ps_server.interception import WrappingChain, WrappingInterceptor, combine
from ps_server.locks import ShardLocks
from ps_server.runtime import ShardRuntime

# ---------------------------------------------------------------- interceptor chains


class _Tag(WrappingInterceptor):
    """Wraps a handler so that its answer records this interceptor's name."""

    def __init__(self, name: str, seen: list[str]) -> None:
        super().__init__()
        self.name = name
        self.seen = seen

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        name, seen = self.name, self.seen

        async def tagged(request: Any, context: Any) -> Any:
            seen.append(name)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(tagged)


class _Plain(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        return await continuation(details)


class _Details:
    method = "/svc/M"
    invocation_metadata = ()


async def _through(chain: list[grpc.aio.ServerInterceptor], seen: list[str]) -> Any:
    """Resolve a handler through ``chain`` as grpc.aio does, then call it."""

    async def final(request: Any, context: Any) -> str:
        seen.append("handler")
        return "answer"

    base = grpc.unary_unary_rpc_method_handler(final)

    async def run(rest: list[grpc.aio.ServerInterceptor], details: Any) -> Any:
        if not rest:
            return base
        return await rest[0].intercept_service(lambda d: run(rest[1:], d), details)

    handler = await run(chain, _Details())
    return await handler.unary_unary(None, None)


def test_combine_groups_runs_of_wrapping_interceptors_and_keeps_order() -> None:
    seen: list[str] = []
    a, b, c = (_Tag(n, seen) for n in "abc")
    plain = _Plain()
    combined = combine([a, b, plain, c])
    assert len(combined) == 3
    assert isinstance(combined[0], WrappingChain) and combined[0].interceptors == (a, b)
    assert combined[1] is plain and combined[2] is c
    assert combine([a]) == [a]
    assert combine([]) == []

    separate: list[str] = []
    for chain, log in (([a, b, plain, c], separate), (combined, seen)):
        for t in (a, b, c):
            t.seen = log
        assert asyncio.run(_through(chain, log)) == "answer"
    assert seen == separate == ["a", "b", "c", "handler"]


def test_wrapping_chain_reuses_its_wrapper_for_the_same_handler() -> None:
    seen: list[str] = []
    chain = WrappingChain([_Tag("a", seen), _Tag("b", seen)])
    base = grpc.unary_unary_rpc_method_handler(lambda r, c: None)

    async def resolve() -> Any:
        async def continuation(details: Any) -> Any:
            return base

        return await chain.intercept_service(continuation, _Details())

    first, second = asyncio.run(resolve()), asyncio.run(resolve())
    assert first is second and first is not base


# ---------------------------------------------------------------- locks


def _shard() -> Shard:
    shard = Shard(0, 1)
    shard.create_table("t", table_config().SerializeToString())
    shard.create_table("u", table_config().SerializeToString())
    return shard


def test_hold_serializes_one_table_and_lets_others_run() -> None:
    shard, locks = _shard(), ShardLocks()

    async def body() -> None:
        order: list[str] = []
        async with locks.hold(shard, tables=["t"]):
            waiting = asyncio.ensure_future(_enter(locks, shard, ["t"], order, "second"))
            await _enter(locks, shard, ["u"], order, "other table")
            await asyncio.sleep(0.01)
            assert order == ["other table"] and not waiting.done()
            order.append("first")
        await waiting
        assert order == ["other table", "first", "second"]

    asyncio.run(body())


async def _enter(locks: ShardLocks, shard: Shard, tables: list[str], order: list[str],
                 name: str) -> None:
    async with locks.hold(shard, tables=tables):
        order.append(name)


def test_hold_of_an_unknown_table_raises_and_holds_nothing() -> None:
    shard, locks = _shard(), ShardLocks()

    async def body() -> None:
        with pytest.raises(NotFoundError):
            async with locks.hold(shard, tables=["t", "missing"]):
                raise AssertionError("entered")
        # Nothing is left held: an exclusive hold and the table's lock are free.
        async with locks.hold(shard, exclusive=True):
            pass
        await asyncio.wait_for(_enter(locks, shard, ["t"], [], "again"), 1)

    asyncio.run(body())


def test_cancelled_waiter_releases_what_it_held() -> None:
    shard, locks = _shard(), ShardLocks()

    async def body() -> None:
        async with locks.hold(shard, tables=["u"]):
            # Holds "t" (first in order), then waits for "u".
            waiter = asyncio.ensure_future(_enter(locks, shard, ["t", "u"], [], "both"))
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        await asyncio.wait_for(_enter(locks, shard, ["t"], [], "t again"), 1)
        async with locks.hold(shard, exclusive=True):
            pass

    asyncio.run(body())


def test_exclusive_waits_for_shared_holders_and_blocks_new_ones() -> None:
    shard, locks = _shard(), ShardLocks()

    async def body() -> None:
        order: list[str] = []

        async def exclusive() -> None:
            async with locks.hold(shard, exclusive=True):
                order.append("exclusive")

        async with locks.hold(shard, tables=["t"]):
            ex = asyncio.ensure_future(exclusive())
            await asyncio.sleep(0.01)
            late = asyncio.ensure_future(_enter(locks, shard, ["u"], order, "late shared"))
            await asyncio.sleep(0.01)
            assert order == []
        await asyncio.gather(ex, late)
        assert order == ["exclusive", "late shared"]

    asyncio.run(body())


# ---------------------------------------------------------------- the executor hop


def _runtime(max_message_bytes: int = 1 << 20) -> tuple[ShardRuntime,
                                                       concurrent.futures.Executor]:
    pool = concurrent.futures.ThreadPoolExecutor(2)
    return ShardRuntime(_shard(), pool, max_message_bytes=max_message_bytes), pool


def test_run_returns_the_answer_and_raises_the_error_of_the_work() -> None:
    runtime, pool = _runtime(max_message_bytes=10)

    async def body() -> None:
        assert await runtime.run("R", lambda: threading.get_ident(),
                                 tables=["t"]) != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            await runtime.run("R", lambda: 1 // 0, tables=["t"])
        with pytest.raises(ResourceExhaustedError, match="R: the response would be 11"):
            await runtime.run("R", lambda: b"x" * 11, tables=["t"])

    try:
        asyncio.run(body())
    finally:
        pool.shutdown()


def test_cancelled_call_keeps_its_locks_until_the_work_ends() -> None:
    runtime, pool = _runtime()
    release = threading.Event()
    ended: list[str] = []

    def slow() -> None:
        release.wait(5)
        ended.append("work")

    async def body() -> None:
        call = asyncio.ensure_future(runtime.run("Slow", slow, tables=["t"]))
        await asyncio.sleep(0.02)
        call.cancel()
        await asyncio.sleep(0.02)
        call.cancel()  # a second cancellation changes nothing either
        after = asyncio.ensure_future(runtime.run("After", lambda: ended.append("after"),
                                                  tables=["t"]))
        await asyncio.sleep(0.05)
        assert not call.done() and not after.done() and ended == []
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await after
        assert ended == ["work", "after"]

    try:
        asyncio.run(body())
    finally:
        release.set()
        pool.shutdown()


def test_cancelled_tagged_write_is_recorded_once_it_ends() -> None:
    runtime, pool = _runtime()
    release = threading.Event()

    def slow() -> None:
        release.wait(5)

    async def body() -> None:
        call = asyncio.ensure_future(runtime.apply_once("Write", "c", 1, slow, tables=["t"]))
        await asyncio.sleep(0.02)
        call.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The write ran: a repeat of its tag is answered from the ledger.
        assert await runtime.apply_once("Write", "c", 1, lambda: 1 // 0,
                                        tables=["t"]) == (None, True)

    try:
        asyncio.run(body())
    finally:
        release.set()
        pool.shutdown()
