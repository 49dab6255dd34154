"""gRPC channels to the shards: options, credentials and call metadata.

Channels are ``grpc.aio`` channels, so they must be created inside the event loop
that uses them (:class:`ps_client._core.AsyncPsClient` does so). Retries are not
configured here: the client core retries read-only calls itself (it alone knows
which RPCs are safe to repeat), so gRPC's own transparent retries are turned off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

MAX_MESSAGE_BYTES = 1 << 30
"""Largest request or response a channel accepts (1 GiB); a lookup of 65,536 ids of dim
1,024 is 256 MiB."""


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the shards.

    :param credentials: TLS (or other) channel credentials; None = plaintext.
    :param auth_token: sent as ``authorization: Bearer <token>`` on every call.
    :param max_message_bytes: send and receive limit per message.
    :param keepalive_ms: ping an idle connection this often (ms) to notice a dead shard.
    :param keepalive_timeout_ms: a ping unanswered this long (ms) drops the connection.
    """

    credentials: grpc.ChannelCredentials | None = None
    auth_token: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    keepalive_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000

    def grpc_options(self) -> list[tuple[str, int | str]]:
        """The ``grpc.*`` channel arguments."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # Reconnect quickly to a restarted shard (gRPC's default waits 1 s and more).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata attached to every call."""
        if self.auth_token is None:
            return ()
        return (("authorization", f"Bearer {self.auth_token}"),)


def make_channel(address: str, options: ChannelOptions) -> grpc.aio.Channel:
    """An aio channel to ``address`` (``host:port``); call inside the running loop."""
    opts: Sequence[tuple[str, int | str]] = options.grpc_options()
    if options.credentials is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, options.credentials, options=opts)
