"""EntryDump codec benchmark: encode/decode/check MB/s beside a plain ``tobytes()``.

Encodes N dim-32 Adagrad entries (values, norm, id, timestamp) with
``encode_entry_dumps``, decodes them back with ``decode_entry_dumps`` and checks
them with ``check_entry_dumps`` (a restore's first pass). The baseline is
``ndarray.tobytes()`` of the same values and norm (a bare memory copy of the
payload), run in the same process; each rate is printed with its ratio to it.
Two timestamp patterns are measured: uniform (one layout, the buffer is written as
views) and mixed (0 or a real time, interleaved at random, so records scatter).

Usage: ``python bench/entry_dump_bench.py [--quick] [--entries N]``. ``--quick``
(100,000 entries) is a smoke run: its payload stays in cache, which flatters the
baseline, so read ratios from the default 1,000,000.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from ps_server.checkpoint.entry_dump import (
    check_entry_dumps,
    decode_entry_dumps,
    encode_entry_dumps,
)
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.types import Floats

DIM = 32


class _Adagrad(Optimizer):
    """Adagrad's dump layout only (the codec never calls ``apply``)."""

    dump_field: ClassVar[int | None] = 1

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("norm", self.dim, 1),)

    def init_state(self, n: int) -> State:
        return {"norm": np.full((n, self.dim), 0.1, np.float32)}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        raise NotImplementedError


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(n: int, repeats: int, mixed: bool) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, DIM), dtype=np.float32)
    norm = rng.random((n, DIM), dtype=np.float32)
    ids = rng.integers(0, 1 << 62, size=n, dtype=np.int64)
    ts = np.full(n, 1_700_000_000, np.int64)
    if mixed:
        ts[rng.random(n) < 0.5] = 0
    opt = _Adagrad(None, DIM)
    segments = [(opt, {"norm": norm})]

    def copy_payload() -> None:
        values.tobytes()
        norm.tobytes()

    base = best_of(copy_payload, repeats)
    base_mb = (values.nbytes + norm.nbytes) / 1e6
    buffer, offsets = encode_entry_dumps(values, segments, ts, ids)
    enc = best_of(lambda: encode_entry_dumps(values, segments, ts, ids), repeats)
    dec = best_of(lambda: decode_entry_dumps(buffer, offsets, [opt], DIM), repeats)
    chk = best_of(lambda: check_entry_dumps(buffer, offsets, [opt], DIM), repeats)
    out = decode_entry_dumps(buffer, offsets, [opt], DIM)
    assert np.array_equal(out.values, values) and np.array_equal(out.states[0]["norm"], norm)
    mb = buffer.size / 1e6
    label = "mixed ts" if mixed else "uniform ts"
    print(f"{n:,} entries dim {DIM}, {label}: {mb:.0f} MB of records")
    base_rate = base_mb / base
    print(f"  tobytes() of values+norm  {base_rate:9.0f} MB/s")
    print(f"  encode_entry_dumps        {mb / enc:9.0f} MB/s  ratio {mb / enc / base_rate:.2f}")
    print(f"  decode_entry_dumps        {mb / dec:9.0f} MB/s  ratio {mb / dec / base_rate:.2f}")
    print(f"  check_entry_dumps         {mb / chk:9.0f} MB/s  ratio {mb / chk / base_rate:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 entries")
    parser.add_argument("--entries", type=int, default=0, help="entries (default 1,000,000)")
    args = parser.parse_args()
    n = args.entries or (100_000 if args.quick else 1_000_000)
    repeats = 3
    run(n, repeats, mixed=False)
    run(n, repeats, mixed=True)


if __name__ == "__main__":
    main()
