"""End-to-end service benchmark: PsClient against 1, 2 and 4 local shard processes.

For each shard count N it measures, through the public synchronous client:

* ``Table.lookup`` of 65,536 distinct ids x dim 32 (512 KiB of ids up, 8 MiB of rows down);
* ``Table.apply_gradients`` (SGD) of the same batch (8.5 MiB up, an empty answer down);

and reports ids/s, MB/s (request + response payload bytes per second, both from
the median call time), the p50 / p99 latency of one call, and the CPU time one call
costs the client process and the shard processes (less sensitive to other load on
the machine than wall time). The headline is the **ratio to a bare gRPC echo**
moving the same bytes in the same run: N echo processes (``bench/echo_server.py``), each
sent its 1/N share of the request bytes and asked for its 1/N share of the response
bytes, concurrently, from an asyncio loop thread like the client's. The clusters of
every shard count run side by side (idle ones cost nothing) and the calls of all
cases, service and echo, are interleaved round by round, so ratios and scaling
curves compare calls made under the same load. A ratio of 1.0 would mean the
parameter server costs nothing beyond moving the bytes.

Half-size wire: the same lookup and apply on the smallest shard count, with values and
gradients travelling as float32, float16 and bfloat16 (``wire_dtype``), interleaved call
by call; it prints each half form's ids/s against float32's in the same run.

Usage: ``python bench/service_bench.py [--quick] [--shards 1,2,4] [--repeats R]``.
``--quick`` (CI) runs a few repeats per case and finishes in well under a minute.
All processes share this machine's cores, so N shards only scale while cores last;
the load average printed before and after tells whether something else ran too.

Fan-out cost: since these shared cores cannot show N shards running in parallel, the
bench also prints the CPU one call costs summed over every process (client + all
shards) at each shard count against 1 shard's (issue target: <= 1.15x at 4 shards),
each process's share, and the calls/s a machine with one core per process would make
(1 / the busiest process's CPU per call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.echo_server import MAX_MESSAGE_BYTES, METHOD, request_for
from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient
from ps_client.testing import local_cluster

BATCH = 65_536
DIM = 32
MB = 1e6


@dataclass
class Result:
    name: str
    shards: int
    bytes_per_call: int
    latencies: list[float] = field(default_factory=list)
    client_cpus: list[float] = field(default_factory=list)  # CPU s per call, this process
    server_cpus: list[float] = field(default_factory=list)  # CPU s per call, server processes
    shard_cpus: list[list[float]] = field(default_factory=list)  # per call, each server's CPU s

    @property
    def client_cpu(self) -> float:
        return float(np.mean(self.client_cpus))

    @property
    def server_cpu(self) -> float:
        return float(np.mean(self.server_cpus))

    @property
    def total_cpu(self) -> float:
        """Mean CPU seconds per call over every process: client plus all shards."""
        return self.client_cpu + self.server_cpu

    @property
    def busiest_shard_cpu(self) -> float:
        """Mean CPU seconds per call of the busiest server process."""
        if not self.shard_cpus:
            return float("nan")
        return float(np.max(np.mean(np.asarray(self.shard_cpus), axis=0)))

    @property
    def modelled_calls_per_s(self) -> float:
        """Calls/s on a machine with one core per process: the busiest process, client
        or one shard, bounds the rate (1 / its CPU per call)."""
        return 1.0 / max(self.client_cpu, self.busiest_shard_cpu)

    @property
    def typical(self) -> float:
        """The median call time: what rates and ratios use (the mean of a few calls is
        swayed by the scheduling spikes of a shared machine; p99 shows those)."""
        return float(np.median(self.latencies))

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    @property
    def ids_per_s(self) -> float:
        return BATCH / self.typical

    @property
    def mb_per_s(self) -> float:
        return self.bytes_per_call / self.typical / MB


def paired_ratio(service: Result, echo: Result) -> float:
    """Median over rounds of echo time / service time, each service call paired with
    the echo call made right after it: insensitive to the machine getting slower or
    faster during the run (the ratio of medians is not)."""
    return float(np.median(np.asarray(echo.latencies) / np.asarray(service.latencies)))


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by every thread of process ``pid``, at nanosecond
    resolution (``/proc/<pid>/task/*/schedstat``; clock ticks of ``/proc/<pid>/stat``
    are 10 ms, coarser than one call). nan off Linux."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def call_once(result: Result, fn: Callable[[], object], pids: list[int]) -> None:
    """Time one call of ``fn``; add its wall time and the CPU it cost here and in the
    server processes ``pids`` to ``result``."""
    me = os.getpid()
    servers0 = [process_cpu(p) for p in pids]
    cpu0 = process_cpu(me)
    t0 = time.perf_counter()
    fn()
    result.latencies.append(time.perf_counter() - t0)
    result.client_cpus.append(process_cpu(me) - cpu0)
    shards = [process_cpu(p) - c0 for p, c0 in zip(pids, servers0, strict=True)]
    result.shard_cpus.append(shards)
    result.server_cpus.append(sum(shards))


@dataclass
class Case:
    """One timed operation: its calls are interleaved with every other case's."""

    result: Result
    fn: Callable[[], object]
    pids: list[int]


