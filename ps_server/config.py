"""Configuration of one shard server process.

:class:`ServerConfig` is declared once: :func:`ps_server.gflags_utils.extract_flags`
turns its fields and its docstring's ``:param name: help`` lines into the
``python -m ps_server`` / ``ps-server`` flags of the same names, defaults and help
(docs/architecture.md decision 8), so every field must keep such a line (continuation lines
are fine) and a plain ``int``/``float``/``str``/``bool`` type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ps_server.engine import DEFAULT_CAPACITY, DEFAULT_SPLIT_NUM
from ps_server.errors import ConfigError
from ps_server.ledger import DEFAULT_LEDGER_BYTES, DEFAULT_LEDGER_CLIENTS, DEFAULT_LEDGER_WINDOW

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CLUSTER_ID_CHARS",
    "ServerConfig",
    "cluster_id_problem",
    "format_address",
]

#: gRPC message size limit for requests and responses (256 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# gRPC channel arguments are C ints.
_MAX_GRPC_INT = 2**31 - 1
#: Longest cluster id a shard accepts (flag or JoinCluster).
MAX_CLUSTER_ID_CHARS = 128


@dataclass(frozen=True)
class ServerConfig:
    """How one shard process serves.

    :param host: address to listen on (127.0.0.1 = this host only; 0.0.0.0 or :: for all
        interfaces).
    :param port: TCP port to listen on; 0 picks a free port (see port_file).
    :param shard_index: which shard this process is, in [0, num_shards).
    :param num_shards: how many shards the cluster has (an id belongs to shard
        floormod(id, num_shards)).
    :param cluster_id: the cluster this shard belongs to (printable, at most 128
        characters); clients and ps-admin refuse a list of addresses that are not
        exactly one cluster's shards in index order. "" = adopt the id the first
        client gives (a new one for a fresh cluster).
    :param port_file: once serving, write the bound port (decimal) to this file atomically
        ("" = none); removed again on a clean exit.
    :param data_root: if set, every save/restore path must resolve inside this directory and
        relative paths are taken under it ("" = any path is allowed).
    :param max_message_bytes: largest request or response message in bytes (gRPC send and
        receive limit).
    :param workers: threads running table work (0 = min(32, CPUs + 4)).
    :param grace_seconds: on SIGTERM/SIGINT, how long in-flight calls may run before they are
        cancelled.
    :param shutdown_delay_seconds: on SIGTERM/SIGINT, how long to keep serving with health
        NOT_SERVING before refusing new calls (lets load balancers notice).
    :param metrics_port: port of the Prometheus endpoint (plain HTTP, GET /metrics) on host;
        0 = no metrics endpoint.
    :param eviction_check_seconds: how often to look at the tables whose config sets
        enable_feature_eviction; each is evicted of its expired entries every
        feature_evict_every_n_hours (0 = no periodic eviction).
    :param default_filter_capacity: capacity of a sliding hash filter whose CreateHashFilter
        request leaves capacity at 0.
    :param default_filter_split_num: split count of a sliding hash filter whose
        CreateHashFilter request leaves split_num at 0.
    :param tls_cert_file: PEM server certificate chain: gRPC and the metrics endpoint then
        speak TLS only ("" = plaintext); needs tls_key_file.
    :param tls_key_file: PEM private key of tls_cert_file.
    :param tls_client_ca_file: PEM CA bundle; when set, every client (gRPC and metrics
        scrapers) must present a certificate signed by it (mutual TLS).
    :param data_token: bearer token ("authorization: Bearer <token>" metadata) every call
        of the ParameterServer service must carry ("" = no check); the admin token is
        accepted there too. Prefer data_token_file: flags show in the process list.
    :param data_token_file: file holding data_token (surrounding whitespace dropped; ""
        = none).
    :param admin_token: bearer token every call of the ParameterServerAdmin service must
        carry ("" = no check); the data token there is PERMISSION_DENIED. Health and
        reflection need no token.
    :param admin_token_file: file holding admin_token (surrounding whitespace dropped;
        "" = none).
    :param max_entries_per_shard: most entries the shard holds over all its tables; a
        write whose new ids would pass it is refused with RESOURCE_EXHAUSTED and changes
        nothing (0 = no limit; restores are not limited).
    :param max_bytes_per_shard: most entry payload bytes (values, optimizer state,
        timestamp and id of every entry) the shard holds, refused as max_entries_per_shard
        (0 = no limit).
    :param max_ids_per_request: most ids one data-plane request may carry (lookups, writes,
        fused calls); more is RESOURCE_EXHAUSTED (0 = no limit; max_message_bytes caps
        the bytes).
    :param ledger_window: how many recent tagged updates (client id, sequence number) the
        shard remembers per client, to answer a client's retry without applying it twice.
    :param ledger_max_clients: how many clients' recent updates the shard remembers (the
        least recently seen client is forgotten first).
    :param ledger_max_bytes: memory the remembered updates may take, answers included (the
        oldest are forgotten first).
    :param allow_non_finite: accept NaN and infinity in written values, gradients and
        learning rates; by default such a write is refused with INVALID_ARGUMENT naming
        its first bad row and changes nothing (one NaN makes a row and its optimizer
        state NaN for good).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    shard_index: int = 0
    num_shards: int = 1
    cluster_id: str = ""
    port_file: str = ""
    data_root: str = ""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 0
    grace_seconds: float = 20.0
    shutdown_delay_seconds: float = 0.0
    metrics_port: int = 0
    eviction_check_seconds: float = 10.0
    default_filter_capacity: int = DEFAULT_CAPACITY
    default_filter_split_num: int = DEFAULT_SPLIT_NUM
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    data_token: str = field(default="", repr=False)
    data_token_file: str = ""
    admin_token: str = field(default="", repr=False)
    admin_token_file: str = ""
    max_entries_per_shard: int = 0
    max_bytes_per_shard: int = 0
    max_ids_per_request: int = 0
    ledger_window: int = DEFAULT_LEDGER_WINDOW
    ledger_max_clients: int = DEFAULT_LEDGER_CLIENTS
    ledger_max_bytes: int = DEFAULT_LEDGER_BYTES
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty (use 127.0.0.1, 0.0.0.0 or ::)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.num_shards < 1:
            raise ConfigError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}"
            )
        problem = cluster_id_problem(self.cluster_id)
        if problem:
            raise ConfigError(f"cluster_id {problem}")
        if not 0 < self.max_message_bytes <= _MAX_GRPC_INT:
            raise ConfigError(
                f"max_message_bytes must be in [1, {_MAX_GRPC_INT}], got {self.max_message_bytes}"
            )
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.grace_seconds < 0 or self.shutdown_delay_seconds < 0:
            raise ConfigError(
                "grace_seconds and shutdown_delay_seconds must be >= 0, got "
                f"{self.grace_seconds} and {self.shutdown_delay_seconds}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(
                f"metrics_port and port must differ, both are {self.port}"
            )
        if self.eviction_check_seconds < 0:
            raise ConfigError(
                f"eviction_check_seconds must be >= 0 (0 = off), got {self.eviction_check_seconds}"
            )
        if self.default_filter_capacity < 1 or self.default_filter_split_num < 1:
            raise ConfigError(
                "default_filter_capacity and default_filter_split_num must be >= 1, got "
                f"{self.default_filter_capacity} and {self.default_filter_split_num}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                              "tls_key_file")
        if self.data_token and self.data_token_file:
            raise ConfigError("set data_token or data_token_file, not both")
        if self.admin_token and self.admin_token_file:
            raise ConfigError("set admin_token or admin_token_file, not both")
        for name in ("max_entries_per_shard", "max_bytes_per_shard", "max_ids_per_request"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = no limit), got {getattr(self, name)}")
        for name in ("ledger_window", "ledger_max_clients", "ledger_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def address(self) -> str:
        """``host:port`` as gRPC expects it (IPv6 hosts bracketed)."""
        return format_address(self.host, self.port)

    @property
    def worker_threads(self) -> int:
        """The number of worker threads ``workers`` stands for."""
        return self.workers or min(32, (os.cpu_count() or 1) + 4)


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing a bare IPv6 host (``::1`` → ``[::1]:port``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def cluster_id_problem(cluster_id: str) -> str:
    """What is wrong with ``cluster_id`` ("" when nothing: printable, at most
    :data:`MAX_CLUSTER_ID_CHARS` characters; empty is fine)."""
    if len(cluster_id) > MAX_CLUSTER_ID_CHARS:
        return f"must be at most {MAX_CLUSTER_ID_CHARS} characters, got {len(cluster_id)}"
    if not cluster_id.isprintable():
        return f"must be printable, got {cluster_id!r}"
    return ""
