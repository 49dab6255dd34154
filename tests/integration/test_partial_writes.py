"""A write that fails on some shards says what happened on each (issue 12, class 6).

Two in-process shards; an SGD table (zeros initializer, known rate), so every value
read back is worked out by hand as ``w - lr * g``. Shard 1's part carries a NaN
gradient, which the shard refuses (INVALID_ARGUMENT, nothing changed) while shard 0
applies its part: the error names shard 0 as applied and shard 1 as refused, with
their addresses, and ``client.retry(error)`` resends shard 1 its original request
(same tag: its ledger refuses it again) without touching shard 0, whose rows stay at
exactly one step. Both faces, sync and async.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator

import numpy as np
import pytest

from ps_client import AsyncPsClient, PsClient, PsError, PsInvalidArgument
from ps_server.engine import configs
from tests.integration.conftest import RunningServer, start_inprocess_server

pytestmark = pytest.mark.integration

LR = 0.5
NAN = float("nan")
# Ids 2, 4 live on shard 0, ids 3, 5 on shard 1 (floormod(id, 2)).
IDS = np.array([2, 3, 4, 5], dtype=np.int64)
START = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=np.float32)
GRADS = np.array([[0.5, -1.0], [NAN, 1.0], [2.0, 0.25], [1.0, 1.0]], dtype=np.float32)
# Shard 0's rows after one SGD step, w - LR * g; shard 1's rows unchanged.
ONE_STEP_ON_SHARD_0 = [
    [1.0 - 0.5 * 0.5, 2.0 - 0.5 * -1.0],
    [3.0, 4.0],
    [5.0 - 0.5 * 2.0, 6.0 - 0.5 * 0.25],
    [7.0, 8.0],
]
assert ONE_STEP_ON_SHARD_0 == [[0.75, 2.5], [3.0, 4.0], [4.0, 5.875], [7.0, 8.0]]


@pytest.fixture(scope="module")
def shards() -> Iterator[list[RunningServer]]:
    with start_inprocess_server(shard_index=0, num_shards=2) as s0, \
            start_inprocess_server(shard_index=1, num_shards=2) as s1:
        yield [s0, s1]


def addresses(shards: list[RunningServer]) -> list[str]:
    return [s.address for s in shards]


def check_partial(err: PsError, addrs: list[str]) -> None:
    text = str(err)
    assert err.code == "INVALID_ARGUMENT" and isinstance(err, ValueError)
    assert err.details.startswith(f"ApplyGradients applied on shard 0 ({addrs[0]}) only; "
                                  f"refused by shard 1 ({addrs[1]}), which changed nothing "
                                  "there: INVALID_ARGUMENT: table "), text
    assert "not a finite number" in text
    assert err.details.endswith(
        f"retry(error) resends the same requests (same tags) to shard 1 ({addrs[1]}) only"
    ), text
    assert err.write is not None
    assert (err.write.applied, err.write.refused, err.write.unknown) == ((0,), (1,), ())
    assert err.write.method == "ApplyGradients"
    assert err.write.addresses == tuple(addrs)
    assert err.write.requests[0] is not None and err.write.requests[1] is not None


def test_sync_partial_write_names_the_shards_and_retry_applies_nothing_twice(
    shards: list[RunningServer],
) -> None:
    addrs = addresses(shards)
    with PsClient(addrs, timeout=30) as client:
        table = client.create_table(configs.table_config(2), name="sync_partial",
                                    learning_rate_fns=(LR,))
        table.assign(IDS, START)
        with pytest.raises(PsInvalidArgument) as info:
            table.apply_gradients(IDS, GRADS, 1)
        err = info.value
        check_partial(err, addrs)
        assert table.lookup(IDS).tolist() == ONE_STEP_ON_SHARD_0
        # Nothing fixed: shard 1 refuses the resend again (same tag, from its ledger);
        # shard 0 is not contacted, so its rows stay at one step.
        with pytest.raises(PsInvalidArgument) as again:
            client.retry(err)
        check_partial(again.value, addrs)
        assert again.value.write is not None
        assert again.value.write.requests == err.write.requests  # the very same bytes
        assert table.lookup(IDS).tolist() == ONE_STEP_ON_SHARD_0
        # The error survives pickling without its outcome.
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is PsInvalidArgument and copy.details == err.details
        assert copy.write is None
        with pytest.raises(PsInvalidArgument, match="has none"):
            client.retry(copy)


def test_every_shard_refusing_says_nothing_changed_anywhere(
    shards: list[RunningServer],
) -> None:
    addrs = addresses(shards)
    with PsClient(addrs, timeout=30) as client:
        table = client.create_table(configs.table_config(2), name="all_refuse",
                                    learning_rate_fns=(LR,))
        table.assign(IDS, START)
        grads = GRADS.copy()
        grads[0, 0] = np.inf  # shard 0's part refused too
        with pytest.raises(PsInvalidArgument) as info:
            table.apply_gradients(IDS, grads, 1)
        err = info.value
        assert err.details.startswith(
            f"ApplyGradients changed nothing anywhere; refused by shard 0 ({addrs[0]}), "
            "which changed nothing there: INVALID_ARGUMENT: "
        ), err.details
        assert f"; refused by shard 1 ({addrs[1]}), which changed nothing there: " \
            in err.details
        assert err.write is not None
        assert (err.write.applied, err.write.refused, err.write.unknown) == ((), (0, 1), ())
        assert table.lookup(IDS).tolist() == START.tolist()


def test_a_write_to_one_shard_keeps_its_message_and_carries_the_outcome(
    shards: list[RunningServer],
) -> None:
    addrs = addresses(shards)
    with PsClient(addrs, timeout=30) as client:
        table = client.create_table(configs.table_config(2), name="one_shard",
                                    learning_rate_fns=(LR,))
        with pytest.raises(PsInvalidArgument) as info:
            table.apply_gradients([3], [[NAN, 1.0]], 1)  # shard 1 only
        err = info.value
        assert err.address == addrs[1] and err.details.startswith("table 'one_shard': ")
        assert err.write is not None
        assert (err.write.applied, err.write.refused, err.write.unknown) == ((), (1,), ())
        assert err.write.requests[0] is None
        with pytest.raises(PsInvalidArgument):
            client.retry(err)
        assert table.size() == 0
        with pytest.raises(PsInvalidArgument, match="has none"):
            client.retry(ValueError("not a write"))


def test_async_partial_write_and_retry(shards: list[RunningServer]) -> None:
    addrs = addresses(shards)

    async def scenario() -> None:
        client = AsyncPsClient(addrs, timeout=30)
        try:
            table = await client.create_table(configs.table_config(2), name="async_partial",
                                              learning_rate_fns=(LR,))
            await table.assign(IDS, START)
            with pytest.raises(PsInvalidArgument) as info:
                await table.apply_gradients(IDS, GRADS, 1)
            check_partial(info.value, addrs)
            assert (await table.lookup(IDS)).tolist() == ONE_STEP_ON_SHARD_0
            with pytest.raises(PsInvalidArgument) as again:
                await client.retry(info.value)
            check_partial(again.value, addrs)
            assert (await table.lookup(IDS)).tolist() == ONE_STEP_ON_SHARD_0
            # assign_add goes the same way: shard 0 adds once, shard 1 refuses.
            with pytest.raises(PsInvalidArgument) as add:
                await table.assign_add(IDS, GRADS)
            assert add.value.write is not None
            assert add.value.details.startswith(
                f"AssignAdd applied on shard 0 ({addrs[0]}) only; ")
            with pytest.raises(PsInvalidArgument):
                await client.retry(add.value)
            assert (await table.lookup(IDS)).tolist() == [
                [0.75 + 0.5, 2.5 - 1.0], [3.0, 4.0], [4.0 + 2.0, 5.875 + 0.25], [7.0, 8.0]]
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
