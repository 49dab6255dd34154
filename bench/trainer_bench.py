"""The trainer's round trip: the sync ``Table`` API against a plain grpcio echo.

A trainer calls the synchronous :class:`ps_client.Table` from its own process. This
bench is that process: it fills a 1,000,000 x 32 SGD table on 1 and 2 local
``ps-server`` processes, then times

* ``Table.lookup`` of 65,536 random (distinct) ids of the table, and
* ``Table.apply_gradients`` (SGD) of the same ids,

against the fastest bare grpcio echo of the same request and response bytes it can
make in the same run: a *sync* grpc client (one ``future()`` per server, as a plain
fan-out does) calling echo servers that return fixed bytes (``bench/echo_server.py``)
on grpcio's synchronous server and on ``grpc.aio``; the faster variant per case is the
baseline. ``bench/service_bench.py``'s own echo (an aio client on a loop thread) runs
too, so its baseline can be compared with the plain one.

Printed per case: p50 latency, client CPU per call (this process, every thread: CPU
time, not wall), shard CPU per call (the server processes, from
``/proc/<pid>/task/*/schedstat``), and ours / echo for time (echo p50 / our p50, so
1.0 = as fast as the echo) and for client CPU (our CPU / echo CPU). All cases are
interleaved round by round, so they see the same load.

Against TFRA: when the side venv ``.venv-tfra`` exists (``bash scripts/tfra_venv.sh``:
TensorFlow 2.16.2 + TensorFlow Recommenders-Addons 0.8.1; the project never depends on
TensorFlow) or ``--tfra PYTHON`` names an interpreter that has them, the bench also times
three trainer workloads through the sync ``Table`` API -- ``lookup``, an SGD step
(``lookup`` + ``apply_gradients``) and an Adagrad step (the same on a second, Adagrad,
table) -- and runs ``bench/tfra_peer.py`` with that interpreter for the same workloads on
TFRA dynamic-embedding tables placed on 1 and 2 local TensorFlow ps tasks, called from a
worker over TensorFlow's gRPC runtime (same table size, dim, batch, optimizers and
learning rate; both sides warm). It prints ours / TFRA per workload and shard count
(TFRA p50 / our p50: above 1 = we are faster). The peer serves one call per request
(``--rounds``, timed inside the peer), so its calls interleave with ours round by round
and see the same load. ``--quick`` skips it unless ``--tfra`` is given, so CI needs no
TensorFlow.

Usage: ``python bench/trainer_bench.py [--quick] [--shards 1,2] [--repeats R]
[--tfra PYTHON | --no-tfra]``; ``--quick`` (CI) finishes well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.echo_server import MAX_MESSAGE_BYTES, METHOD, request_for
from bench.service_bench import (
    Case,
    EchoClient,
    Result,
    echo_servers,
    measure_interleaved,
    paired_ratio,
    table_config,
)
from ps_client import PsClient
from ps_client.testing import local_cluster
from ps_server.engine import configs

BATCH = 65_536
DIM = 32
ROWS = 1_000_000
FILL_BATCH = 1 << 17
OPS = ("lookup", "apply_gradients")
ECHO_MODES = ("sync", "aio")
LEARNING_RATE = 0.01
ADAGRAD_INITIAL_ACCUMULATOR = 0.1
TFRA_WORKLOADS = ("lookup", "sgd_step", "adagrad_step")
ROOT = Path(__file__).resolve().parents[1]
TFRA_VENV_PYTHON = ROOT / ".venv-tfra" / "bin" / "python"


class SyncEcho:
    """A plain sync grpcio client of echo servers: one call per server, fanned out
    with ``future()`` when there are several."""

    def __init__(self, servers: list[tuple[str, int]]) -> None:
        self.pids = [p for _, p in servers]
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.channels = [grpc.insecure_channel(a, options=opts) for a, _ in servers]
        self.calls = [c.unary_unary(METHOD) for c in self.channels]

    def round_trip(self, n: int, up: int, down: int) -> Callable[[], object]:
        requests = [request_for(up // n, down // n) for _ in range(n)]
        calls = self.calls[:n]
        if n == 1:
            return functools.partial(calls[0], requests[0])

        def once() -> None:
            futures = [c.future(r) for c, r in zip(calls, requests, strict=True)]
            for f in futures:
                f.result()

        return once

    def close(self) -> None:
        for c in self.channels:
            c.close()


def fill(table: object, rng: np.random.Generator) -> np.ndarray:
    """Fill ``table`` with ROWS random ids; returns them."""
    ids = rng.choice(np.int64(1) << 40, size=ROWS, replace=False).astype(np.int64)
    for start in range(0, ROWS, FILL_BATCH):
        part = ids[start:start + FILL_BATCH]
        vals = rng.standard_normal((part.shape[0], DIM)).astype(np.float32)
        table.assign(part, vals)  # type: ignore[attr-defined]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (CI)")
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per case")
    parser.add_argument("--tfra", default="", metavar="PYTHON",
                        help="python with TF 2.16.2 + TFRA 0.8.1 (default: .venv-tfra's, "
                             "if it exists and not --quick)")
    parser.add_argument("--no-tfra", action="store_true", help="skip the TFRA comparison")
    args = parser.parse_args()
    tfra_python = tfra_interpreter(args.tfra, args.quick, args.no_tfra)
    counts = [int(x) for x in args.shards.split(",")]
    repeats = args.repeats or (8 if args.quick else 40)
    warmup = 2 if args.quick else 5
    print(f"trainer round trip: sync Table API, {ROWS:,} x {DIM} table, batch {BATCH} ids; "
          f"{os.cpu_count()} CPUs; {repeats} timed calls per case after {warmup} warm-up; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    ids_bytes, rows_bytes = BATCH * 8, BATCH * DIM * 4
    up_down = {"lookup": (ids_bytes, rows_bytes), "apply_gradients": (ids_bytes + rows_bytes, 0)}
    n_max = max(counts)
    with contextlib.ExitStack() as stack:
        echoes: dict[str, SyncEcho] = {}
        for mode in ECHO_MODES:
            echoes[mode] = SyncEcho(stack.enter_context(echo_servers(n_max, mode)))
            stack.callback(echoes[mode].close)
        loop_echo = EchoClient(stack.enter_context(echo_servers(n_max)))
        stack.callback(loop_echo.close)
        ours: dict[tuple[str, int], tuple[Callable[[], object], list[int]]] = {}
        trainer: dict[int, Trainer] = {}
        for n in counts:
            rng = np.random.default_rng(n)
            cluster = stack.enter_context(local_cluster(n))
            client = stack.enter_context(PsClient(cluster.addresses))
            table = client.create_table(table_config(), learning_rate_fns=(0.01,))
            ids = fill(table, rng)
            batch = rng.choice(ids, size=BATCH, replace=False)
            grads = rng.standard_normal((BATCH, DIM)).astype(np.float32) * np.float32(1e-3)
            pids = [p.pid for p in cluster.processes]
            ours["lookup", n] = (functools.partial(table.lookup, batch), pids)
            ours["apply_gradients", n] = (
                functools.partial(table.apply_gradients, batch, grads, 1), pids)
            trainer[n] = Trainer(client, table, ids, batch, grads, pids)
        rows: list[tuple[Result, dict[str, Result]]] = []
        for op in OPS:
            up, down = up_down[op]
            cases: list[Case] = []
            for n in counts:
                fn, pids = ours[op, n]
                mine = Result(op, n, up + down)
                bases: dict[str, Result] = {}
                cases.append(Case(mine, fn, pids))
                for mode, echo in echoes.items():
                    bases[mode] = Result(f"echo {mode}", n, up + down)
                    cases.append(Case(bases[mode], echo.round_trip(n, up, down), echo.pids[:n]))
                bases["service_bench"] = Result("echo service_bench", n, up + down)
                cases.append(Case(bases["service_bench"], loop_echo.round_trip(n, up, down),
                                  loop_echo.pids[:n]))
                rows.append((mine, bases))
            measure_interleaved(cases, warmup, repeats)
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
        report(rows)
        if tfra_python is None:
            print("\nTFRA comparison skipped: run `bash scripts/tfra_venv.sh` (or pass "
                  "--tfra PYTHON) and run without --quick to compare with TFRA 0.8.1.")
            return
        compare_tfra(tfra_python, trainer, warmup, repeats)


def tfra_interpreter(flag: str, quick: bool, off: bool) -> str | None:
    """The python that runs ``bench/tfra_peer.py``, or None to skip the comparison."""
    if off:
        return None
    if flag:
        return flag
    if not quick and TFRA_VENV_PYTHON.exists():
        return str(TFRA_VENV_PYTHON)
    return None


class Trainer:
    """One shard count's cluster, SGD table and batch, as the trainer workloads use them."""

    def __init__(self, client: PsClient, table: object, ids: np.ndarray, batch: np.ndarray,
                 grads: np.ndarray, pids: list[int]) -> None:
        self.client, self.table, self.ids = client, table, ids
        self.batch, self.grads, self.pids = batch, grads, pids

    def workloads(self, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
        """lookup, SGD step and Adagrad step (on a second table, filled like the first)."""
        ada = self.client.create_table(
            configs.table_config(DIM, optimizer=configs.adagrad(ADAGRAD_INITIAL_ACCUMULATOR)),
            learning_rate_fns=(LEARNING_RATE,))
        ada_ids = fill(ada, rng)
        ada_batch = rng.choice(ada_ids, size=BATCH, replace=False)
        table, batch, grads = self.table, self.batch, self.grads

        def step(t: object, b: np.ndarray) -> None:
            t.lookup(b)  # type: ignore[attr-defined]
            t.apply_gradients(b, grads, 1)  # type: ignore[attr-defined]

        return {"lookup": functools.partial(table.lookup, batch),  # type: ignore[attr-defined]
                "sgd_step": functools.partial(step, table, batch),
                "adagrad_step": functools.partial(step, ada, ada_batch)}


class Peer:
    """``bench/tfra_peer.py --rounds`` on ``n_ps`` ps tasks: one call per request, timed
    by the peer itself (ms), so its calls interleave with ours round by round."""

    def __init__(self, python: str, n_ps: int) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [python, str(ROOT / "bench" / "tfra_peer.py"), "--ps", str(n_ps), "--rounds"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        for line in self.stdout:  # TFRA prints notes on stdout while it loads
            if line.startswith("{") and json.loads(line).get("ready"):
                return
        self.log.seek(0)
        tail = "\n    ".join(self.log.read().strip().splitlines()[-5:])
        raise RuntimeError(f"tfra_peer --ps {n_ps} failed (exit {self.proc.wait()}):\n"
                           f"    {tail}")

    def call(self, workload: str) -> float:
        """One call of ``workload``; its time in seconds."""
        self.stdin.write(workload + "\n")
        self.stdin.flush()
        return float(self.stdout.readline()) / 1e3

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def compare_tfra(python: str, trainer: dict[int, Trainer], warmup: int, repeats: int) -> None:
    """Our three trainer workloads and the TFRA peer's at each shard count, interleaved
    round by round (every case once per round)."""
    print(f"\nagainst TFRA ({python}): lookup, SGD step (lookup + apply_gradients), Adagrad "
          f"step; {repeats} timed calls each after {warmup} warm-up")
    mine: dict[tuple[str, int], Result] = {}
    cases: list[Case] = []
    for n, t in trainer.items():
        for w, fn in t.workloads(np.random.default_rng(100 + n)).items():
            mine[w, n] = Result(w, n, 0)
            cases.append(Case(mine[w, n], fn, t.pids))
    theirs: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        peers: dict[int, Peer] = {}
        for n in trainer:
            try:
                peers[n] = Peer(python, n)
            except (OSError, RuntimeError) as exc:
                print(f"  {exc}")
                continue
            stack.callback(peers[n].close)
        for n, peer in peers.items():
            for w in TFRA_WORKLOADS:
                theirs[w, n] = []
                cases.append(Case(Result(f"tfra {w}", n, 0), functools.partial(
                    lambda p, w_, out: out.append(p.call(w_)), peer, w, theirs[w, n]), []))
        measure_interleaved(cases, warmup, repeats)
    head = f"{'workload':<14}{'shards':>7}{'ours p50 ms':>13}{'TFRA p50 ms':>13}{'ours/TFRA':>11}"
    print(head)
    print("-" * len(head))
    for w in TFRA_WORKLOADS:
        for n in trainer:
            ours_ms = mine[w, n].pct(50) * 1e3
            if (w, n) not in theirs:
                print(f"{w:<14}{n:>7}{ours_ms:>13.2f}{'-':>13}{'-':>11}")
                continue
            tfra_ms = float(np.median(theirs[w, n][-repeats:])) * 1e3
            print(f"{w:<14}{n:>7}{ours_ms:>13.2f}{tfra_ms:>13.2f}{tfra_ms / ours_ms:>10.2f}x")
    print("ours/TFRA = TFRA p50 / our p50 (above 1 = faster than TFRA; issue 15 target: "
          ">= 1.5x on every workload at 1 and 2 shards)")


def report(rows: list[tuple[Result, dict[str, Result]]]) -> None:
    head = (f"{'case':<34}{'shards':>6}{'p50 ms':>9}{'cli cpu ms':>11}{'shard cpu ms':>13}"
            f"{'time x':>8}{'paired':>8}{'cli cpu x':>10}")
    print(head)
    print("-" * len(head))
    targets = []
    for mine, bases in rows:
        plain = {k: v for k, v in bases.items() if k in ECHO_MODES}
        best_mode = min(plain, key=lambda k: plain[k].typical)
        best = plain[best_mode]
        for label, res in [(mine.name, mine)] + [
                (f"  {r.name}{' (baseline)' if k == best_mode else ''}", r)
                for k, r in bases.items()]:
            print(f"{label:<34}{res.shards:>6}{res.pct(50) * 1e3:>9.2f}"
                  f"{res.client_cpu * 1e3:>11.2f}{res.server_cpu * 1e3:>13.2f}"
                  f"{best.typical / res.typical:>8.2f}{paired_ratio(res, best):>8.2f}"
                  f"{res.client_cpu / best.client_cpu:>10.2f}")
        sb = bases["service_bench"]
        print(f"  service_bench echo / plain echo p50: {sb.typical / best.typical:.2f}x")
        targets.append((mine, best))
    print("\ntime x = baseline p50 / this p50 (1.0 = as fast as the plain echo); paired = the "
          "median of that ratio call by call; cli cpu x = this client CPU / the baseline's")
    print("\ntargets (issue 15 item 1):")
    for mine, best in targets:
        t = best.typical / mine.typical
        c = mine.client_cpu / best.client_cpu
        print(f"  {mine.name:<16} {mine.shards} shard(s): time {t:.2f}x (>= 0.6: "
              f"{'met' if t >= 0.6 else 'NOT met'}), client cpu {c:.2f}x (<= 1.5: "
              f"{'met' if c <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"\n({time.monotonic() - start:.0f} s)")
