"""Prometheus metrics of one shard (``prometheus-client``), served on ``--metrics_port``.

Every series is prefixed ``monolith_ps_``. Each shard process has its own
:class:`~prometheus_client.CollectorRegistry` (in-process test servers do not mix),
holding:

RPCs (:class:`RpcMetricsInterceptor`, every unary RPC of every service):
    ``monolith_ps_rpcs_total{service, method, code}``                 counter
    ``monolith_ps_rpc_duration_seconds{service, method, code}``        histogram
    ``monolith_ps_rpcs_in_flight{service}``                            gauge
Tables and filters (read from the :class:`Shard` at scrape time, no locks, like
``GetShardInfo``):
    ``monolith_ps_table_entries{table}``, ``monolith_ps_table_memory_bytes{table}``,
    ``monolith_ps_hash_filter_fill_ratio{hash_filter}``,
    ``monolith_ps_hash_filter_failures{hash_filter}`` (a gauge: a restored filter
    brings its own count), ``monolith_ps_shard_info{shard_index, num_shards, version}``
Operations (pushed by :class:`ps_server.admin.ShardOps`):
    ``monolith_ps_evicted_entries_total{table, trigger}``             counter
    ``monolith_ps_checkpoint_duration_seconds{op}``                    histogram
    ``monolith_ps_checkpoint_size_bytes{op}``                          histogram
    ``monolith_ps_checkpoint_entries{op}``                             histogram
    ``monolith_ps_checkpoint_failures_total{op}``                      counter
    ``monolith_ps_last_checkpoint_timestamp_seconds{op}``              gauge (last success)
    ``monolith_ps_restoring``, ``monolith_ps_draining``                gauges (0/1)
Exactly-once updates (read from the shard's :class:`~ps_server.ledger.RequestLedger`
at scrape time, once :meth:`ShardMetrics.watch_ledger` was called):
    ``monolith_ps_replayed_requests_total{method}``   counter: retries answered from
    the ledger, not applied again
    ``monolith_ps_stale_requests_total``              counter: refused as older than
    their client's window
    ``monolith_ps_request_ledger_records``, ``monolith_ps_request_ledger_bytes``,
    ``monolith_ps_request_ledger_clients``            gauges
plus the library's ``process_*``, ``python_gc_*`` and ``python_info`` series.
``op`` is ``save`` | ``commit`` | ``restore`` | ``validate``; ``trigger`` is
``admin`` | ``periodic``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

import ps_server
from ps_server.config import format_address
from ps_server.engine import Shard
from ps_server.errors import ConfigError
from ps_server.interception import WrappingInterceptor
from ps_server.ledger import RequestLedger

__all__ = [
    "CHECKPOINT_OPS",
    "LedgerCollector",
    "MetricsServer",
    "RpcMetricsInterceptor",
    "ShardCollector",
    "ShardMetrics",
    "start_metrics_server",
]

_log = logging.getLogger(__name__)

CHECKPOINT_OPS = ("save", "commit", "restore", "validate")

# Engine calls take from well under a millisecond (small lookups) to minutes (huge
# batches, whole checkpoints over gRPC).
_RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)
_CHECKPOINT_SECONDS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
_CHECKPOINT_BYTES = tuple(float(1 << k) for k in range(10, 42, 3))  # 1 KiB .. 2 TiB
_CHECKPOINT_ENTRIES = tuple(float(10**k) for k in range(0, 11))


class ShardCollector(Collector):
    """Table and filter gauges read from a :class:`Shard` when Prometheus scrapes.

    Runs on the HTTP server's thread while the engine works on others: the values
    are a snapshot that may race concurrent writes (sizes are single reads).
    """

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        info, entries, memory, fill, failures = self._families()
        described = self._shard.describe()
        info.add_metric(
            [str(described.shard_index), str(described.num_shards), ps_server.__version__], 1.0
        )
        for table in described.tables:
            entries.add_metric([table.name], float(table.size))
            memory.add_metric([table.name], float(table.memory_bytes))
        for flt in described.filters:
            fill.add_metric([flt.name], flt.fill_ratio)
            failures.add_metric([flt.name], float(flt.failure_count))
        yield from (info, entries, memory, fill, failures)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "monolith_ps_shard_info", "This shard's place in the cluster (value 1).",
                labels=["shard_index", "num_shards", "version"],
            ),
            GaugeMetricFamily(
                "monolith_ps_table_entries", "Entries held by a table on this shard.",
                labels=["table"],
            ),
            GaugeMetricFamily(
                "monolith_ps_table_memory_bytes",
                "Bytes of storage held by a table on this shard (values, optimizer state, "
                "timestamps, index).",
                labels=["table"],
            ),
            GaugeMetricFamily(
                "monolith_ps_hash_filter_fill_ratio",
                "Occupied cells over capacity of a sliding hash filter (0 for other kinds).",
                labels=["hash_filter"],
            ),
            GaugeMetricFamily(
                "monolith_ps_hash_filter_failures",
                "Ids a sliding hash filter could not place (Monolith's failure_count).",
                labels=["hash_filter"],
            ),
        )


class LedgerCollector(Collector):
    """Replay counters and size gauges of a :class:`RequestLedger`, read at scrape time.

    Runs on the HTTP server's thread while the event loop changes the ledger: the
    values are a snapshot (each a single read or a dict copy).
    """

    def __init__(self, ledger: RequestLedger) -> None:
        self._ledger = ledger

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        replayed, stale, records, nbytes, clients = self._families()
        ledger = self._ledger
        for method, count in sorted(ledger.replayed.items()):
            replayed.add_metric([method], float(count))
        stale.add_metric([], float(ledger.refused))
        records.add_metric([], float(ledger.records))
        nbytes.add_metric([], float(ledger.nbytes))
        clients.add_metric([], float(ledger.clients))
        yield from (replayed, stale, records, nbytes, clients)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily | GaugeMetricFamily, ...]:
        return (
            CounterMetricFamily(
                "monolith_ps_replayed_requests",
                "Retried mutating requests answered from the request ledger without being "
                "applied again, by method.",
                labels=["method"],
            ),
            CounterMetricFamily(
                "monolith_ps_stale_requests",
                "Tagged requests refused as older than their client's ledger window "
                "(they may have been applied already).",
            ),
            GaugeMetricFamily(
                "monolith_ps_request_ledger_records",
                "Outcomes of tagged requests the shard remembers.",
            ),
            GaugeMetricFamily(
                "monolith_ps_request_ledger_bytes",
                "Memory the remembered outcomes take, as counted against ledger_max_bytes.",
            ),
            GaugeMetricFamily(
                "monolith_ps_request_ledger_clients",
                "Clients whose recent requests the shard remembers.",
            ),
        )


class ShardMetrics:
    """Every metric of one shard, in its own registry.

    :param shard: read at scrape time by a :class:`ShardCollector`.
    :param process_metrics: also register the process / GC / platform collectors.
    """

    def __init__(self, shard: Shard, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.rpcs = Counter(
            "monolith_ps_rpcs", "RPCs handled, by service, method and status code.",
            ["service", "method", "code"], registry=reg,
        )
        self.rpc_seconds = Histogram(
            "monolith_ps_rpc_duration_seconds",
            "Time from receiving a request to its answer, by service, method and code.",
            ["service", "method", "code"], buckets=_RPC_BUCKETS, registry=reg,
        )
        self.rpcs_in_flight = Gauge(
            "monolith_ps_rpcs_in_flight", "RPCs being handled now, by service.",
            ["service"], registry=reg,
        )
        self.evicted_entries = Counter(
            "monolith_ps_evicted_entries",
            "Expired entries deleted from memory, by table and trigger (admin, periodic).",
            ["table", "trigger"], registry=reg,
        )
        self.checkpoint_seconds = Histogram(
            "monolith_ps_checkpoint_duration_seconds",
            "Duration of successful checkpoint operations on this shard, by op.",
            ["op"], buckets=_CHECKPOINT_SECONDS, registry=reg,
        )
        self.checkpoint_bytes = Histogram(
            "monolith_ps_checkpoint_size_bytes",
            "Bytes of the files a successful checkpoint operation wrote or read, by op.",
            ["op"], buckets=_CHECKPOINT_BYTES, registry=reg,
        )
        self.checkpoint_entries = Histogram(
            "monolith_ps_checkpoint_entries",
            "Table entries saved, or held after a restore, by op.",
            ["op"], buckets=_CHECKPOINT_ENTRIES, registry=reg,
        )
        self.checkpoint_failures = Counter(
            "monolith_ps_checkpoint_failures", "Checkpoint operations that failed, by op.",
            ["op"], registry=reg,
        )
        self.last_checkpoint = Gauge(
            "monolith_ps_last_checkpoint_timestamp_seconds",
            "Unix time when the last successful checkpoint operation of each op ended.",
            ["op"], registry=reg,
        )
        self.restoring = Gauge(
            "monolith_ps_restoring", "1 while a restore runs (readiness NOT_SERVING).",
            registry=reg,
        )
        self.draining = Gauge(
            "monolith_ps_draining", "1 once an admin Drain was received.", registry=reg,
        )
        # Labelled children of rpcs / rpc_seconds, looked up once per label set.
        self._rpc_children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        reg.register(ShardCollector(shard))
        if process_metrics:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

    def observe_rpc(self, service: str, method: str, code: grpc.StatusCode,
                    seconds: float) -> None:
        """Count one handled RPC and its latency."""
        key = (service, method, code)
        children = self._rpc_children.get(key)
        if children is None:
            labels = (service, method, code.name)
            children = (self.rpcs.labels(*labels), self.rpc_seconds.labels(*labels))
            self._rpc_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_checkpoint(self, op: str, *, seconds: float, nbytes: int, entries: int,
                           ok: bool) -> None:
        """One checkpoint operation ended (``ok`` False: only the failure is counted)."""
        if not ok:
            self.checkpoint_failures.labels(op).inc()
            return
        self.checkpoint_seconds.labels(op).observe(seconds)
        self.checkpoint_bytes.labels(op).observe(nbytes)
        self.checkpoint_entries.labels(op).observe(entries)
        self.last_checkpoint.labels(op).set(time.time())

    def observe_eviction(self, table: str, trigger: str, count: int) -> None:
        """``count`` entries were evicted from ``table``."""
        self.evicted_entries.labels(table, trigger).inc(count)

    def watch_ledger(self, ledger: RequestLedger) -> None:
        """Export ``ledger``'s counters and sizes (:class:`LedgerCollector`); call once."""
        self.registry.register(LedgerCollector(ledger))

    def set_state(self, *, restoring: bool, draining: bool) -> None:
        """The shard's readiness inputs."""
        self.restoring.set(1.0 if restoring else 0.0)
        self.draining.set(1.0 if draining else 0.0)


