"""Run one shard as a gRPC server: build, serve, drain on SIGTERM/SIGINT.

The server carries four services: ``monolith_ps.ParameterServer``
(:mod:`ps_server.service`), ``monolith_ps.ParameterServerAdmin``
(:mod:`ps_server.admin`), the standard ``grpc.health.v1.Health`` and server
reflection (``grpcurl`` works without protos). Health: ``""`` is SERVING while the
process lives (liveness); ``monolith_ps.ParameterServer`` is readiness, NOT_SERVING
while a restore runs, after an admin Drain and once shutdown begins (probe either
with ``grpc_health_probe`` or a Kubernetes ``grpc`` probe).

Beside the gRPC server, :class:`ShardServer` runs the Prometheus endpoint
(``metrics_port``, :mod:`ps_server.metrics`) and periodic eviction of the tables
whose config sets ``enable_feature_eviction`` (checked every
``eviction_check_seconds``).

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import ps_service_pb2_grpc as ps_grpc
from ps_server import reflection
from ps_server.admin import ADMIN_SERVICE_NAME, AdminServicer
from ps_server.config import ServerConfig, format_address
from ps_server.engine import EvictionScheduler, Shard, ShardLimits
from ps_server.errors import ConfigError
from ps_server.guards import BatchLimitGuard, DrainGate, MalformedRequestGuard
from ps_server.interception import combine
from ps_server.ledger import RequestLedger
from ps_server.lifecycle import ShardOps
from ps_server.locks import ShardLocks
from ps_server.metrics import (
    MetricsServer,
    RpcMetricsInterceptor,
    ShardMetrics,
    start_metrics_server,
)
from ps_server.runtime import ShardRuntime
from ps_server.security import TokenAuthInterceptor, load_tokens, server_credentials
from ps_server.service import SERVICE_NAME, ParameterServerServicer, add_servicer_to_server

__all__ = [
    "ShardServer",
    "build_server",
    "build_shard_server",
    "evict_due_tables",
    "new_executor",
    "run",
    "serve",
    "write_port_file",
]

_log = logging.getLogger(__name__)


def new_executor(config: ServerConfig) -> concurrent.futures.ThreadPoolExecutor:
    """The thread pool engine work runs on (``config.worker_threads`` threads)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=config.worker_threads,
        thread_name_prefix=f"shard{config.shard_index}-worker",
    )


class _GenericOnly:
    """What the generated ``add_*Servicer_to_server`` helpers see of a server: their
    handlers are added as generic handlers only.

    grpc.aio's server keeps one pending call request per *registered* method and
    waits on all of them (``asyncio.wait``) for every call it accepts: with the
    ~30 methods of our services registered, that wait cost more per call than all
    our interceptors together. Generic handlers answer the same methods with the same
    handlers (and the same ``UNIMPLEMENTED`` for unknown ones) from one request.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Ignored: ``add_generic_rpc_handlers`` received the same handlers."""


