"""Real shard servers on loopback for integration tests.

* :func:`start_inprocess_server` / fixture ``server``: a server built with
  :func:`ps_server.server.build_server` on ``127.0.0.1:0``, running on one shared
  background event-loop thread, with a blocking client stub (``server.stub``).
* :func:`start_server_process`: ``python -m ps_server`` as a subprocess with a port
  file; its stderr is collected so a test can wait for a log line.

Both talk real gRPC; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from protos import ps_service_pb2_grpc as ps_grpc
from ps_server.config import ServerConfig
from ps_server.engine.shard import Shard
from ps_server.server import build_server

REPO = Path(__file__).resolve().parents[2]
#: Client-side limits well above any server limit, so the server's are what is tested.
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]

_T = TypeVar("_T")


class _LoopThread:
    """One event loop on a daemon thread, shared by every in-process server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="test-servers-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop_thread: _LoopThread | None = None


def _shared_loop() -> _LoopThread:
    global _loop_thread
    if _loop_thread is None:
        _loop_thread = _LoopThread()
    return _loop_thread


@dataclass
class RunningServer:
    """A started in-process shard server and a blocking client for it."""

    config: ServerConfig
    shard: Shard
    port: int
    channel: grpc.Channel
    stub: ps_grpc.ParameterServerStub
    health: health_pb2_grpc.HealthStub
    health_servicer: Any
    _grpc_server: Any = field(repr=False, default=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def start_inprocess_server(
    shard: Shard | None = None, **config_fields: Any
) -> Iterator[RunningServer]:
    """Start a shard server on ``127.0.0.1:0`` in this process; stop it on exit.

    :param shard: state to serve (default: a new empty shard of the config).
    :param config_fields: :class:`ServerConfig` fields (``port`` is always 0).
    """
    config = ServerConfig(**{"host": "127.0.0.1", "workers": 4, **config_fields, "port": 0})
    if shard is None:
        shard = Shard(config.shard_index, config.num_shards)
    runner = _shared_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.worker_threads)

    async def start() -> tuple[Any, int, Any]:
        srv, port, health = await build_server(config, shard, executor=executor)
        await srv.start()
        return srv, port, health

    srv, port, health = runner.run(start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    try:
        yield RunningServer(
            config=config,
            shard=shard,
            port=port,
            channel=channel,
            stub=ps_grpc.ParameterServerStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
            health_servicer=health,
            _grpc_server=srv,
        )
    finally:
        channel.close()
        runner.run(srv.stop(0))
        executor.shutdown(wait=True)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A fresh single-shard in-process server (shard 0 of 1)."""
    with start_inprocess_server() as s:
        yield s


@pytest.fixture
def stub(server: RunningServer) -> ps_grpc.ParameterServerStub:
    """Blocking ParameterServer stub of the ``server`` fixture."""
    return server.stub


# ---------------------------------------------------------------- subprocess


@dataclass
class ServerProcess:
    """``python -m ps_server`` running as a child process."""

    proc: subprocess.Popen[str]
    port_file: Path
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first stderr line matching ``pattern`` (waits for it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(
                        f"no log line matching {pattern!r}; stderr so far:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.2))

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)


@contextlib.contextmanager
def start_server_process(
    tmp_path: Path, *flags: str, startup_timeout: float = 60.0, prelude: str = ""
) -> Iterator[ServerProcess]:
    """Start ``python -m ps_server --port=0 --port_file=...`` and wait for the port file
    (written once the server serves; ``startup_timeout`` is only a safety net).

    :param flags: extra flags, e.g. ``"--shard_index=1", "--num_shards=2"``.
    :param prelude: Python code the child runs before the server's ``main`` (a test
        hook, e.g. one that holds engine work until an event).
    The process is killed on exit if still running.
    """
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    program = (["-c", f"{prelude}\nfrom ps_server.__main__ import main\nmain()\n"]
               if prelude else ["-m", "ps_server"])
    proc = subprocess.Popen(
        [sys.executable, *program, "--port=0", "--host=127.0.0.1",
         f"--port_file={port_file}", *flags],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    sp = ServerProcess(proc=proc, port_file=port_file)
    threading.Thread(target=sp._pump, daemon=True).start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"ps_server exited with {proc.returncode} before serving:\n"
                    + "\n".join(sp.lines)
                )
            if time.monotonic() > deadline:
                raise AssertionError("ps_server wrote no port file in time:\n"
                                     + "\n".join(sp.lines))
            time.sleep(0.02)
        sp.port = int(port_file.read_text().strip())
        yield sp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