_Handler = Callable[[Any, Any], Awaitable[Any]]


class RpcMetricsInterceptor(WrappingInterceptor):
    """Counts and times every unary RPC by ``service``, ``method`` and status ``code``.

    The code is what the handler ended with: ``OK``, the code it aborted with, or
    ``CANCELLED`` / ``UNKNOWN`` when it was cancelled or raised. Streaming RPCs
    (health Watch, reflection) pass through uncounted.
    """

    def __init__(self, metrics: ShardMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:
            return handler
        service, _, method = full_method.lstrip("/").rpartition("/")
        inner: _Handler = handler.unary_unary
        metrics = self._metrics
        in_flight = metrics.rpcs_in_flight.labels(service)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            in_flight.inc()
            try:
                response = await inner(request, context)
                code = _code_of(context, default=grpc.StatusCode.OK)
                return response
            except grpc.aio.AbortError:
                code = _code_of(context, default=grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                in_flight.dec()
                metrics.observe_rpc(service, method, code, time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_of(context: Any, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # some grpc versions give the integer value
        if candidate.value[0] == code:
            return candidate
    return default


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (prometheus-client's WSGI server thread)."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def start_metrics_server(
    metrics: ShardMetrics,
    host: str,
    port: int,
    *,
    certfile: str = "",
    keyfile: str = "",
    client_cafile: str = "",
) -> MetricsServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` from a daemon thread.

    :param certfile: PEM certificate chain: serve HTTPS instead ("" = plain HTTP);
        needs ``keyfile``. Each connection's TLS handshake runs on its own thread
        with a time limit, so a client that never finishes one blocks nobody.
    :param client_cafile: PEM CA bundle: scrapers must present a certificate it signed.
    :raises ConfigError: the address cannot be bound, or the TLS files not loaded.
    """
    try:
        if certfile:
            httpd, thread = _start_https_server(
                metrics.registry, host, port, certfile, keyfile, client_cafile
            )
        else:
            httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise ConfigError(
            f"cannot serve metrics on {format_address(host, port)}: {e}"
        ) from e
    return MetricsServer(httpd, thread)


#: Seconds a metrics connection may take for its TLS handshake and each read.
_TLS_CONNECTION_TIMEOUT = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = _TLS_CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape is noise


def _start_https_server(
    registry: CollectorRegistry, host: str, port: int, certfile: str, keyfile: str,
    client_cafile: str,
) -> tuple[Any, threading.Thread]:
    """Like ``prometheus_client.start_http_server`` with TLS, except that the handshake
    runs on the connection's thread (prometheus-client's does it in the accept loop,
    where one silent client stalls every scrape)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    if client_cafile:
        context.load_verify_locations(client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

        def get_request(self) -> tuple[Any, Any]:
            conn, addr = self.socket.accept()
            conn.settimeout(_TLS_CONNECTION_TIMEOUT)
            return context.wrap_socket(conn, server_side=True,
                                       do_handshake_on_connect=False), addr

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                request.do_handshake()
            except (OSError, ValueError):  # not TLS, bad or no client certificate, timeout
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)

    httpd = make_server(host, port, make_wsgi_app(registry), Server, _QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True,
                              name="metrics-https")
    thread.start()
    return httpd, thread
