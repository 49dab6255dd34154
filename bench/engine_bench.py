"""Engine benchmark: one shard's table against plain numpy on the same rows.

Reproduces Monolith's ``hash_table_ops_benchmark`` workloads (docs/semantics.md §11) and
adds the headline measurements. Every rate is printed beside a baseline run in
the same process on the same machine, as a ratio:

* lookup of 65,536 random ids from an N x 32 table vs ``values[idx]`` on a plain
  float32 array of the same shape (and vs ``np.take(values, idx, axis=0)``, numpy's
  fastest row gather);
* SGD apply_gradients on that batch vs ``values[idx] -= lr * g`` (gather + scatter;
  and vs the np.take form of it);
* Adagrad, FTRL, Momentum, Adadelta, MovingAverage, Group AdaGrad, Adam and AMSGrad
  apply_gradients vs a numpy gather + scatter that moves the same bytes: ``a[idx] -=
  lr * g`` on the values *and* on each of the optimizer's state slots (a plain array
  of the slot's width and dtype), same rows;
* first-time insert of 1M new ids (ids/s, beside the lookup rate);
* resident bytes per entry (RSS growth while filling the table / N);
* the cost of Monolith's exact float arithmetic (docs/semantics.md §5.3, §5.4) against
  numpy's own: ``fma32`` vs ``a*b + c`` in float32 and glibc's ``tanhf`` vs ``np.tanh``
  on 1M float32 values (glibc's ``powf`` only computes HashNet's scalar scale), and a
  HashNet (one-bit retriever) lookup vs a plain table's.

Usage: ``python bench/engine_bench.py [--quick] [--entries N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import time
from collections.abc import Callable

import numpy as np
import psutil

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import configs, fpmath
from ps_server.engine.hash_table import EmbeddingHashTable

BATCH = 65_536
DIM = 32


def median_time(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall time (seconds) of ``fn(i)`` for ``i`` in ``range(repeats)``."""
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rss() -> int:
    """Resident bytes, after returning freed heap pages to the OS (glibc malloc_trim),
    so the figure counts live memory rather than allocator slack."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def monolith_lookup(repeats: int) -> None:
    """§11 test_lookup: 10,000 ids, the last 5 left at zero, verified."""
    ids = np.arange(10_000, dtype=np.int64)
    table = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.sgd(1.0)))
    ones = np.ones((10_000, DIM), dtype=np.float32)
    zeros = np.zeros((10_000, DIM), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        table.assign_add(ids[:-5], ones[:-5])
        table.assign_add(ids[-5:], zeros[:5])
        out = table.lookup(ids)
    per_run = (time.perf_counter() - t0) / repeats
    assert (out[:-5] == repeats).all() and (out[-5:] == 0).all()
    print(f"monolith test_lookup        10,000 ids x{repeats}: {per_run * 1e3:7.2f} ms/run "
          f"(2 assign_add + lookup), verified rows = {repeats}.0 / 0.0")


def monolith_optimize(dedup: bool) -> None:
    """§11 test_basic_optimize: 1M ids (i // 4), Adagrad, lookup, grads -1, apply."""
    ids = np.arange(1_000_000, dtype=np.int64) // 4
    table = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.adagrad(0.1)))
    table.assign_add(ids[:-5], np.ones((999_995, DIM), dtype=np.float32))
    table.assign_add(ids[-5:], np.zeros((5, DIM), dtype=np.float32))
    t0 = time.perf_counter()
    emb = table.lookup(ids)
    table.apply_gradients(ids, -np.ones_like(emb), [0.001], 0, enable_dedup=dedup)
    after = table.lookup(ids)
    dt = time.perf_counter() - t0
    assert emb[0, 0] == 4.0 and emb[-5, 0] == 3.0 and emb[-1, 0] == 0.0
    assert (after[:, 0] > emb[:, 0]).all()
    label = "with dedup" if dedup else "no dedup  "
    print(f"monolith test_basic_optimize {label} 1M ids: {dt:6.2f} s "
          f"({1e6 / dt:,.0f} ids/s for lookup + apply + lookup)")


