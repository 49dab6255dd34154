"""Configuration of one shard server process.

:class:`ServerConfig` is declared once: its docstring's ``:param name: help`` lines
are the help of the ``python -m ps_server`` flags of the same names (see
``ps_server.__main__``), so every field must keep such a line, on one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ps_server.errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "ServerConfig", "format_address"]

#: gRPC message size limit for requests and responses (256 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# gRPC channel arguments are C ints.
_MAX_GRPC_INT = 2**31 - 1


@dataclass(frozen=True)
class ServerConfig:
    """How one shard process serves.

    :param host: address to listen on (127.0.0.1 = this host only; 0.0.0.0 or :: for all
        interfaces).
    :param port: TCP port to listen on; 0 picks a free port (see port_file).
    :param shard_index: which shard this process is, in [0, num_shards).
    :param num_shards: how many shards the cluster has (an id belongs to shard
        floormod(id, num_shards)).
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
    """

    host: str = "127.0.0.1"
    port: int = 50051
    shard_index: int = 0
    num_shards: int = 1
    port_file: str = ""
    data_root: str = ""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 0
    grace_seconds: float = 20.0
    shutdown_delay_seconds: float = 0.0

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
