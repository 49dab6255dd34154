"""The request ledger (``ps_server.ledger``): repeats answered once, windows, LRU, waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from ps_server.errors import (
    ConfigError,
    DimMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from ps_server.ledger import (
    MAX_CLIENT_ID_CHARS,
    RECORD_OVERHEAD_BYTES,
    Outcome,
    RequestLedger,
)

RPC = "ApplyGradients"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=5))


async def apply(ledger: RequestLedger, client: str, seq: int, answer: object = "ok",
                rpc: str = RPC) -> None:
    """Claim ``(client, seq)`` as a first run and record ``answer``."""
    assert await ledger.claim(client, seq, rpc) is None
    ledger.record(client, seq, Outcome.succeeded(answer))


async def replayed(ledger: RequestLedger, client: str, seq: int, rpc: str = RPC) -> object:
    """The answer a repeat of ``(client, seq)`` gets (it must be a repeat)."""
    outcome = await ledger.claim(client, seq, rpc)
    assert outcome is not None, f"{client}/{seq} was not remembered"
    return outcome.replay()


def test_a_repeat_gets_the_first_answer_and_is_counted() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        await apply(ledger, "a", 1, b"first answer")
        assert await replayed(ledger, "a", 1) == b"first answer"
        assert await replayed(ledger, "a", 1) == b"first answer"
        # Another client's seq 1 and the same client's seq 2 are new requests.
        assert await ledger.claim("b", 1, RPC) is None
        assert await ledger.claim("a", 2, RPC) is None
        assert ledger.replayed == {RPC: 2}
        assert ledger.in_flight == 2
        assert ledger.records == 1
        # A cached bytes answer counts its length: 12 bytes.
        assert ledger.nbytes == RECORD_OVERHEAD_BYTES + 12

    run(body)


def test_a_repeat_of_a_failed_request_raises_the_same_error_again() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        assert await ledger.claim("a", 7, RPC) is None
        try:
            raise DimMismatchError("grads have 3 columns, the table has 2")
        except DimMismatchError as e:
            ledger.record("a", 7, Outcome.failed(e))
        raised = []
        for _ in range(2):
            with pytest.raises(DimMismatchError, match="grads have 3 columns") as info:
                await replayed(ledger, "a", 7)
            raised.append(info.value)
        # A fresh copy each time; the kept one holds no traceback (no frames, no request).
        assert raised[0] is not raised[1]
        outcome = await ledger.claim("a", 7, RPC)
        assert outcome is not None and outcome.error is not None
        assert outcome.error.__traceback__ is None and outcome.error.__context__ is None
        assert outcome.response is None

    run(body)


def test_the_window_keeps_each_clients_last_outcomes_and_refuses_older_ones() -> None:
    async def body() -> None:
        ledger = RequestLedger(window=3)
        for seq in range(1, 6):
            await apply(ledger, "a", seq, f"answer {seq}")
        await apply(ledger, "b", 1, "b's answer")
        # Client a keeps 3, 4, 5; 1 and 2 are older than its window: refused, not rerun.
        assert ledger.records == 4
        for seq in (3, 4, 5):
            assert await replayed(ledger, "a", seq) == f"answer {seq}"
        for seq in (1, 2):
            with pytest.raises(FailedPreconditionError, match=f"request {seq} of client a"):
                await ledger.claim("a", seq, RPC)
        assert ledger.refused == 2
        # Newer ones are new; client b's window is its own.
        assert await ledger.claim("a", 6, RPC) is None
        assert await replayed(ledger, "b", 1) == "b's answer"

    run(body)


def test_the_window_drops_in_arrival_order_and_the_floor_is_the_highest_dropped() -> None:
    async def body() -> None:
        ledger = RequestLedger(window=2)
        await apply(ledger, "a", 2, "two")
        await apply(ledger, "a", 1, "one")  # overtaken on the way: arrives after 2
        await apply(ledger, "a", 3, "three")  # drops 2 (the oldest arrival)
        assert await replayed(ledger, "a", 1) == "one"
        assert await replayed(ledger, "a", 3) == "three"
        with pytest.raises(FailedPreconditionError):
            await ledger.claim("a", 2, RPC)
        await apply(ledger, "a", 4, "four")  # drops 1; the floor stays 2
        with pytest.raises(FailedPreconditionError):
            await ledger.claim("a", 1, RPC)
        assert ledger.refused == 2

    run(body)


def test_the_least_recently_seen_client_is_forgotten_first() -> None:
    async def body() -> None:
        ledger = RequestLedger(max_clients=2)
        await apply(ledger, "a", 1, "a1")
        await apply(ledger, "b", 1, "b1")
        assert await replayed(ledger, "a", 1) == "a1"  # a is now more recent than b
        await apply(ledger, "c", 1, "c1")  # a third client: b goes
        assert ledger.clients == 2
        assert ledger.records == 2
        assert await replayed(ledger, "a", 1) == "a1"
        assert await replayed(ledger, "c", 1) == "c1"
        # b is forgotten entirely, its floor too: its seq 1 would run again (the
        # documented limit of a bounded ledger).
        assert await ledger.claim("b", 1, RPC) is None
        assert ledger.nbytes == 2 * RECORD_OVERHEAD_BYTES

    run(body)


def test_max_bytes_drops_the_oldest_outcomes_of_any_client() -> None:
    async def body() -> None:
        budget = 2 * RECORD_OVERHEAD_BYTES + 10
        ledger = RequestLedger(max_bytes=budget)
        await apply(ledger, "a", 1, b"x" * 10)  # 330 bytes
        await apply(ledger, "b", 1, None)  # 330 + 320 = 650 = the budget: kept
        assert (ledger.records, ledger.nbytes) == (2, budget)
        await apply(ledger, "b", 2, None)  # 970 > 650: a's (the oldest) goes, 640 left
        assert (ledger.records, ledger.nbytes) == (2, 2 * RECORD_OVERHEAD_BYTES)
        with pytest.raises(FailedPreconditionError):
            await ledger.claim("a", 1, RPC)
        assert await replayed(ledger, "b", 1) is None
        assert await replayed(ledger, "b", 2) is None

    run(body)


def test_a_concurrent_repeat_waits_for_the_first_run_and_gets_its_answer() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        assert await ledger.claim("a", 1, RPC) is None
        repeats = [asyncio.create_task(ledger.claim("a", 1, RPC)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in repeats)
        assert ledger.in_flight == 1
        ledger.record("a", 1, Outcome.succeeded("done once"))
        outcomes = await asyncio.gather(*repeats)
        assert [o.replay() if o else None for o in outcomes] == ["done once"] * 2
        assert ledger.replayed == {RPC: 2}
        assert ledger.in_flight == 0

    run(body)


def test_a_released_claim_lets_one_waiting_repeat_run() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        assert await ledger.claim("a", 1, RPC) is None
        first = asyncio.create_task(ledger.claim("a", 1, RPC))
        second = asyncio.create_task(ledger.claim("a", 1, RPC))
        await asyncio.sleep(0.01)
        ledger.release("a", 1)  # the first run changed nothing (e.g. cancelled in a queue)
        assert await first is None  # this repeat runs now...
        await asyncio.sleep(0.01)
        assert not second.done()  # ...and the other waits for it
        ledger.record("a", 1, Outcome.succeeded("ran on the retry"))
        outcome = await second
        assert outcome is not None and outcome.replay() == "ran on the retry"
        assert ledger.replayed == {RPC: 1}

    run(body)


def test_a_cancelled_waiter_does_not_disturb_the_first_run() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        assert await ledger.claim("a", 1, RPC) is None
        waiter = asyncio.create_task(ledger.claim("a", 1, RPC))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        ledger.record("a", 1, Outcome.succeeded("kept"))
        assert await replayed(ledger, "a", 1) == "kept"

    run(body)


def test_a_tag_reused_by_another_rpc_is_refused() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        await apply(ledger, "a", 1)
        with pytest.raises(InvalidArgumentError, match="first used by a ApplyGradients"):
            await ledger.claim("a", 1, "AssignAdd")
        assert await ledger.claim("a", 2, "Assign") is None  # in flight
        with pytest.raises(InvalidArgumentError, match="now sent with FusedOptimize"):
            await ledger.claim("a", 2, "FusedOptimize")
        assert ledger.replayed == {}

    run(body)


def test_untagged_and_oversized_tags_are_invalid_arguments() -> None:
    async def body() -> None:
        ledger = RequestLedger()
        for client, seq in (("", 1), ("a", 0)):
            with pytest.raises(InvalidArgumentError, match="untagged"):
                await ledger.claim(client, seq, RPC)
        with pytest.raises(InvalidArgumentError, match="client_id is 129 characters"):
            await ledger.claim("x" * (MAX_CLIENT_ID_CHARS + 1), 1, RPC)
        assert await ledger.claim("x" * MAX_CLIENT_ID_CHARS, 1, RPC) is None

    run(body)


@pytest.mark.parametrize("limit", ["window", "max_clients", "max_bytes"])
def test_limits_below_one_are_config_errors(limit: str) -> None:
    with pytest.raises(ConfigError, match=f"{limit} must be >= 1, got 0"):
        RequestLedger(**{limit: 0})