def other_optimizers() -> dict[str, eht.OptimizerConfig]:
    """One config per optimizer besides SGD/Adagrad, with a weight decay where it has one."""
    return {
        "FTRL": eht.OptimizerConfig(ftrl=eht.FtrlOptimizerConfig()),
        "Momentum": eht.OptimizerConfig(momentum=eht.MomentumOptimizerConfig(
            use_nesterov=True, weight_decay_factor=0.1)),
        "Adadelta": eht.OptimizerConfig(adadelta=eht.AdadeltaOptimizerConfig(
            weight_decay_factor=0.1)),
        "MovingAvg": eht.OptimizerConfig(moving_average=eht.MovingAverageOptimizerConfig(
            momentum=0.7)),
        "GroupAdaGrad": eht.OptimizerConfig(group_adagrad=eht.GroupAdaGradOptimizerConfig(
            weight_decay_factor=0.1)),
        "Adam": eht.OptimizerConfig(adam=eht.AdamOptimizerConfig()),
        "AMSGrad": eht.OptimizerConfig(amsgrad=eht.AmsgradOptimizerConfig()),
    }


def headline(entries: int, repeats: int) -> dict[str, float]:
    """Engine vs numpy on the same rows; batches rotate so neither side runs from cache."""
    rng = np.random.default_rng(0)
    all_ids = rng.permutation(np.arange(entries, dtype=np.int64) * 2654435761 + 17)
    chunk = 1 << 20

    def filled(optimizer: object, n: int) -> EmbeddingHashTable:
        table = EmbeddingHashTable(configs.table_config(DIM, optimizer=optimizer))  # type: ignore[arg-type]
        for s in range(0, n, chunk):
            part = all_ids[s : min(s + chunk, n)]
            table.assign(part, np.ones((part.size, DIM), dtype=np.float32))
        return table

    # Fill and drop a small table of each kind first, so the resident growth measured
    # below is the table's own and not the first use of the code paths (lazy imports,
    # numpy's and the allocator's one-time state), about 0.6 B/entry at 1M entries.
    for warm_up in (configs.sgd(), configs.adagrad()):
        filled(warm_up, 1 << 14)
    before = rss()
    sgd = filled(configs.sgd(), entries)
    sgd_bytes = (rss() - before) / entries

    # 16 distinct batches (16 x 8 MB of rows) are more than the last-level cache.
    picks = [rng.integers(0, entries, BATCH) for _ in range(16)]
    batches = [all_ids[p] for p in picks]
    grads = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    lr = np.float32(0.01)
    plain = np.ones((entries, DIM), dtype=np.float32)

    # Two baselines: the idioms (``table[u]`` and ``table[u] -= lr * g``) and
    # numpy's fastest row gather (np.take on axis 0, several times faster than fancy
    # indexing on big tables). The headline ratio is against the idiom; the take
    # ratio shows how far from the best plain numpy can do we still are.
    def np_update(i: int) -> None:
        plain[picks[i % 16]] -= lr * grads

    def np_take_update(i: int) -> None:
        p = picks[i % 16]
        rows = np.take(plain, p, axis=0)
        rows -= lr * grads
        plain[p] = rows

    t_gather = median_time(lambda i: plain[picks[i % 16]], repeats)
    t_scatter = median_time(np_update, repeats)
    t_take = median_time(lambda i: np.take(plain, picks[i % 16], axis=0), repeats)
    t_take_scatter = median_time(np_take_update, repeats)
    t_lookup = median_time(lambda i: sgd.lookup(batches[i % 16]), repeats)
    t_sgd = median_time(lambda i: sgd.apply_gradients(batches[i % 16], grads, [0.01]), repeats)
    plain = np.zeros((0, DIM), dtype=np.float32)

    ada_n = min(entries, 1 << 21)
    before = rss()
    ada = filled(configs.adagrad(), ada_n)
    ada_bytes = (rss() - before) / ada_n
    ada_payload = ada.entry_bytes
    ada_picks = [rng.integers(0, ada_n, BATCH) for _ in range(16)]
    ada_batches = [all_ids[p] for p in ada_picks]

    def state_baseline(table: EmbeddingHashTable) -> Callable[[int], None]:
        """numpy gather + scatter of the same rows of the values and of every state
        slot of ``table``'s optimizer (``a[idx] -= lr * g`` on each): the same bytes
        an optimizer step must move."""
        opt = table.layout.segments[0].optimizer
        assert opt is not None
        arrays = [np.ones((ada_n, DIM), dtype=np.float32)] + [
            np.ones((ada_n, s.width), dtype=s.dtype) for s in opt.slots()]
        deltas = [grads if a.shape[1] == DIM else grads[:, : a.shape[1]].astype(a.dtype)
                  for a in arrays]

        def step(i: int) -> None:
            p = ada_picks[i % 16]
            for a, d in zip(arrays, deltas, strict=True):
                a[p] -= (lr * d).astype(a.dtype, copy=False)

        return step

    # Each stateful optimizer (their float arithmetic follows Monolith's FMA build) on
    # the same rows, against the gather + scatter of its own values and slots. The two
    # alternate call by call (the machine is shared: a busy spell slows both) and the
    # ratio is the median of the per-pair ratios.
    stateful: dict[str, tuple[float, float, float]] = {}
    reps = max(8, repeats // 2)
    for name, opt in {"Adagrad": configs.adagrad(), **other_optimizers()}.items():
        opt_table = ada if name == "Adagrad" else filled(opt, ada_n)
        base_step = state_baseline(opt_table)
        base_times: list[float] = []
        opt_times: list[float] = []
        for i in range(reps + 1):  # the first pair warms up
            t0 = time.perf_counter()
            base_step(i)
            t1 = time.perf_counter()
            opt_table.apply_gradients(ada_batches[i % 16], grads, [0.01])
            t2 = time.perf_counter()
            if i:
                base_times.append(t1 - t0)
                opt_times.append(t2 - t1)
        pair_ratio = float(np.median(np.array(base_times) / np.array(opt_times)))
        stateful[name] = (float(np.median(opt_times)), float(np.median(base_times)), pair_ratio)
        del base_step
        del opt_table
    del ada

    new_ids = np.arange(1_000_000, dtype=np.int64) * 3 + (1 << 40)
    fresh = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.sgd()))
    t0 = time.perf_counter()
    fresh.apply_gradients(new_ids, np.ones((new_ids.size, DIM), dtype=np.float32), [0.01])
    t_insert = time.perf_counter() - t0

    rate = BATCH / t_lookup
    print(f"\nheadline: {entries:,} x {DIM} table, batches of {BATCH:,} random ids")
    print(f"  lookup        {rate:14,.0f} ids/s   numpy gather {BATCH / t_gather:14,.0f} ids/s"
          f"   ratio {t_gather / t_lookup:.2f}x  (target >= 0.5x)")
    print(f"  SGD apply     {BATCH / t_sgd:14,.0f} ids/s   numpy g+s    {BATCH / t_scatter:14,.0f}"
          f" ids/s   ratio {t_scatter / t_sgd:.2f}x  (target >= 0.6x)")
    print("  stateful optimizers vs numpy gather+scatter of the values and each state slot:")
    for name, (t_apply, t_base, pair_ratio) in stateful.items():
        print(f"  {name:<13} {BATCH / t_apply:14,.0f} ids/s   numpy g+s    "
              f"{BATCH / t_base:14,.0f} ids/s   ratio {pair_ratio:.2f}x  (target >= 0.6x)")
    print(f"  vs np.take    lookup {t_take / t_lookup:.2f}x of {BATCH / t_take:,.0f} ids/s; "
          f"SGD {t_take_scatter / t_sgd:.2f}x of {BATCH / t_take_scatter:,.0f} ids/s")
    print(f"  first insert  {1e6 / t_insert:14,.0f} ids/s   (1M new ids via apply_gradients;"
          f" lookup rate {rate:,.0f} ids/s)")
    print(f"  memory        SGD {sgd_bytes:6.1f} B/entry (payload {sgd.entry_bytes} B, target "
          f"<= 150), Adagrad {ada_bytes:6.1f} B/entry (payload {ada_payload} B, target "
          "<= 260) (resident growth while filling)")
    return {
        "lookup_ratio": t_gather / t_lookup,
        "sgd_ratio": t_scatter / t_sgd,
        **{f"{name.lower()}_ratio": r for name, (_, _, r) in stateful.items()},
        "sgd_bytes": sgd_bytes,
    }


