"""Repeated ids in one apply_gradients: n occurrences of one id against n distinct ids.

Every occurrence of an id is its own optimizer step, in order, with exactly the bits
of Monolith's C++ (docs/semantics.md §4.2, §5.4). Those steps round a fused
multiply-add each, so no optimizer has an exact vectorized form for one id's chain of
steps: each occurrence past the first costs a sequential step (a few µs for SGD and
Adagrad's run forms, tens of µs for a wave of the others). A request of n ids may
therefore repeat one id at most ``max(REPEAT_FLOOR, n // cost)`` times (floor 128;
cost: SGD 96, Adagrad 128, others 512); more is refused with RESOURCE_EXHAUSTED before anything
changes.

Per optimizer, on the same table (dim 8, entries already present), this prints the
time of n distinct ids, what happens to one id n times (refused, and how fast), and
the worst request accepted: one id at the limit, the rest distinct, as a ratio to n
distinct ids (target: at most about 2).

Before (stop 11, when SGD and Adagrad took any multiplicity and the others were capped
at 1,024 whatever the request's size), at n = 20,000: SGD 13x, Adagrad 33x (one id
x20,000), Adam 27x, FTRL 25x (one id x1,024, rest distinct).

Usage: ``python bench/repeats_bench.py [--quick] [--n N]`` (n = 20,000 and 200,000;
quick: 200,000, fewer runs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import configs
from ps_server.engine.hash_table import REPEAT_FLOOR, EmbeddingHashTable
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
    limit = table.repeat_limit(n)
    assert limit is not None
    if n <= limit:
        t_one = best_time(lambda: table.apply_gradients(one, grads, [0.1]), repeats)
        print(f"{name:8s} n={n:,}: distinct {t_distinct * 1e3:7.1f} ms, one id x{n:,} "
              f"{t_one * 1e3:7.1f} ms, ratio {t_one / t_distinct:5.2f}")
        return
    t0 = time.perf_counter()
    try:
        table.apply_gradients(one, grads, [0.1])
        raise AssertionError(f"one id x{n} past the limit {limit} was accepted")
    except ResourceExhaustedError:
        t_refused = time.perf_counter() - t0
    mixed = distinct.copy()
    mixed[:limit] = 7
    t_mixed = best_time(lambda: table.apply_gradients(mixed, grads, [0.1]), repeats)
    print(f"{name:8s} n={n:,}: distinct {t_distinct * 1e3:7.1f} ms; one id x{n:,} refused "
          f"in {t_refused * 1e3:.1f} ms; worst accepted (one id x{limit:,}, rest "
          f"distinct) {t_mixed * 1e3:7.1f} ms, ratio {t_mixed / t_distinct:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 200,000 only, fewer runs")
    parser.add_argument("--n", type=int, default=None, help="occurrences per request")
    args = parser.parse_args()
    sizes = [args.n] if args.n else [200_000] if args.quick else [20_000, 200_000]
    repeats = 2 if args.quick else 5
    print(f"repeated ids, dim {DIM}: time of one id x n / time of n distinct ids (a request "
          f"of n ids may repeat an id max({REPEAT_FLOOR}, n // cost) times)")
    for n in sizes:
        for name in OPTIMIZERS:
            bench(name, n, repeats)


if __name__ == "__main__":
    main()
