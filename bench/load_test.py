"""Load test: concurrent trainers against a local cluster, then an exactly-once audit.

``--clients`` trainer threads (default 16; each its own :class:`PsClient`, as 16
trainer processes would be, driven from threads of this process) run against
``--shards`` local shard processes (default 4) until a deadline (``--seconds``,
default 20; ``--quick`` 8). Each loop draws one operation at random:

* ``lookup`` of any table;
* ``sgd`` / ``sgd_dedup``: ``apply_gradients`` on the shared SGD table;
* ``adagrad`` / ``adagrad_dedup``: ``apply_gradients`` on the Adagrad table;
* ``assign_add`` on the shared counter table.

Ids are Zipf distributed (exponent 1.1), so every client hits the same hot ids of
the shared tables at once. Every operation is logged (ids, gradient numerators,
step, start/end time, success).

**Audit.** The successful updates of the log are replayed on in-process
:class:`EmbeddingHashTable` s of the same configs and every touched id is compared
bit for bit (``lookup_entry`` bytes: values, optimizer state, timestamp), along
with the table sizes. The concurrent interleaving is unknown, so the updates are
chosen so that the final state does not depend on it:

* SGD with learning rate ``2^-3`` and gradients ``k * 2^-10`` (``|k| <= 8``) and
  ``assign_add`` of ``k * 2^-8``: every partial sum is a multiple of a power of two
  far inside float32's exact range, so addition is exact, hence associative and
  commutative — the final value is ``initial - lr * sum(g)`` in any order.
* Adagrad is order dependent, so each client owns a disjoint id range of that
  table: the order of the updates of one id is its client's program order, which
  the log records; the replay keeps it.

Each table's last column is a *tally*: every row update adds exactly one unit to it
(SGD: gradient ``-2^-10`` at learning rate ``2^-3``, i.e. ``+2^-13``; counter:
``+1``; the Adagrad table has a 1-wide SGD segment for it). The tally of an id
counts the updates that landed on it, so ``lost`` (logged, not on the server) and
``doubled`` (on the server more often than logged) are counted in row updates.

``--inject-double`` sends one logged update to the cluster a second time (unlogged)
and ``--inject-lost`` makes the reference apply one logged update twice (the server
then looks one update short): both exist to show that the audit can fail.

Exit code 0 iff the audit passes; 3 if the hard timeout (``--hard-timeout``) fires.
The hard timeout counts from the moment every shard reports SERVING (its gRPC
health); the start-up has its own limit (:data:`START_LIMIT` seconds).
The last line printed is a one-line summary.

Usage: ``python bench/load_test.py [--quick] [--seconds S] [--clients C] [--shards N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protos import embedding_hash_table_pb2 as eht
from ps_client import PsClient, Table
from ps_client.testing import LocalCluster, local_cluster
from ps_server.checkpoint.entry_dump import lookup_entry
from ps_server.engine import configs
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.healthcheck import probe

ZIPF_EXPONENT = 1.1
SHARED_RANKS = 1 << 16
"""Distinct ids of the shared tables (Zipf ranks)."""
OWN_RANKS = 1 << 12
"""Distinct ids of each client's range of the Adagrad table."""
MAX_BATCH = 256
MAX_K = 8
"""Gradient / increment numerators are integers in ``[-MAX_K, MAX_K]``."""
AUDIT_CHUNK = 65_536
START_LIMIT = 60.0
"""Seconds the shards have to start and report SERVING (a safety net)."""
MAX_CONSECUTIVE_FAILURES = 20

