"""Fixtures of the ps_client.torch tests (each test module skips itself, with the reason,
when the [torch] extra is not installed; this file never imports torch).

A 2-shard cluster of in-process servers on loopback (tests/integration/conftest.py),
so every lookup and gradient really crosses gRPC to the shard owning the id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from ps_client import PsClient
from tests.integration.conftest import start_inprocess_server


@pytest.fixture(scope="module")
def client() -> Iterator[PsClient]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(start_inprocess_server(shard_index=i, num_shards=2))
            for i in range(2)
        ]
        c = stack.enter_context(PsClient([s.address for s in servers], timeout=30))
        yield c