def measure_interleaved(cases: list[Case], warmup: int, repeats: int) -> None:
    """``repeats`` rounds calling every case once, after ``warmup`` rounds: all cases
    (service and echo, every shard count) see the same load from whatever else runs
    on the machine, even when that load changes during the run."""
    for _ in range(warmup):
        for case in cases:
            case.fn()
    for _ in range(repeats):
        for case in cases:
            call_once(case.result, case.fn, case.pids)


def table_config() -> eht.EmbeddingHashTableConfig:
    cfg = eht.EmbeddingHashTableConfig()
    cfg.cuckoo.SetInParent()
    seg = cfg.entry_config.segments.add()
    seg.dim_size = DIM
    seg.init_config.zeros.SetInParent()
    seg.opt_config.sgd.SetInParent()
    seg.comp_config.fp32.SetInParent()
    return cfg


# ---------------------------------------------------------------- echo baseline


@contextlib.contextmanager
def echo_servers(n: int, mode: str = "aio") -> Iterator[list[tuple[str, int]]]:
    """``n`` echo server processes on loopback (``mode``: ``aio`` or ``sync`` server);
    yields their (address, pid)."""
    script = Path(__file__).resolve().parent / "echo_server.py"
    with tempfile.TemporaryDirectory(prefix="echo_") as tmp:
        procs, files = [], []
        try:
            for i in range(n):
                pf = os.path.join(tmp, f"echo_{i}.port")
                files.append(pf)
                procs.append(subprocess.Popen(
                    [sys.executable, str(script), "--port=0", f"--port_file={pf}",
                     f"--mode={mode}"],
                    stdin=subprocess.DEVNULL,
                ))
            ports = []
            for p, pf in zip(procs, files, strict=True):
                deadline = time.monotonic() + 30
                while not os.path.exists(pf):
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"echo server did not start (exit {p.poll()})")
                    time.sleep(0.02)
                ports.append(int(Path(pf).read_text()))
            yield [(f"127.0.0.1:{port}", p.pid) for port, p in zip(ports, procs, strict=True)]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