OP_WEIGHTS: dict[str, float] = {
    "lookup": 0.40,
    "sgd": 0.15,
    "sgd_dedup": 0.10,
    "adagrad": 0.10,
    "adagrad_dedup": 0.05,
    "assign_add": 0.20,
}
UPDATE_KINDS = tuple(k for k in OP_WEIGHTS if k != "lookup")


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableDef:
    """One table of the test and how its updates are made.

    :ivar scale: gradients (or increments) sent are ``units * scale``, exact in float32.
    :ivar tally_unit: ``units`` of the tally column (last) in every update row.
    :ivar tally_step: what one row update adds to the tally column's value.
    :ivar own_ids: each client updates only its own id range (order-dependent optimizer).
    """

    name: str
    config: eht.EmbeddingHashTableConfig
    learning_rates: tuple[float, ...]
    scale: float
    tally_unit: int
    tally_step: float
    own_ids: bool

    @property
    def dim(self) -> int:
        return sum(int(s.dim_size) for s in self.config.entry_config.segments)


def table_defs() -> dict[str, TableDef]:
    """The three tables: shared SGD, per-client-range Adagrad (+ SGD tally), shared counter."""
    sgd_lr, g_scale = 2.0**-3, 2.0**-10
    return {
        "sgd": TableDef(
            "load_sgd", configs.table_config(8, optimizer=configs.sgd()), (sgd_lr,),
            g_scale, -1, sgd_lr * g_scale, own_ids=False,
        ),
        "adagrad": TableDef(
            "load_adagrad",
            configs.table_config(segments=[
                configs.segment(4, configs.adagrad(initial_accumulator_value=0.1)),
                configs.segment(1, configs.sgd()),
            ]),
            (2.0**-4, sgd_lr), g_scale, -1, sgd_lr * g_scale, own_ids=True,
        ),
        "counter": TableDef(
            "load_counter", configs.table_config(4, optimizer=configs.sgd()), (1.0,),
            2.0**-8, 256, 1.0, own_ids=False,
        ),
    }


KIND_TABLE = {
    "sgd": "sgd", "sgd_dedup": "sgd", "adagrad": "adagrad", "adagrad_dedup": "adagrad",
    "assign_add": "counter",
}


# ---------------------------------------------------------------- ids


