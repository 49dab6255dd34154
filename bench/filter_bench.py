"""Filter benchmark: sliding-filter counting rate beside a plain numpy gather.

Counts 1,000,000-id batches drawn from a Zipf distribution over 100M ids with a
default-capacity sliding filter (300M, 7 splits, threshold 3 on every slot), and
prints ids/s next to the stand-in for the engine lookup rate: a plain numpy gather of
1M random rows of a float32 [1M, 32] table. The target is a ratio >= 0.5.

The first batches fill an empty filter; later ones see a mix of known and new ids
(Zipf's head repeats, its tail keeps bringing new ids), which is the steady state.

Usage: ``python bench/filter_bench.py [--quick] [--batches N]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ps_server.engine.filters import SlidingHashFilter

BATCH = 1_000_000
UNIVERSE = 100_000_000
TABLE_ROWS = 1_000_000
DIM = 32


def zipf_batch(rng: np.random.Generator, n: int, a: float = 1.1) -> np.ndarray:
    """``n`` ids from a Zipf(a) law over ``UNIVERSE`` ids, scattered over the id space."""
    ranks = rng.zipf(a, size=2 * n)
    ranks = ranks[ranks <= UNIVERSE][:n]
    while ranks.size < n:  # the tail beyond the universe is redrawn
        more = rng.zipf(a, size=n)
        ranks = np.concatenate([ranks, more[more <= UNIVERSE]])[:n]
    # Spread ranks over slots and signature bits like real fids (odd multiplier: a bijection).
    return (ranks.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)


def gather_rate(rng: np.random.Generator, repeats: int) -> float:
    table = rng.standard_normal((TABLE_ROWS, DIM), dtype=np.float32)
    rows = rng.integers(0, TABLE_ROWS, size=BATCH)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = table[rows]
        best = min(best, time.perf_counter() - t0)
    assert out.shape == (BATCH, DIM)
    return BATCH / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI (< 15 s)")
    parser.add_argument("--batches", type=int, default=None, help="batches to count")
    args = parser.parse_args()
    batches = args.batches or (3 if args.quick else 10)
    rng = np.random.default_rng(2024)

    gather = gather_rate(rng, 3 if args.quick else 5)
    print(f"numpy gather   1M rows of float32[1M, {DIM}]: {gather / 1e6:8.2f} M rows/s")

    filt = SlidingHashFilter(thresholds=np.full(1 << 15, 3, dtype=np.int64))
    data = [zipf_batch(rng, BATCH) for _ in range(batches)]
    rates = []
    for i, ids in enumerate(data):
        t0 = time.perf_counter()
        mask = filt.should_be_filtered(ids, with_table=False)
        dt = time.perf_counter() - t0
        rates.append(BATCH / dt)
        distinct = np.unique(ids).size
        print(
            f"filter batch {i}: {BATCH / dt / 1e6:6.2f} M ids/s ({dt * 1e3:6.1f} ms), "
            f"{distinct:,} distinct, {mask.mean():.1%} filtered, "
            f"head {filt.head}, failures {filt.failure_count}"
        )
    steady = float(np.median(rates[1:] if len(rates) > 1 else rates))
    ratio = steady / gather
    verdict = "meets" if ratio >= 0.5 else "BELOW"
    print(
        f"SUMMARY filter counting {steady / 1e6:.2f} M ids/s (median after the first batch) "
        f"vs numpy gather {gather / 1e6:.2f} M rows/s: ratio {ratio:.2f} ({verdict} target 0.5)"
    )


if __name__ == "__main__":
    main()