class EchoClient:
    """aio channels to echo servers, driven from a private loop thread (as PsClient is)."""

    def __init__(self, servers: list[tuple[str, int]]) -> None:
        addresses = [a for a, _ in servers]
        self.pids = [p for _, p in servers]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

        async def build() -> tuple[list[Any], list[Any]]:
            chans = [grpc.aio.insecure_channel(a, options=opts) for a in addresses]
            return [c.unary_unary(METHOD) for c in chans], chans

        self.calls, self.channels = self._run(build())

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def round_trip(self, n: int, up: int, down: int) -> Callable[[], object]:
        """A callable doing one concurrent echo of ``up``/``down`` bytes over ``n`` servers."""
        requests = [request_for(up // n, down // n) for _ in range(n)]

        async def once() -> None:
            await asyncio.gather(*(self.calls[i](requests[i]) for i in range(n)))

        return lambda: self._run(once())

    def close(self) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(c.close() for c in self.channels))

        self._run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


# ---------------------------------------------------------------- cases


OPS = ("lookup", "apply_gradients")


def bench(counts: list[int], stack: contextlib.ExitStack, echo: EchoClient, warmup: int,
          repeats: int) -> list[tuple[Result, Result]]:
    """(service, echo) results of every op at every shard count; one cluster per shard
    count, all up at once so their calls can be interleaved."""
    ids_bytes, rows_bytes = BATCH * 8, BATCH * DIM * 4
    up_down = {"lookup": (ids_bytes, rows_bytes), "apply_gradients": (ids_bytes + rows_bytes, 0)}
    calls: dict[tuple[str, int], tuple[Callable[[], object], list[int]]] = {}
    for n in counts:
        rng = np.random.default_rng(n)
        ids = rng.choice(np.int64(1) << 40, size=BATCH, replace=False).astype(np.int64)
        grads = rng.standard_normal((BATCH, DIM)).astype(np.float32) * np.float32(1e-3)
        cluster = stack.enter_context(local_cluster(n))
        client = stack.enter_context(PsClient(cluster.addresses))
        pids = [p.pid for p in cluster.processes]
        table = client.create_table(table_config(), learning_rate_fns=(0.01,))
        table.assign(ids, grads)
        assert table.lookup(ids[:4]).shape == (4, DIM)
        calls["lookup", n] = (functools.partial(table.lookup, ids), pids)
        calls["apply_gradients", n] = (functools.partial(table.apply_gradients, ids, grads, 1),
                                       pids)
    pairs = []
    for op in OPS:  # one op at a time: lookups and applies differ in what they load
        up, down = up_down[op]
        cases = []
        for n in counts:
            fn, pids = calls[op, n]
            res, base = Result(op, n, up + down), Result(f"echo({op})", n, up + down)
            cases += [Case(res, fn, pids),
                      Case(base, echo.round_trip(n, up, down), echo.pids[:n])]
            pairs.append((res, base))
        measure_interleaved(cases, warmup, repeats)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (CI)")
    parser.add_argument("--shards", default="1,2,4", help="comma-separated shard counts")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per case")
    args = parser.parse_args()
    counts = [int(x) for x in args.shards.split(",")]
    repeats = args.repeats or (8 if args.quick else 100)
    warmup = 2 if args.quick else 5
    print(f"batch {BATCH} ids x dim {DIM} (float32); {os.cpu_count()} CPUs; "
          f"{repeats} timed calls per case after {warmup} warm-up; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    with echo_servers(max(counts)) as echo_addrs, contextlib.ExitStack() as stack:
        echo = EchoClient(echo_addrs)
        try:
            rows = bench(counts, stack, echo, warmup, repeats)
        finally:
            echo.close()
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    head = (f"{'op':<16}{'shards':>6}{'Mids/s':>9}{'MB/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'cpu ms cli+srv':>16}{'echo MB/s':>11}{'echo p50':>10}{'echo cpu':>10}"
            f"{'ratio':>7}{'paired':>8}")
    print(head)
    print("-" * len(head))
    for res, base in rows:
        cpu = f"{res.client_cpu * 1e3:.1f}+{res.server_cpu * 1e3:.1f}"
        echo_cpu = f"{base.client_cpu * 1e3:.1f}+{base.server_cpu * 1e3:.1f}"
        print(f"{res.name:<16}{res.shards:>6}{res.ids_per_s / 1e6:>9.2f}{res.mb_per_s:>9.0f}"
              f"{res.pct(50) * 1e3:>9.2f}{res.pct(99) * 1e3:>9.2f}{cpu:>16}"
              f"{base.mb_per_s:>11.0f}{base.pct(50) * 1e3:>10.2f}{echo_cpu:>10}"
              f"{base.typical / res.typical:>7.2f}{paired_ratio(res, base):>8.2f}")
    print("\nscaling (calls/s relative to 1 process; the echo's own curve shows what the "
          "transport allows on these cores):")
    for name in ("lookup", "apply_gradients"):
        for pick, label in ((0, name), (1, f"echo({name})")):
            mine = [pair[pick] for pair in rows if pair[0].name == name]
            one = next((r for r in mine if r.shards == 1), mine[0])
            curve = "  ".join(f"{r.shards}: {one.typical / r.typical:.2f}x" for r in mine)
            print(f"  {label:<23} {curve}")
    print("\nratio = echo time / service time (medians) for the same bytes over the same "
          "number of processes (1.0 = transport-bound); paired = median of that ratio call by "
          "call (each service call with the echo call after it); Mids/s and MB/s use the "
          "median call time; cpu = mean CPU ms per call in this process + in the server "
          "processes")
    print_targets(rows)
    half_wire(min(counts), warmup, repeats)


WIRE_DTYPES = ("float32", "float16", "bfloat16")


def busiest(res: Result) -> float:
    """CPU seconds per call of the busier side, client or server processes."""
    return max(res.client_cpu, res.server_cpu)


def half_wire(n: int, warmup: int, repeats: int) -> None:
    """Lookup and apply on ``n`` shards with each ``wire_dtype``, calls interleaved:
    ids/s of float16 and bfloat16 against float32's (issue target: lookup >= 1.6x)."""
    rng = np.random.default_rng(99)
    ids = rng.choice(np.int64(1) << 40, size=BATCH, replace=False).astype(np.int64)
    grads = rng.standard_normal((BATCH, DIM)).astype(np.float32) * np.float32(1e-3)
    with local_cluster(n) as cluster, PsClient(cluster.addresses) as client:
        pids = [p.pid for p in cluster.processes]
        table = client.create_table(table_config(), learning_rate_fns=(0.01,))
        table.assign(ids, grads)
        results: dict[tuple[str, str], Result] = {}
        for op in OPS:
            cases = []
            for wire in WIRE_DTYPES:
                item = 4 if wire == "float32" else 2
                floats = BATCH * DIM * item
                res = results[op, wire] = Result(f"{op}[{wire}]", n, BATCH * 8 + floats)
                fn = (functools.partial(table.lookup, ids, wire_dtype=wire) if op == "lookup"
                      else functools.partial(table.apply_gradients, ids, grads, 1,
                                             wire_dtype=wire))
                cases.append(Case(res, fn, pids))
            measure_interleaved(cases, warmup, repeats)
    print(f"\nhalf-size wire, {n} shard(s) (ids/s against float32 in the same run; "
          "cpu ms per call client+server; MB = payload bytes per call):")
    for op in OPS:
        base = results[op, "float32"]
        parts = []
        for wire in WIRE_DTYPES:
            res = results[op, wire]
            parts.append(f"{wire} {res.ids_per_s / 1e6:.2f} Mids/s "
                         f"({res.client_cpu * 1e3:.1f}+{res.server_cpu * 1e3:.1f}, "
                         f"{res.bytes_per_call / MB:.1f} MB)")
        ratios = "  ".join(
            f"{wire}/float32 {base.typical / results[op, wire].typical:.2f}x"
            f" (one core per process: {busiest(base) / busiest(results[op, wire]):.2f}x)"
            for wire in WIRE_DTYPES[1:])
        print(f"  {op:<16} {'; '.join(parts)}")
        print(f"  {'':<16} {ratios}")
    print("  (one core per process = modelled calls/s, 1 / the larger of client and "
          "server CPU per call)")
    got = min(base_t / results["lookup", w].typical
              for w in WIRE_DTYPES[1:] for base_t in [results["lookup", "float32"].typical])
    print(f"target: half-wire lookup ids/s >= 1.6x float32's: {got:.2f}x (the lower of the "
          f"two) -> {'met' if got >= 1.6 else 'NOT met'}")


def print_targets(rows: list[tuple[Result, Result]]) -> None:
    """The issue's targets measured in this run: lookup against the bare echo, and the
    fan-out cost (total CPU per call at 4 shards against 1 shard)."""
    by = {(res.name, res.shards): (res, base) for res, base in rows}
    if ("lookup", 1) in by:
        res, base = by["lookup", 1]
        got = base.typical / res.typical
        print(f"\ntarget: lookup on 1 shard >= 0.5x the bare echo: {got:.2f}x "
              f"(paired {paired_ratio(res, base):.2f}x) -> {'met' if got >= 0.5 else 'NOT met'}")
    print_fan_out(rows)


FAN_OUT_TARGET = 1.15
"""Issue target: total CPU per call at 4 shards <= this x that at 1 shard."""


def print_fan_out(rows: list[tuple[Result, Result]]) -> None:
    """Fan-out cost: CPU per call summed over every process (client + all shards) at
    each shard count and its ratio to 1 shard; each process's share; and the calls/s a
    machine with one core per process would make (1 / the busiest process's CPU per
    call), which these shared cores cannot show as wall time."""
    print("\nfan-out cost (mean CPU ms per call; total = client + every shard; x = total "
          "against 1 shard's; one core per process = modelled calls/s, 1 / the busiest "
          "process's CPU per call):")
    by = {(res.name, res.shards): res for res, _ in rows}
    for op in OPS:
        mine = sorted((r for (name, _), r in by.items() if name == op), key=lambda r: r.shards)
        if not mine:
            continue
        one = by.get((op, 1), mine[0])
        for r in mine:
            per_shard = "/".join(f"{c * 1e3:.1f}" for c in np.mean(np.asarray(r.shard_cpus),
                                                                    axis=0))
            print(f"  {op:<16}{r.shards:>2} shard(s): total {r.total_cpu * 1e3:6.1f} "
                  f"({r.total_cpu / one.total_cpu:.2f}x)  client {r.client_cpu * 1e3:5.1f}  "
                  f"shards {per_shard}  one core per process {r.modelled_calls_per_s:6.0f} "
                  f"calls/s ({r.modelled_calls_per_s / one.modelled_calls_per_s:.2f}x)")
    for op in OPS:
        if (op, 1) in by and (op, 4) in by:
            ratio = by[op, 4].total_cpu / by[op, 1].total_cpu
            print(f"target: {op} total CPU per call at 4 shards <= {FAN_OUT_TARGET}x that at "
                  f"1: {ratio:.2f}x -> {'met' if ratio <= FAN_OUT_TARGET else 'NOT met'}")

if __name__ == "__main__":
    main()
