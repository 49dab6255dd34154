"""Repeated ids in one apply_gradients: n occurrences of one id against n distinct ids.

Every occurrence of an id is its own optimizer step, in order (docs/semantics.md §4.2).
Per optimizer, on the same table (dim 8, entries already present), this prints the
time of one request holding one id n times over the time of one request of n
distinct ids. SGD and Adagrad (no weight decay) step repeats as float32 accumulates
(their run form); Adam and FTRL have none, so a request repeating one id more than
``MAX_SEQUENTIAL_REPEATS`` times is refused (RESOURCE_EXHAUSTED) and the row printed
for them is the worst request they accept: one id at the limit, the rest distinct.

Before (per-occurrence waves, found by one pass over the batch per occurrence rank),
measured on the same machine at n = 20,000: SGD 48x, Adagrad 1,550x, Adam 159x, FTRL
233x; at n = 200,000 Adagrad took 22 s (issue 12).

Usage: ``python bench/repeats_bench.py [--quick] [--n N]`` (n = 200,000; quick 20,000).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import configs
from ps_server.engine.hash_table import MAX_SEQUENTIAL_REPEATS, EmbeddingHashTable
from ps_server.errors import ResourceExhaustedError

DIM = 8
OPTIMIZERS: dict[str, eht.OptimizerConfig] = {
    "sgd": configs.sgd(0.1),
    "adagrad": configs.adagrad(0.1),
    "adam": eht.OptimizerConfig(
        adam=eht.AdamOptimizerConfig(beta1=0.9, beta2=0.999, epsilon=1e-8)),
    "ftrl": eht.OptimizerConfig(
        ftrl=eht.FtrlOptimizerConfig(initial_accumulator_value=0.1, beta=1.0)),
}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``fn`` (seconds): the machine is shared."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, n: int, repeats: int) -> None:
    table = EmbeddingHashTable(configs.table_config(DIM, optimizer=OPTIMIZERS[name]))
    grads = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    distinct = np.arange(n, dtype=np.int64)
    table.apply_gradients(distinct, grads, [0.1])  # every entry exists from here on
    t_distinct = best_time(lambda: table.apply_gradients(distinct, grads, [0.1]), repeats)
    one = np.full(n, 7, dtype=np.int64)
    try:
        t_one = best_time(lambda: table.apply_gradients(one, grads, [0.1]), repeats)
        print(f"{name:8s} n={n:,}: distinct {t_distinct * 1e3:8.1f} ms, one id x{n:,} "
              f"{t_one * 1e3:8.1f} ms, ratio {t_one / t_distinct:5.2f}")
        return
    except ResourceExhaustedError:
        t0 = time.perf_counter()
        try:
            table.apply_gradients(one, grads, [0.1])
        except ResourceExhaustedError:
            t_refused = time.perf_counter() - t0
    limit = min(MAX_SEQUENTIAL_REPEATS, n)
    mixed = distinct.copy()
    mixed[:limit] = 7
    t_mixed = best_time(lambda: table.apply_gradients(mixed, grads, [0.1]), repeats)
    print(f"{name:8s} n={n:,}: distinct {t_distinct * 1e3:8.1f} ms, one id x{n:,} refused "
          f"(RESOURCE_EXHAUSTED) in {t_refused * 1e3:.1f} ms; worst accepted (one id "
          f"x{limit:,}, rest distinct) {t_mixed * 1e3:8.1f} ms, ratio "
          f"{t_mixed / t_distinct:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 20,000, fewer runs")
    parser.add_argument("--n", type=int, default=None, help="occurrences per request")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 200_000)
    repeats = 3 if args.quick else 5
    print(f"repeated ids, dim {DIM}: time of one id x n / time of n distinct ids "
          f"(limit without a run form: {MAX_SEQUENTIAL_REPEATS:,} per id per request)")
    for name in OPTIMIZERS:
        bench(name, n, repeats)


if __name__ == "__main__":
    main()