class IdSampler:
    """Zipf-distributed ids: rank ``r`` (1 = hottest) has weight ``r**-a``.

    Ranks become ids through a bijective 64-bit mix, so hot ids spread over shards
    and half of them are negative (``floormod`` routing).
    """

    def __init__(self, ranks: int, exponent: float = ZIPF_EXPONENT) -> None:
        weights = np.arange(1, ranks + 1, dtype=np.float64) ** -exponent
        self.cdf: npt.NDArray[np.float64] = np.cumsum(weights) / weights.sum()

    def ranks(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        idx = np.searchsorted(self.cdf, rng.random(n), side="right")
        return np.minimum(idx, self.cdf.size - 1).astype(np.int64)


def mix_ids(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Bijective scramble of int64 keys (multiplication by an odd constant mod 2**64)."""
    out: npt.NDArray[np.int64] = (
        keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ).view(np.int64)
    return out


# ---------------------------------------------------------------- log


@dataclass
class Op:
    """One RPC a client sent.

    :ivar units: int16 ``[len(ids), dim]`` numerators; the payload was ``units * scale``
        (None for lookups).
    """

    kind: str
    table: str
    ids: npt.NDArray[np.int64]
    units: npt.NDArray[np.int16] | None
    step: int
    t0: float = 0.0
    t1: float = 0.0
    ok: bool = False
    error: str = ""

    @property
    def dedup(self) -> bool:
        return self.kind.endswith("_dedup")

    def payload(self, scale: float) -> npt.NDArray[np.float32]:
        assert self.units is not None
        return self.units.astype(np.float32) * np.float32(scale)


@dataclass
class ClientLog:
    index: int
    ops: list[Op] = field(default_factory=list)
    crash: str = ""


def send(tables: dict[str, Table], defs: dict[str, TableDef], op: Op, req_time: int) -> None:
    """Issue ``op`` through the client's table handles."""
    table = tables[op.table]
    if op.kind == "lookup":
        table.lookup(op.ids)
    elif op.kind == "assign_add":
        table.assign_add(op.ids, op.payload(defs[op.table].scale), req_time=req_time)
    else:
        table.apply_gradients(
            op.ids, op.payload(defs[op.table].scale), op.step, enable_dedup=op.dedup,
            req_time=req_time,
        )


def replay(ref: dict[str, EmbeddingHashTable], defs: dict[str, TableDef], op: Op,
           req_time: int) -> None:
    """Apply the successful update ``op`` to the in-process reference tables."""
    d = defs[op.table]
    if op.kind == "assign_add":
        ref[op.table].assign_add(op.ids, op.payload(d.scale), req_time=req_time)
    else:
        ref[op.table].apply_gradients(
            op.ids, op.payload(d.scale), list(d.learning_rates), op.step,
            enable_dedup=op.dedup, req_time=req_time,
        )


# ---------------------------------------------------------------- clients


@dataclass
class Plan:
    """What every client shares: tables, id samplers, the start line and the deadline."""

    addresses: list[str]
    defs: dict[str, TableDef]
    seed: int
    req_time: int
    start: threading.Barrier
    deadline: list[float]
    shared: IdSampler = field(default_factory=lambda: IdSampler(SHARED_RANKS))
    own: IdSampler = field(default_factory=lambda: IdSampler(OWN_RANKS))

    def own_ids(self, client: int, ranks: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return mix_ids(np.int64(client) * OWN_RANKS + ranks)


def make_op(plan: Plan, client: int, rng: np.random.Generator, step: int) -> Op:
    kinds = list(OP_WEIGHTS)
    p = np.array(list(OP_WEIGHTS.values()))
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    n = int(rng.integers(1, MAX_BATCH + 1))
    key = str(rng.choice(list(plan.defs))) if kind == "lookup" else KIND_TABLE[kind]
    d = plan.defs[key]
    ids = (plan.own_ids(client, plan.own.ranks(rng, n)) if d.own_ids
           else mix_ids(plan.shared.ranks(rng, n)))
    if kind == "lookup":
        return Op(kind, key, ids, None, step)
    units = rng.integers(-MAX_K, MAX_K + 1, size=(n, d.dim)).astype(np.int16)
    units[:, -1] = d.tally_unit
    return Op(kind, key, ids, units, step)


def run_client(plan: Plan, log: ClientLog) -> None:
    """One trainer: its own PsClient, random operations until the deadline."""
    rng = np.random.default_rng([plan.seed, log.index])
    try:
        with PsClient(plan.addresses, timeout=30.0) as client:
            tables = {
                k: client.table(d.name, learning_rate_fns=d.learning_rates)
                for k, d in plan.defs.items()
            }
            plan.start.wait()
            failures = 0
            step = 0
            while time.monotonic() < plan.deadline[0]:
                step += 1
                op = make_op(plan, log.index, rng, step)
                log.ops.append(op)
                op.t0 = time.perf_counter()
                try:
                    send(tables, plan.defs, op, plan.req_time)
                    op.ok = True
                    failures = 0
                except Exception as e:  # logged, counted and reported as a failed RPC
                    op.error = f"{type(e).__name__}: {e}"
                    failures += 1
                op.t1 = time.perf_counter()
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    log.crash = f"{failures} consecutive failures, last: {op.error}"
                    return
    except BaseException as e:  # a client that cannot run at all fails the test
        log.crash = f"{type(e).__name__}: {e}"
        plan.start.abort()


# ---------------------------------------------------------------- audit


@dataclass
class TableAudit:
    name: str
    ids: int
    mismatched: int
    lost: int
    doubled: int
    size_server: int
    size_reference: int
    logged_rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.mismatched == 0 and self.lost == 0 and self.doubled == 0
                and self.size_server == self.size_reference and not self.notes)


def tallies(values: npt.NDArray[np.float32], step: float) -> tuple[npt.NDArray[np.int64], bool]:
    """Row updates counted by the tally column; False if a value is not a whole count."""
    counts = values.astype(np.float64) / step
    whole = np.round(counts)
    return whole.astype(np.int64), bool((counts == whole).all())


def audit_table(key: str, d: TableDef, table: Table, ref: EmbeddingHashTable,
                touched: npt.NDArray[np.int64], logged_rows: int) -> TableAudit:
    """Compare the cluster's table with the reference on every touched id."""
    mismatched = lost = doubled = 0
    notes: list[str] = []
    want_total = 0
    for lo in range(0, touched.size, AUDIT_CHUNK):
        ids = touched[lo:lo + AUDIT_CHUNK]
        got_e = np.array(table.lookup_entry(ids), dtype=object)
        want_e = np.array(lookup_entry(ref, ids), dtype=object)
        mismatched += int(np.count_nonzero(got_e != want_e))
        got_n, got_whole = tallies(table.lookup(ids)[:, -1], d.tally_step)
        want_n, want_whole = tallies(ref.lookup(ids)[:, -1], d.tally_step)
        if not (got_whole and want_whole):
            notes.append("a tally is not a whole number of updates")
        diff = got_n - want_n
        lost += int(-diff[diff < 0].sum())
        doubled += int(diff[diff > 0].sum())
        want_total += int(want_n.sum())
    if want_total != logged_rows:
        notes.append(f"reference tally {want_total} != logged row updates {logged_rows}")
    return TableAudit(key, int(touched.size), mismatched, lost, doubled, table.size(),
                      ref.size(), logged_rows, notes)


# ---------------------------------------------------------------- report


def pct_ms(lat: npt.NDArray[np.float64], q: float) -> float:
    return float(np.percentile(lat, q)) * 1e3 if lat.size else float("nan")


def report_rates(ops: Sequence[Op], window: float) -> tuple[float, float, float]:
    """Print per-kind figures; returns (ops/s, p50 ms, p99 ms) over all ops."""
    print(f"{'kind':<14}{'ops':>8}{'ops/s':>10}{'rows/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'failed':>8}")
    for kind in [*OP_WEIGHTS, "all"]:
        sel = [o for o in ops if kind in ("all", o.kind)]
        lat = np.array([o.t1 - o.t0 for o in sel], dtype=np.float64)
        rows = sum(o.ids.size for o in sel)
        failed = sum(not o.ok for o in sel)
        print(f"{kind:<14}{len(sel):>8}{len(sel) / window:>10.1f}{rows / window:>11.0f}"
              f"{pct_ms(lat, 50):>9.2f}{pct_ms(lat, 99):>9.2f}{failed:>8}")
    lat = np.array([o.t1 - o.t0 for o in ops], dtype=np.float64)
    return len(ops) / window, pct_ms(lat, 50), pct_ms(lat, 99)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration (default 20)")
    ap.add_argument("--quick", action="store_true", help="CI mode: 8 s of load")
    ap.add_argument("--clients", type=int, default=16, help="trainer threads (default 16)")
    ap.add_argument("--shards", type=int, default=4, help="local shard processes (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard-timeout", type=float, default=None,
                    help="kill everything and exit 3 after this many seconds, counted "
                         "once every shard serves (default: load duration + 300)")
    ap.add_argument("--inject-double", action="store_true",
                    help="debug: send one logged update to the cluster twice (audit must fail)")
    ap.add_argument("--inject-lost", action="store_true",
                    help="debug: apply one logged update twice to the reference (audit must "
                         "fail)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = 8.0
    if args.hard_timeout is None:
        args.hard_timeout = args.seconds + 300.0
    if args.clients < 1 or args.shards < 1 or args.seconds <= 0:
        ap.error("--clients, --shards and --seconds must be positive")
    return args


class Watchdog:
    """Ends the run if it outlives ``seconds``.

    It interrupts the main thread (``KeyboardInterrupt``), which unwinds through
    ``local_cluster`` and stops the shards; if the main thread has not finished
    ``grace`` seconds later, it kills the shard processes and the process (exit 3).
    """

    def __init__(self, seconds: float, grace: float = 30.0) -> None:
        self.cluster: LocalCluster | None = None
        self.fired = threading.Event()
        self._done = threading.Event()
        self._seconds = seconds
        self._grace = grace
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        """Start counting (once the cluster serves)."""
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        print(f"load_test: HARD TIMEOUT after {self._seconds:g}s; stopping",
              file=sys.stderr, flush=True)
        main_ident = threading.main_thread().ident
        if main_ident is not None:
            signal.pthread_kill(main_ident, signal.SIGINT)
        if self._done.wait(self._grace):
            return
        if self.cluster is not None:
            for proc in self.cluster.processes:
                if proc.poll() is None:
                    proc.kill()
        os._exit(3)

    def cancel(self) -> None:
        self._done.set()
        self._timer.cancel()


def wait_serving(addresses: Sequence[str], limit: float = START_LIMIT) -> None:
    """Return once every shard's health says SERVING for the data plane.

    :raises RuntimeError: a shard did not within ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    for address in addresses:
        while True:
            serving, detail = probe(address, service="monolith_ps.ParameterServer",
                                    timeout=max(1.0, deadline - time.monotonic()))
            if serving:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"shard {address} not SERVING within {limit:g}s: {detail}")
            time.sleep(0.05)


def first_ok(logs: Sequence[ClientLog], pick: Callable[[Op], bool]) -> Op | None:
    return next((o for lg in logs for o in lg.ops if o.ok and pick(o)), None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    watchdog = Watchdog(args.hard_timeout)
    try:
        return run(args, watchdog)
    except KeyboardInterrupt:
        if not watchdog.fired.is_set():
            raise
        print(f"load_test: FAIL hard timeout ({args.hard_timeout:g}s); cluster stopped")
        return 3
    finally:
        watchdog.cancel()


def run(args: argparse.Namespace, watchdog: Watchdog) -> int:
    defs = table_defs()
    req_time = int(time.time())
    print(f"load_test: {args.clients} client threads (one PsClient each) x {args.shards} "
          f"shard processes, {args.seconds:g}s, seed {args.seed}, {os.cpu_count()} cores")
    with local_cluster(args.shards, start_timeout=START_LIMIT) as cluster:
        watchdog.cluster = cluster
        print("shards: " + ", ".join(
            f"{a} (pid {p.pid})" for a, p in zip(cluster.addresses, cluster.processes,
                                                 strict=True)), flush=True)
        wait_serving(cluster.addresses)
        watchdog.start()
        with PsClient(cluster.addresses) as admin:
            for d in defs.values():
                admin.create_table(d.config, name=d.name, learning_rate_fns=d.learning_rates)
            # The deadline is set again once every client is connected and released.
            plan = Plan(cluster.addresses, defs, args.seed, req_time,
                        threading.Barrier(args.clients + 1), [time.monotonic() + args.seconds])
            logs = [ClientLog(i) for i in range(args.clients)]
            threads = [threading.Thread(target=run_client, args=(plan, lg), daemon=True,
                                        name=f"trainer-{lg.index}") for lg in logs]
            for t in threads:
                t.start()
            with contextlib.suppress(threading.BrokenBarrierError):  # a client crashed
                plan.start.wait(timeout=120)
            plan.deadline[0] = time.monotonic() + args.seconds
            for t in threads:
                t.join(args.seconds + 60)
            stuck = [t.name for t in threads if t.is_alive()]

            injected_double = 0
            if args.inject_double:
                op = first_ok(logs, lambda o: o.kind == "sgd")
                if op is not None:
                    send({k: admin.table(d.name, learning_rate_fns=d.learning_rates)
                          for k, d in defs.items()}, defs, op, req_time)
                    injected_double = op.ids.size
            injected_lost = 0
            extra: list[Op] = []
            if args.inject_lost:
                op = first_ok(logs, lambda o: o.kind == "assign_add")
                if op is not None:
                    extra.append(op)
                    injected_lost = op.ids.size

            ops = [o for lg in logs for o in lg.ops]
            if not ops:
                print("load_test: FAIL no operation ran; "
                      + "; ".join(f"client {lg.index}: {lg.crash}" for lg in logs if lg.crash))
                return 1
            window = max(o.t1 for o in ops) - min(o.t0 for o in ops)
            print(f"\nload: {len(ops)} ops in {window:.2f}s")
            ops_s, p50, p99 = report_rates(ops, window)

            t_audit = time.perf_counter()
            ref = {k: EmbeddingHashTable(d.config, name=f"ref_{d.name}") for k, d in defs.items()}
            updates = [o for lg in logs for o in lg.ops if o.kind in UPDATE_KINDS]
            ok_updates = [o for o in updates if o.ok]
            for op in [*ok_updates, *extra]:
                replay(ref, defs, op, req_time)
            audits = []
            for key, d in defs.items():
                mine = [o for o in updates if o.table == key]
                touched = (np.unique(np.concatenate([o.ids for o in mine])) if mine
                           else np.zeros(0, dtype=np.int64))
                logged_rows = sum(o.ids.size for o in mine if o.ok) + sum(
                    o.ids.size for o in extra if o.table == key)
                audits.append(audit_table(key, d, admin.table(d.name), ref[key], touched,
                                          logged_rows))
            audit_s = time.perf_counter() - t_audit

    failed = [o for o in ops if not o.ok]
    crashes = [f"client {lg.index}: {lg.crash}" for lg in logs if lg.crash]
    print(f"\naudit ({audit_s:.1f}s): replayed {len(ok_updates)} successful updates "
          f"({sum(o.ids.size for o in ok_updates)} row updates) on in-process tables")
    print(f"{'table':<10}{'ids':>8}{'logged rows':>13}{'lost':>7}{'doubled':>9}"
          f"{'mismatch':>10}{'size srv/ref':>16}")
    for a in audits:
        print(f"{a.name:<10}{a.ids:>8}{a.logged_rows:>13}{a.lost:>7}{a.doubled:>9}"
              f"{a.mismatched:>10}{f'{a.size_server}/{a.size_reference}':>16}"
              + ("  " + "; ".join(a.notes) if a.notes else ""))
    if injected_double or injected_lost:
        print(f"injected: doubled {injected_double} row updates of sgd, "
              f"lost {injected_lost} row updates of counter")
    for f in failed[:5]:
        print(f"failed RPC: {f.kind} on {f.table}: {f.error}")
    for c in crashes:
        print(f"client stopped: {c}")
    if stuck:
        print(f"clients still running at the end: {', '.join(stuck)}")
    lost = sum(a.lost for a in audits)
    doubled = sum(a.doubled for a in audits)
    mismatched = sum(a.mismatched for a in audits)
    sizes_equal = all(a.size_server == a.size_reference for a in audits)
    passed = all(a.ok for a in audits) and not crashes and not stuck
    print(f"verification: lost: {lost}, doubled: {doubled}, mismatched ids: {mismatched}, "
          f"sizes equal: {'yes' if sizes_equal else 'no'}, failed RPCs: {len(failed)} -> "
          f"{'PASS' if passed else 'FAIL'}")
    print(f"load_test: {'PASS' if passed else 'FAIL'} clients={args.clients} "
          f"shards={args.shards} seconds={window:.1f} ops={len(ops)} ops/s={ops_s:.0f} "
          f"p50={p50:.1f}ms p99={p99:.1f}ms updates={len(ok_updates)} "
          f"row_updates={sum(o.ids.size for o in ok_updates)} failed={len(failed)} "
          f"lost={lost} doubled={doubled} mismatched_ids={mismatched}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