def exact_math(repeats: int) -> None:
    """Monolith's float arithmetic, emulated exactly, against numpy's own on the same
    1M float32 values (what bit-exactness costs, issue 13)."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.standard_normal(1_000_000).astype(np.float32) for _ in range(3))
    pairs = {
        "fma32 / a*b+c": (lambda i: fpmath.fma32(a, b, c), lambda i: a * b + c),
        "tanhf / np.tanh": (lambda i: fpmath.tanhf(b), lambda i: np.tanh(b)),
    }
    print("\nexact float arithmetic (1M float32 values): time of Monolith's / numpy's")
    for name, (exact, plain) in pairs.items():
        t_exact, t_plain = median_time(exact, repeats), median_time(plain, repeats)
        print(f"  {name:<18} {t_exact * 1e3:7.2f} ms / {t_plain * 1e3:6.2f} ms = "
              f"{t_exact / t_plain:5.1f}x")
    plain = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.sgd()))
    cfg = eht.EmbeddingHashTableConfig()
    cfg.CopyFrom(configs.table_config(DIM, optimizer=configs.sgd()))
    cfg.entry_config.segments[0].comp_config.one_bit.SetInParent()
    one_bit = EmbeddingHashTable(cfg)
    ids = np.arange(BATCH, dtype=np.int64)
    grads = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    for t in (plain, one_bit):
        t.apply_gradients(ids, grads, [0.01])
    t_one_bit = median_time(lambda i: one_bit.lookup(ids), repeats)
    t_raw = median_time(lambda i: plain.lookup(ids), repeats)
    print(f"  one-bit lookup     {t_one_bit * 1e3:7.2f} ms / {t_raw * 1e3:6.2f} ms = "
          f"{t_one_bit / t_raw:5.1f}x  ({BATCH:,} ids x {DIM}, vs a plain table)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    parser.add_argument("--entries", type=int, default=None, help="table size for the headline")
    args = parser.parse_args()
    entries = args.entries or (1_000_000 if args.quick else 4_000_000)
    repeats = 16 if args.quick else 64
    monolith_lookup(10 if args.quick else 100)
    monolith_optimize(dedup=False)
    monolith_optimize(dedup=True)
    exact_math(4 if args.quick else 16)
    r = headline(entries, repeats)
    print(
        f"\nsummary: lookup {r['lookup_ratio']:.2f}x gather, SGD {r['sgd_ratio']:.2f}x "
        f"gather+scatter; of the gather+scatter of values and state: Adagrad "
        f"{r['adagrad_ratio']:.2f}x, Adam {r['adam_ratio']:.2f}x, FTRL {r['ftrl_ratio']:.2f}x, "
        f"Momentum {r['momentum_ratio']:.2f}x; {r['sgd_bytes']:.0f} B/SGD entry"
    )


if __name__ == "__main__":
    main()
