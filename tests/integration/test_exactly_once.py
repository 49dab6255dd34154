"""Exactly-once updates: a lost answer is retried by the client and applied once.

The shard is built as the product builds it (:func:`ps_server.server.build_shard_server`:
metrics, bearer-token check, drain gate, request guards), with data and admin tokens.
Between the client and it sits :class:`AnswerDropper`, a TCP proxy on loopback that
reads the shard's HTTP/2 frames and loses the first answer after it is armed, in one
of three ways:

* ``close``: the answer's DATA frame is dropped and both connections are closed;
  the client sees ``UNAVAILABLE`` and resends on a new connection;
* ``hold``: from the answer on, everything the shard sends is held back, and the
  proxy ends the client's attempt with ``DEADLINE_EXCEEDED`` (a trailers frame, as
  if its deadline had passed); the client resends on the same connection. Once the
  shard answered the resend from its ledger, the held bytes are delivered (the
  stale answer first, for a stream the client gave up);
* ``stall``: as ``hold``, but the attempt ends on the client's own attempt
  deadline (:attr:`RetryPolicy.attempt_timeout`).

Every resend is caused by an event the test makes (the proxy saw the answer), not by
a clock racing the shard: attempts get the whole call deadline, except in ``stall``,
whose assertions hold however many attempts run out of time. In each the shard
applied the update before its answer was lost. The resend carries the same tag, so
the shard answers it from its ledger (``replayed``, the
``monolith_ps_replayed_requests_total`` counter) and the value is exactly one
update, worked out by hand. A server interceptor that applies a call and then
fails it with ``UNAVAILABLE`` is the same fault one level up. Concurrent
duplicates, repeats of failed requests and untagged requests are sent with a raw
stub (with the data token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as ps_grpc
from ps_client import AsyncPsClient, RetryPolicy
from ps_client.async_table import AsyncTable
from ps_client.transport import ChannelOptions
from ps_server import codec
from ps_server.config import ServerConfig
from ps_server.engine import configs
from ps_server.runtime import ShardRuntime
from ps_server.server import ShardServer, build_shard_server
from ps_server.service import SERVICE_NAME

pytestmark = pytest.mark.integration

LR = 0.5
IDS = np.array([3, 5], dtype=np.int64)
GRADS = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
# SGD, zeros initializer: w = 0 - LR * g, once.
ONE_SGD_STEP = [[0.0 - 0.5 * 0.5, 0.0 - 0.5 * -1.0], [0.0 - 0.5 * 2.0, 0.0 - 0.5 * 0.25]]
assert ONE_SGD_STEP == [[-0.25, 0.5], [-1.0, -0.125]]
VALUES = np.array([[1.5, -2.0], [0.25, 4.0]], dtype=np.float32)
ONE_ADD = [[0.0 + 1.5, 0.0 - 2.0], [0.0 + 0.25, 0.0 + 4.0]]
TIMEOUT = 60.0
# An attempt lasts as long as its call: only a fault the test makes causes a resend.
RETRY = RetryPolicy(attempt_timeout=TIMEOUT)
DATA, ADMIN = "exactly-once-data-token", "exactly-once-admin-token"
AUTH = (("authorization", f"Bearer {DATA}"),)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


# ---------------------------------------------------------------- the proxy


class AnswerDropper:
    """A loopback TCP proxy in front of one shard that can lose one answer.

    Client bytes pass through unchanged. Shard bytes are read as HTTP/2 frames (a
    9-byte header: 24-bit length, type, flags, stream id; the shard sends no
    preface); a DATA frame (type 0) with a payload is a response message.
    :meth:`arm` makes the next one lost (see the module doc for the modes).
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._mode: str | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self.release = asyncio.Event()
        self.lost = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self._transports:
            transport.abort()  # every pump sees the end of its stream
        await asyncio.gather(*self._connections, return_exceptions=True)

    def arm(self, mode: str) -> None:
        assert mode in ("close", "hold", "stall")
        self._mode = mode

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._transports.update((writer.transport, up_writer.transport))
        pumps = [asyncio.create_task(self._requests(reader, up_writer)),
                 asyncio.create_task(self._answers(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._connections.discard(task)

    @staticmethod
    async def _requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        held: list[bytes] | None = None

        async def deliver_when_released() -> None:
            nonlocal held
            await self.release.wait()
            assert held is not None
            writer.write(b"".join(held))
            held = None

        releaser: asyncio.Task[None] | None = None
        try:
            while True:
                head = await reader.readexactly(9)
                frame = head + await reader.readexactly(int.from_bytes(head[:3], "big"))
                if self._mode is not None and head[3] == 0 and len(frame) > 9:
                    mode, self._mode = self._mode, None
                    self.lost += 1
                    if mode == "close":
                        return  # _serve aborts both connections
                    held = []
                    releaser = asyncio.create_task(deliver_when_released())
                    if mode == "hold":
                        writer.write(deadline_exceeded(head[5:9]))
                        await writer.drain()
                if held is not None:
                    held.append(frame)
                else:
                    writer.write(frame)
                    await writer.drain()
        except asyncio.IncompleteReadError:
            return
        finally:
            if releaser is not None:
                releaser.cancel()


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """One header field as an HPACK literal without indexing (RFC 7541 §6.2.2): the
    client's header table is left as the shard's own frames expect it."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def deadline_exceeded(stream_id: bytes) -> bytes:
    """A trailers-only HEADERS frame (END_STREAM | END_HEADERS) ending the stream
    ``stream_id`` (4 bytes) with ``grpc-status: 4``, what the client sees when its
    attempt's deadline passes."""
    block = (_hpack_literal(b"grpc-status", b"%d" % grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
             + _hpack_literal(b"grpc-message", b"Deadline Exceeded (test proxy)"))
    return len(block).to_bytes(3, "big") + bytes([0x1, 0x1 | 0x4]) + stream_id + block


# ---------------------------------------------------------------- harness


@dataclass
class Setup:
    shard: ShardServer
    proxy: AnswerDropper
    client: AsyncPsClient
    table: AsyncTable

    @property
    def runtime(self) -> ShardRuntime:
        return self.shard.runtime

    def replayed_metric(self, method: str) -> float | None:
        return self.shard.metrics.registry.get_sample_value(
            "monolith_ps_replayed_requests_total", {"method": method})

    def answered(self, method: str, code: str = "OK") -> float | None:
        """How many calls of ``method`` the shard answered with ``code``."""
        return answered(self.shard, method, code)


def answered(shard: ShardServer, method: str, code: str = "OK") -> float | None:
    """How many calls of ``method`` ``shard`` answered with ``code`` (its metrics)."""
    return shard.metrics.registry.get_sample_value(
        "monolith_ps_rpcs_total", {"service": SERVICE_NAME, "method": method, "code": code})


@contextlib.asynccontextmanager
async def running_shard(
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[ShardServer]:
    """A shard as the product assembles it, with data and admin tokens; the
    ``interceptors`` innermost (test faults)."""
    config = ServerConfig(host="127.0.0.1", port=0, workers=2, data_token=DATA,
                          admin_token=ADMIN)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shard = await build_shard_server(config, executor=pool,
                                         interceptors=list(interceptors))
        await shard.start()
        try:
            yield shard
        finally:
            await shard.stop(0)


def new_client(address: str, retry: RetryPolicy = RETRY) -> AsyncPsClient:
    return AsyncPsClient([address], timeout=TIMEOUT, retry=retry,
                         channel_options=ChannelOptions(auth_token=DATA))


@contextlib.asynccontextmanager
async def shard_behind_proxy(retry: RetryPolicy = RETRY) -> AsyncIterator[Setup]:
    """One real shard, the proxy in front of it, a client of the proxy and table "t"."""
    async with running_shard() as shard:
        proxy = AnswerDropper(shard.port)
        address = await proxy.start()
        client = new_client(address, retry)
        try:
            table = await client.create_table(configs.table_config(2), name="t",
                                              learning_rate_fns=(LR,))
            yield Setup(shard, proxy, client, table)
        finally:
            await client.close()
            await proxy.stop()


async def update(setup: Setup, method: str) -> None:
    """Send one update of ``method`` through the client."""
    table = setup.table
    if method == "ApplyGradients":
        await table.apply_gradients(IDS, GRADS, global_step=1)
    elif method == "AssignAdd":
        await table.assign_add(IDS, VALUES)
    else:  # one shard, one table: block 0 holds both ids and their 4 floats
        await setup.client.fused_apply_gradient(
            [table], IDS, None, [2], GRADS.reshape(-1), [0, 2], [0, 4], [LR],
            req_time=0, global_step=1, num_of_shards=1,
        )


ONCE = {"ApplyGradients": ONE_SGD_STEP, "AssignAdd": ONE_ADD, "FusedOptimize": ONE_SGD_STEP}


# ---------------------------------------------------------------- lost answers


@pytest.mark.parametrize("mode", ["close", "hold"])
@pytest.mark.parametrize("method", ["ApplyGradients", "AssignAdd", "FusedOptimize"])
def test_a_lost_answer_is_retried_and_the_update_applied_once(method: str, mode: str) -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup:
            ledger = setup.runtime.ledger

            async def release_after_the_replay() -> None:
                while ledger.replayed.get(method, 0) < 1:  # the shard's own count
                    await asyncio.sleep(0.01)
                setup.proxy.release.set()

            watcher = asyncio.create_task(release_after_the_replay())
            setup.proxy.arm(mode)
            await update(setup, method)  # no error: the resend got the first answer
            await watcher
            assert setup.proxy.lost == 1
            # The shard answered both attempts and applied the first only.
            assert setup.answered(method) == 2
            assert ledger.replayed == {method: 1}
            assert setup.replayed_metric(method) == 1.0
            assert (await setup.table.lookup(IDS)).tolist() == ONCE[method]

    run(body)


def test_an_attempt_past_its_own_deadline_is_resent_and_applied_once() -> None:
    """The client's attempt deadline (not the proxy) ends the stalled attempt. How
    many attempts run out of time depends on the machine's speed; that the update is
    applied once, and the resend answered from the ledger, does not."""
    async def body() -> None:
        retry = RetryPolicy(attempt_timeout=0.5, max_attempts=1000)
        async with shard_behind_proxy(retry) as setup:
            ledger = setup.runtime.ledger

            async def release_after_the_replay() -> None:
                while ledger.replayed.get("ApplyGradients", 0) < 1:
                    await asyncio.sleep(0.01)
                setup.proxy.release.set()

            watcher = asyncio.create_task(release_after_the_replay())
            setup.proxy.arm("stall")
            await update(setup, "ApplyGradients")
            await watcher
            assert setup.proxy.lost == 1
            assert ledger.replayed.get("ApplyGradients", 0) >= 1
            assert (await setup.table.lookup(IDS)).tolist() == ONE_SGD_STEP

    run(body)


def test_a_second_update_after_a_retried_one_is_applied_too() -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup:
            setup.proxy.arm("close")
            await update(setup, "ApplyGradients")
            await update(setup, "ApplyGradients")  # a new tag: applied
            two_steps = [[2 * -0.25, 2 * 0.5], [2 * -1.0, 2 * -0.125]]
            assert (await setup.table.lookup(IDS)).tolist() == two_steps
            assert setup.runtime.ledger.replayed == {"ApplyGradients": 1}

    run(body)


# ---------------------------------------------------------------- raw requests


def apply_request(tag: pb.RequestTag | None, grads: np.ndarray = GRADS,
                  table: str = "t") -> pb.ApplyGradientsRequest:
    return pb.ApplyGradientsRequest(
        table=table, ids=codec.encode_ids(IDS), grads=codec.encode_floats(grads),
        learning_rates=[LR], global_step=1, tag=tag,
    )


@contextlib.asynccontextmanager
async def raw_stub(setup: Setup) -> AsyncIterator[ps_grpc.ParameterServerStub]:
    """A stub straight to the shard; calls pass ``metadata=AUTH``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.shard.port}") as channel:
        yield ps_grpc.ParameterServerStub(channel)


def test_concurrent_duplicates_are_applied_once() -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup, raw_stub(setup) as stub:
            servicer = setup.runtime
            ledger = servicer.ledger
            request = apply_request(pb.RequestTag(client_id="twin", seq=1))
            # Both copies asked the ledger for the tag (seen by a wrapper of its claim);
            # the first claim returns at once, the second waits for the first's outcome.
            claims = {"asked": 0, "claimed": 0}
            both_asked = asyncio.Event()
            claim = ledger.claim

            async def counted_claim(client_id: str, seq: int, rpc: str) -> Any:
                claims["asked"] += 1
                if claims["asked"] == 2:
                    both_asked.set()
                outcome = await claim(client_id, seq, rpc)
                claims["claimed"] += outcome is None
                return outcome

            ledger.claim = counted_claim  # type: ignore[method-assign]
            # Hold the table so both copies are in the shard before either runs.
            async with servicer.locks.hold(servicer.shard, tables=["t"]):
                calls = [asyncio.ensure_future(
                    stub.ApplyGradients(request, timeout=TIMEOUT, metadata=AUTH))
                    for _ in range(2)]
                await asyncio.wait_for(both_asked.wait(), TIMEOUT)
                assert setup.shard.ops.in_flight == 2
                assert claims == {"asked": 2, "claimed": 1}
                assert ledger.in_flight == 1  # one claimed it, one waits
            answers = await asyncio.gather(*calls)
            assert sorted(a.replayed for a in answers) == [False, True]
            assert (await setup.table.lookup(IDS)).tolist() == ONE_SGD_STEP

    run(body)


def test_untagged_requests_apply_every_time() -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup, raw_stub(setup) as stub:
            # Without the data token: refused before it runs.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ApplyGradients(apply_request(None), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for untagged in (None, pb.RequestTag(client_id="c", seq=0),
                             pb.RequestTag(client_id="", seq=9)):
                answer = await stub.ApplyGradients(apply_request(untagged), timeout=TIMEOUT,
                                                   metadata=AUTH)
                assert not answer.replayed
            three_steps = [[3 * -0.25, 3 * 0.5], [3 * -1.0, 3 * -0.125]]
            assert (await setup.table.lookup(IDS)).tolist() == three_steps
            assert setup.runtime.ledger.records == 0

    run(body)


def test_a_repeat_of_a_failed_request_fails_again_without_running() -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup, raw_stub(setup) as stub:
            tag = pb.RequestTag(client_id="c", seq=1)
            bad = apply_request(tag, grads=np.ones((2, 3), dtype=np.float32))
            details = []
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ApplyGradients(bad, timeout=TIMEOUT, metadata=AUTH)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details.append(info.value.details())
            assert details[0] == details[1]
            assert setup.runtime.ledger.replayed == {"ApplyGradients": 1}
            # The same tag with other content is still that failed request.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ApplyGradients(apply_request(tag), timeout=TIMEOUT, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert setup.table.name == "t" and await setup.table.size() == 0

    run(body)


def test_a_request_refused_before_it_ran_is_not_remembered() -> None:
    async def body() -> None:
        async with shard_behind_proxy() as setup, raw_stub(setup) as stub:
            request = apply_request(pb.RequestTag(client_id="c", seq=1), table="later")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ApplyGradients(request, timeout=TIMEOUT, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            later = await setup.client.create_table(configs.table_config(2), name="later",
                                                    learning_rate_fns=(LR,))
            answer = await stub.ApplyGradients(request, timeout=TIMEOUT, metadata=AUTH)
            assert not answer.replayed
            assert (await later.lookup(IDS)).tolist() == ONE_SGD_STEP
            assert setup.runtime.ledger.replayed == {}

    run(body)


# ---------------------------------------------------------------- lost after applying


class LoseFirstAnswer(grpc.aio.ServerInterceptor):
    """Runs the first call of each named method, then fails it with ``UNAVAILABLE``:
    the update is applied and its answer lost (the proxy's fault, one level up)."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.armed = set(methods)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is None or method not in self.armed:
            return handler
        inner = handler.unary_unary

        async def lose(request: Any, context: grpc.aio.ServicerContext) -> Any:
            answer = await inner(request, context)
            if method in self.armed:
                self.armed.discard(method)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost (test)")
            return answer

        return grpc.unary_unary_rpc_method_handler(
            lose, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def test_answers_lost_after_applying_are_replayed_from_the_ledger() -> None:
    async def body() -> None:
        lossy = LoseFirstAnswer(["ApplyGradients", "InterceptGradient"])
        async with running_shard([lossy]) as shard:
            servicer = shard.runtime
            client = new_client(f"127.0.0.1:{shard.port}")
            try:
                table = await client.create_table(configs.table_config(2), name="t",
                                                  learning_rate_fns=(LR,))
                await table.apply_gradients(IDS, GRADS, global_step=1)
                assert (await table.lookup(IDS)).tolist() == ONE_SGD_STEP

                # Threshold 2: an id passes once it was counted twice before (old count
                # >= 2). Counted once per call, the answers are 0, 0, then 1.
                filters = await client.create_hash_filters(
                    True, eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=2),
                    capacity=100)
                g = np.array([[4.0]], dtype=np.float32)
                counts = [(await filters.intercept_gradient([8], g)).tolist()
                          for _ in range(3)]
                assert counts == [[[0.0]], [[0.0]], [[4.0]]]  # the first answer was lost
                assert not lossy.armed
                assert servicer.ledger.replayed == {"ApplyGradients": 1,
                                                    "InterceptGradient": 1}
                # The metrics saw each lost answer and the resend answered from the ledger.
                for method, sent in (("ApplyGradients", 2), ("InterceptGradient", 4)):
                    assert answered(shard, method, "UNAVAILABLE") == 1
                    assert answered(shard, method) == sent - 1
            finally:
                await client.close()

    run(body)
