"""A bare gRPC echo server: the transport baseline of ``bench/service_bench.py``.

Serves one generic (proto-less) unary method, ``/bench.Echo/Reply``: the request is
``8-byte little-endian reply size`` followed by any payload; the answer is that many
bytes. So one call moves exactly the bytes a Lookup or ApplyGradients RPC moves in
each direction, with no decoding, no numpy and no table work. ``--mode=aio`` (the
default) runs on ``grpc.aio`` (with uvloop when installed), like the shards;
``--mode=sync`` on grpcio's synchronous server (a thread pool). ``bench/trainer_bench.py``
measures both and takes the faster as its baseline.

Usage: ``python bench/echo_server.py --port=0 --port_file=/tmp/echo.port [--mode=sync]``;
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import signal
import struct
import threading
from typing import Any

import grpc

METHOD = "/bench.Echo/Reply"
MAX_MESSAGE_BYTES = 1 << 30


def request_for(payload_bytes: int, reply_bytes: int) -> bytes:
    """A request carrying ``payload_bytes`` (plus the 8-byte header) that asks for
    ``reply_bytes`` back."""
    return struct.pack("<q", reply_bytes) + bytes(max(0, payload_bytes - 8))


class _Replies:
    """Cached zero buffers so the server does no work beyond gRPC's."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def get(self, n: int) -> bytes:
        buf = self._cache.get(n)
        if buf is None:
            buf = self._cache[n] = bytes(n)
        return buf


_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def _write_port(port_file: str, bound: int) -> None:
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(bound))
        os.replace(tmp, port_file)


def serve_sync(host: str, port: int, port_file: str) -> None:
    """The same echo on grpcio's synchronous server."""
    replies = _Replies()

    def reply(request: bytes, context: Any) -> bytes:
        (n,) = struct.unpack_from("<q", request)
        return replies.get(n)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Reply": grpc.unary_unary_rpc_method_handler(reply)}
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _write_port(port_file, bound)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(1.0).wait()


async def serve(host: str, port: int, port_file: str) -> None:
    replies = _Replies()

    async def reply(request: bytes, context: Any) -> bytes:
        (n,) = struct.unpack_from("<q", request)
        return replies.get(n)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Reply": grpc.unary_unary_rpc_method_handler(reply)}
    )
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _write_port(port_file, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port_file", default="")
    parser.add_argument("--mode", choices=("aio", "sync"), default="aio")
    args = parser.parse_args()
    if args.mode == "sync":
        serve_sync(args.host, args.port, args.port_file)
        return
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