@dataclass
class ShardServer:
    """A built shard server and what runs beside it; :meth:`start`, then :meth:`stop`.

    :ivar server: the bound gRPC server.
    :ivar port: its bound port.
    :ivar health: the ``grpc_health.v1.health.aio.HealthServicer``.
    :ivar runtime: the shard's executor, locks, ledger, paths and operations.
    :ivar servicer: the data-plane servicer; ``admin`` the ops-plane one.
    :ivar ops: readiness, drain gate and operation history.
    :ivar metrics: the shard's Prometheus metrics (served only with ``metrics_port``).
    """

    config: ServerConfig
    shard: Shard
    server: grpc.aio.Server
    port: int
    health: Any
    runtime: ShardRuntime
    servicer: ParameterServerServicer
    admin: AdminServicer
    ops: ShardOps
    metrics: ShardMetrics
    metrics_server: MetricsServer | None = None
    _eviction: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Start serving gRPC, then metrics (``metrics_port``) and periodic eviction.

        :raises ConfigError: the metrics port cannot be bound (gRPC is stopped again).
        """
        await self.server.start()
        config = self.config
        if config.metrics_port:
            try:
                self.metrics_server = start_metrics_server(
                    self.metrics, config.host, config.metrics_port,
                    certfile=config.tls_cert_file, keyfile=config.tls_key_file,
                    client_cafile=config.tls_client_ca_file,
                )
            except ConfigError:
                await self.server.stop(0)
                raise
            _log.info("metrics on %s://%s/metrics", "https" if config.tls_cert_file else "http",
                      format_address(config.host, self.metrics_server.port))
        if config.eviction_check_seconds > 0:
            self._eviction = asyncio.get_running_loop().create_task(
                _periodic_eviction(self.runtime, config.eviction_check_seconds),
                name=f"shard{config.shard_index}-eviction",
            )

    async def stop(self, grace: float | None) -> None:
        """Stop eviction, the gRPC server (``grace`` seconds for running calls, as
        ``grpc.aio.Server.stop``) and the metrics endpoint."""
        if self._eviction is not None:
            self._eviction.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._eviction
            self._eviction = None
        try:
            await self.server.stop(grace)
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
                self.metrics_server = None


async def build_shard_server(
    config: ServerConfig,
    shard: Shard | None = None,
    *,
    executor: concurrent.futures.Executor | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> ShardServer:
    """A bound, not yet started :class:`ShardServer` for ``shard`` (new if None).

    Call inside the running loop, then ``await shard_server.start()``. Health
    reports SERVING for ``""`` and both services from the start.

    :param executor: thread pool for engine work; the caller owns it and shuts it
        down after stopping. None: a new pool of ``config.worker_threads`` threads
        that lives as long as the process.
    :param interceptors: more server interceptors, innermost (after metrics, the
        token check, the drain gate and the request guards); tests inject faults here.
    :raises ConfigError: the shard does not match the config, or the address
        cannot be bound.
    """
    limits = ShardLimits(max_entries_per_shard=config.max_entries_per_shard,
                         max_bytes_per_shard=config.max_bytes_per_shard)
    if shard is None:
        shard = Shard(config.shard_index, config.num_shards, limits=limits)
    elif (shard.shard_index, shard.num_shards) != (config.shard_index, config.num_shards):
        raise ConfigError(
            f"shard is {shard.shard_index}/{shard.num_shards} but the config says "
            f"{config.shard_index}/{config.num_shards}"
        )
    if limits.enabled:
        shard.set_limits(limits)
    shard.allow_non_finite = config.allow_non_finite
    credentials = server_credentials(config)
    tokens = load_tokens(config)
    health_servicer = health.aio.HealthServicer()
    metrics = ShardMetrics(shard)
    ops = ShardOps(shard, health_servicer, metrics=metrics)
    limit = config.max_message_bytes
    # Metrics outermost, so refused calls are counted too; then the token check, so an
    # unauthenticated caller learns nothing (not even that the shard drains) and its
    # request is never parsed.
    chain: list[grpc.aio.ServerInterceptor] = [RpcMetricsInterceptor(metrics)]
    if tokens.any:
        chain.append(TokenAuthInterceptor(tokens))
    chain += [DrainGate(ops), MalformedRequestGuard()]
    if config.max_ids_per_request:
        chain.append(BatchLimitGuard(config.max_ids_per_request))
    chain += interceptors
    server = grpc.aio.server(
        interceptors=combine(chain),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Two servers on one fixed port must fail, not share the traffic.
            ("grpc.so_reuseport", 0),
        ],
    )
    runtime = ShardRuntime(
        shard,
        executor if executor is not None else new_executor(config),
        data_root=config.data_root,
        max_message_bytes=limit,
        locks=ShardLocks(),
        events=ops,
        ledger=RequestLedger(config.ledger_window, config.ledger_max_clients,
                             config.ledger_max_bytes),
        default_filter_capacity=config.default_filter_capacity,
        default_filter_split_num=config.default_filter_split_num,
        cluster_id=config.cluster_id,
    )
    metrics.watch_ledger(runtime.ledger)
    servicer = ParameterServerServicer(runtime)
    admin = AdminServicer(runtime, ops, grace_seconds=config.grace_seconds)
    add_servicer_to_server(servicer, server)
    generic = _GenericOnly(server)
    ps_grpc.add_ParameterServerAdminServicer_to_server(admin, generic)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic)
    for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {config.address}: {e}") from e
    if port == 0:
        raise ConfigError(f"cannot listen on {config.address} (address in use or invalid)")
    return ShardServer(
        config=config, shard=shard, server=server, port=port, health=health_servicer,
        runtime=runtime, servicer=servicer, admin=admin, ops=ops, metrics=metrics,
    )


async def build_server(
    config: ServerConfig,
    shard: Shard | None = None,
    *,
    executor: concurrent.futures.Executor | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int, Any]:
    """The gRPC part of :func:`build_shard_server` (no metrics endpoint, no periodic
    eviction): ``(server, bound_port, health_servicer)``; ``await server.start()``.
    """
    built = await build_shard_server(config, shard, executor=executor,
                                     interceptors=interceptors)
    return built.server, built.port, built.health


# ---------------------------------------------------------------- eviction


async def evict_due_tables(
    runtime: ShardRuntime,
    schedulers: dict[tuple[str, int], EvictionScheduler],
    now: float,
) -> list[str]:
    """One periodic-eviction check: evict the tables whose schedule says so.

    A table gets an :class:`EvictionScheduler` (kept in ``schedulers``, keyed by name
    and table identity) when its config sets ``enable_feature_eviction``; its first
    check only starts its period. Schedulers of tables gone are dropped.

    :returns: the tables evicted.
    """
    live: dict[tuple[str, int], EvictionScheduler] = {}
    due: list[str] = []
    for name, slot in sorted(list(runtime.shard.tables.items())):
        key = (name, id(slot.table))
        scheduler = schedulers.get(key) or EvictionScheduler.for_table(slot.table.config)
        if scheduler is None:
            continue
        live[key] = scheduler
        if scheduler.tick(now):
            due.append(name)
    schedulers.clear()
    schedulers.update(live)
    if due:
        await runtime.evict(due, "periodic")
    return due


async def _periodic_eviction(runtime: ShardRuntime, every_seconds: float) -> None:
    schedulers: dict[tuple[str, int], EvictionScheduler] = {}
    while True:
        try:
            await evict_due_tables(runtime, schedulers, time.time())
        except asyncio.CancelledError:
            raise
        except Exception:  # keep checking; the next period may succeed
            _log.exception("periodic eviction failed")
        await asyncio.sleep(every_seconds)


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
    they are cancelled); periodic eviction and the metrics endpoint stop; the port
    file is removed.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    executor = new_executor(config)
    try:
        built = await build_shard_server(config, shard, executor=executor)
        await built.start()
        if config.port_file:
            write_port_file(config.port_file, built.port)
        _log_security(config)
        _log.info(
            "serving shard %d/%d on %s",
            config.shard_index, config.num_shards, format_address(config.host, built.port),
        )
        if config.cluster_id:
            _log.info("cluster id %r", config.cluster_id)
        else:
            _log.info("no cluster id yet: the first client to connect gives one")
        await stop.wait()
        _log.info(
            "shutting down: health NOT_SERVING, draining in-flight calls (grace %.1fs)",
            config.grace_seconds,
        )
        await built.health.enter_graceful_shutdown()
        if config.shutdown_delay_seconds:
            await asyncio.sleep(config.shutdown_delay_seconds)
        await built.stop(config.grace_seconds)
        _log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        executor.shutdown(wait=True)
        if config.port_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.port_file)


def _log_security(config: ServerConfig) -> None:
    tls = ("mutual TLS" if config.tls_client_ca_file else "TLS") if config.tls_cert_file else (
        "plaintext")
    data = bool(config.data_token or config.data_token_file)
    admin = bool(config.admin_token or config.admin_token_file)
    _log.info("%s; data-plane token %s; admin token %s", tls,
              "required" if data else "not checked", "required" if admin else "not checked")
    if config.host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return
    gaps = []
    if not config.tls_cert_file:
        gaps.append("traffic is plaintext (--tls_cert_file, --tls_key_file)")
    if not admin:
        gaps.append("anyone who reaches the port may call the admin service "
                    "(--admin_token_file)")
    if not data:
        gaps.append("anyone who reaches the port may read and write tables "
                    "(--data_token_file)")
    if gaps:
        _log.warning("listening on %s, but %s", config.host, "; ".join(gaps))


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
