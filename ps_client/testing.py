"""``local_cluster``: real shard processes on loopback, for tests, demos and benchmarks.

Each shard is its own ``python -m ps_server`` process bound to port 0 on
127.0.0.1; it writes the port it got to a port file, which is read back (no port is
picked in advance, so there is no race for it). On exit every process gets SIGTERM,
then SIGKILL after a grace period.

Example::

    with local_cluster(3) as cluster, PsClient(cluster.addresses) as client:
        table = client.create_table(config)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_GRACE = 10.0


class ClusterStartError(RuntimeError):
    """A shard process did not come up; the message carries its stderr."""


def _flag(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


class LocalCluster:
    """Shard processes of one local cluster.

    :ivar addresses: ``127.0.0.1:<port>`` of each shard, in shard order.
    :ivar processes: the ``subprocess.Popen`` of each shard.
    :ivar workdir: directory holding port files and each shard's stderr log.
    """

    def __init__(
        self,
        num_shards: int,
        workdir: Path,
        server_options: dict[str, Any],
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_grace: float = DEFAULT_STOP_GRACE,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.num_shards = num_shards
        self.workdir = workdir
        self.server_options = dict(server_options)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.processes: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self._ports: list[int] = []

    # ------------------------------------------------------------ processes

    def _port_file(self, i: int) -> Path:
        return self.workdir / f"shard_{i}.port"

    def _log_file(self, i: int) -> Path:
        return self.workdir / f"shard_{i}.stderr"

    def _spawn(self, i: int, port: int) -> subprocess.Popen[bytes]:
        port_file = self._port_file(i)
        port_file.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "ps_server", f"--port={port}", f"--port_file={port_file}",
            "--host=127.0.0.1", f"--shard_index={i}", f"--num_shards={self.num_shards}",
            *(_flag(k, v) for k, v in sorted(self.server_options.items())),
        ]
        with open(self._log_file(i), "ab") as log:
            return subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=_child_env(), start_new_session=True,
            )

    def _wait_port(self, i: int) -> int:
        proc = self.processes[i]
        port_file = self._port_file(i)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if port_file.exists():
                text = port_file.read_text().strip()
                if text:
                    return int(text)
            if proc.poll() is not None:
                raise ClusterStartError(
                    f"shard {i} exited with code {proc.returncode} before serving; its "
                    f"output:\n{self.stderr(i)}"
                )
            time.sleep(0.02)
        raise ClusterStartError(
            f"shard {i} wrote no port file within {self.start_timeout:.0f}s; its "
            f"output:\n{self.stderr(i)}"
        )

    def start(self) -> None:
        """Start every shard and wait until each serves."""
        self.processes = [self._spawn(i, 0) for i in range(self.num_shards)]
        self._ports = [self._wait_port(i) for i in range(self.num_shards)]
        self.addresses = [f"127.0.0.1:{p}" for p in self._ports]

    def stderr(self, i: int) -> str:
        """What shard ``i`` logged so far (the last 20,000 characters)."""
        try:
            return self._log_file(i).read_text(errors="replace")[-20_000:]
        except OSError:
            return "(no output)"

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) to shard ``i`` and wait for it to exit."""
        proc = self.processes[i]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def terminate(self, i: int) -> int:
        """Stop shard ``i`` gracefully (SIGTERM; SIGKILL after the grace period).

        :returns: its exit code.
        """
        self.kill(i, signal.SIGTERM)
        return int(self.processes[i].returncode)

    def restart(self, i: int) -> None:
        """Start shard ``i`` again on its old port (killing it first if it runs).

        Its state is gone (unless a checkpoint is restored); clients reconnect by
        themselves.
        """
        self.kill(i)
        self.processes[i] = self._spawn(i, self._ports[i])
        self._ports[i] = self._wait_port(i)
        self.addresses[i] = f"127.0.0.1:{self._ports[i]}"

    def stop(self) -> None:
        """SIGTERM every shard, then SIGKILL whatever is still running after the grace."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _child_env() -> dict[str, str]:
    """The environment of a shard: ours, with this checkout importable first."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def local_cluster(
    num_shards: int = 2,
    *,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    stop_grace: float = DEFAULT_STOP_GRACE,
    **server_options: Any,
) -> Iterator[LocalCluster]:
    """Start ``num_shards`` shard processes on 127.0.0.1 (port 0) and stop them on exit.

    :param server_options: extra server flags, e.g. ``data_root="/tmp/x"`` becomes
        ``--data_root=/tmp/x`` (booleans become ``--name`` / ``--noname``).
    :param start_timeout: seconds each shard has to write its port file.
    :param stop_grace: seconds between SIGTERM and SIGKILL on exit.
    :yields: a :class:`LocalCluster` (``.addresses``, ``.processes``, ``.kill(i)``,
        ``.restart(i)``, ``.terminate(i)``, ``.stderr(i)``).
    :raises ClusterStartError: a shard exited or wrote no port file in time (the
        message includes its output).
    """
    with tempfile.TemporaryDirectory(prefix="ps_local_cluster_") as tmp:
        cluster = LocalCluster(
            num_shards, Path(tmp), server_options, start_timeout=start_timeout,
            stop_grace=stop_grace,
        )
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
