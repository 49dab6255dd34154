"""``create_table(..., monolith_quirks=True)`` reaches the shard's table over gRPC
(CreateTableRequest.monolith_quirks, field 7); the default leaves it off."""

from __future__ import annotations

import asyncio

from protos import embedding_hash_table_pb2 as eht
from ps_client import AsyncPsClient, PsClient
from tests.integration.conftest import RunningServer


def config() -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    seg = cfg.entry_config.segments.add()
    seg.dim_size = 2
    seg.init_config.zeros.SetInParent()
    seg.opt_config.group_adagrad.SetInParent()
    return cfg


def test_client_create_table_passes_the_option(server: RunningServer) -> None:
    with PsClient([f"127.0.0.1:{server.port}"], timeout=30) as client:
        client.create_table(config(), name="quirky", monolith_quirks=True)
        client.create_table(config(), name="plain")
    assert server.shard.table("quirky").monolith_quirks
    assert not server.shard.table("plain").monolith_quirks


def test_async_client_create_table_passes_the_option(server: RunningServer) -> None:
    async def run() -> None:
        client = AsyncPsClient([f"127.0.0.1:{server.port}"], timeout=30)
        try:
            await client.create_table(config(), name="aquirky", monolith_quirks=True)
        finally:
            await client.close()
    asyncio.run(run())
    assert server.shard.table("aquirky").monolith_quirks
