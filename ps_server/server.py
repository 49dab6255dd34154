"""Run one shard as a gRPC server: build, serve, drain on SIGTERM/SIGINT.

The server carries three services: ``monolith_ps.ParameterServer``
(:mod:`ps_server.service`), the standard ``grpc.health.v1.Health`` (SERVING while
up, NOT_SERVING once shutdown begins; probe it with ``grpc_health_probe`` or a
Kubernetes ``grpc`` probe) and server reflection (``grpcurl`` works without protos).

Everything here must run inside a running event loop (grpc.aio binds to it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import tempfile
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.config import ServerConfig, format_address
from ps_server.engine.shard import Shard
from ps_server.errors import ConfigError
from ps_server.service import SERVICE_NAME, ParameterServerServicer

__all__ = ["build_server", "new_executor", "run", "serve", "write_port_file"]

_log = logging.getLogger(__name__)


def new_executor(config: ServerConfig) -> concurrent.futures.ThreadPoolExecutor:
    """The thread pool engine work runs on (``config.worker_threads`` threads)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=config.worker_threads,
        thread_name_prefix=f"shard{config.shard_index}-worker",
    )


async def build_server(
    config: ServerConfig,
    shard: Shard | None = None,
    *,
    executor: concurrent.futures.Executor | None = None,
) -> tuple[grpc.aio.Server, int, Any]:
    """A bound, not yet started server for ``shard`` (a new empty one if None).

    Call inside the running loop, then ``await server.start()``. Health reports
    SERVING for ``""`` and the ParameterServer service from the start.

    :param executor: thread pool for engine work; the caller owns it and shuts it
        down after ``server.stop``. None: a new pool of ``config.worker_threads``
        threads that lives as long as the process.
    :returns: ``(server, bound_port, health_servicer)``; the health servicer is
        ``grpc_health.v1.health.aio.HealthServicer``.
    :raises ConfigError: the shard does not match the config, or the address
        cannot be bound.
    """
    if shard is None:
        shard = Shard(config.shard_index, config.num_shards)
    elif (shard.shard_index, shard.num_shards) != (config.shard_index, config.num_shards):
        raise ConfigError(
            f"shard is {shard.shard_index}/{shard.num_shards} but the config says "
            f"{config.shard_index}/{config.num_shards}"
        )
    limit = config.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Two servers on one fixed port must fail, not share the traffic.
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = ParameterServerServicer(
        shard,
        executor if executor is not None else new_executor(config),
        data_root=config.data_root,
        max_message_bytes=limit,
    )
    ps_grpc.add_ParameterServerServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {config.address}: {e}") from e
    if port == 0:
        raise ConfigError(f"cannot listen on {config.address} (address in use or invalid)")
    return server, port, health_servicer


def write_port_file(path: str, port: int) -> None:
    """Write ``port`` (decimal, newline) to ``path`` atomically: temp file, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def serve(config: ServerConfig, shard: Shard | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return.

    On a signal: health turns NOT_SERVING; after ``shutdown_delay_seconds`` new
    calls are refused while in-flight ones get ``grace_seconds`` to finish (then
    they are cancelled); the port file is removed.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    executor = new_executor(config)
    try:
        server, port, health_servicer = await build_server(config, shard, executor=executor)
        await server.start()
        if config.port_file:
            write_port_file(config.port_file, port)
        _log.info(
            "serving shard %d/%d on %s",
            config.shard_index, config.num_shards, format_address(config.host, port),
        )
        await stop.wait()
        _log.info(
            "shutting down: health NOT_SERVING, draining in-flight calls (grace %.1fs)",
            config.grace_seconds,
        )
        await health_servicer.enter_graceful_shutdown()
        if config.shutdown_delay_seconds:
            await asyncio.sleep(config.shutdown_delay_seconds)
        await server.stop(config.grace_seconds)
        _log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        executor.shutdown(wait=True)
        if config.port_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.port_file)


def run(config: ServerConfig) -> None:
    """Run :func:`serve` on a new event loop (uvloop when installed)."""
    loop_factory: Any = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional off Linux/macOS
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))
