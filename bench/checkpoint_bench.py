"""Checkpoint benchmark: table save/restore against raw file I/O of the same bytes.

Builds an N x 32 Adagrad table (N = 4M, ``--quick``: 500k; random int64 ids, one
optimizer step each), then measures in one process, on one disk:

* **save** (``save_table``, 4 files): entries/s, MB/s of file bytes, and the ratio to
  a raw sequential write of the same number of bytes (16 MiB ``write`` calls into 4
  files, ``fsync`` each: the durability a save gives);
* **restore** (``restore_table``) into the same table (in place: a checking pass over
  every file, then the loading pass; storage already sized) and into a fresh table
  (one pass; storage sized from the file sizes): MB/s and the ratio to a raw
  sequential read of the same bytes;
* **peak extra memory** during each: the highest RSS seen by a sampling thread (every
  2 ms) minus the RSS before the operation (for the fresh table also minus its final
  size), relative to the table's own bytes (``table.nbytes()``).

Page cache: every file (raw and table) is written, fsynced, then evicted from the
page cache with ``posix_fadvise(DONTNEED)`` (allowed without privileges for clean
pages) before it is read, so both reads start from the device. The restore's second
pass rereads files the first pass just read (cached), as it would in production.
A cached raw read is printed for reference.

Every measurement (raw ones included) runs ``--repeat`` times (default 2), each run
of an operation right after a run of its raw counterpart, and the fastest run counts;
memory is the largest rise of any run. The machine should be
quiet: the bench watches ``/proc/stat`` and warns when other processes kept a CPU
busy while it measured.

With ``--checkpoint`` it measures whole checkpoints instead (a one-table shard,
``saver_parallel=4``): ``save_shard_checkpoint`` + ``commit_checkpoint``, and
``restore_shard_checkpoint`` in place and into a new shard, files evicted from the
page cache before each restore. This is where the manifest's file facts cost: CRC-32C
while writing, and on restore one read of every listed file before anything changes.
Measured on this machine (1M entries, 360 MB, best of 3, two alternating rounds each,
quiet machine): save + commit 0.80 s before, 0.78 s after (1.0x); restore in place
0.80 s -> 0.96 s (1.2x); restore into a new shard 0.50 s -> 0.62 s (1.24x).

Usage: ``python bench/checkpoint_bench.py [--quick] [--entries N] [--dir PATH]
[--repeat R] [--checkpoint]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psutil

from ps_server.checkpoint.checkpoints import (
    commit_checkpoint,
    restore_shard_checkpoint,
    save_shard_checkpoint,
)
from ps_server.checkpoint.table_files import restore_table, save_table
from ps_server.engine import configs
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.shard import Shard

DIM = 32
BLOCK = 16 << 20


def trimmed_rss() -> int:
    """RSS after returning freed heap pages to the OS, so it counts live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Yields ``[baseline, peak]``; peak is filled in when the block ends."""
    proc = psutil.Process()
    out = [trimmed_rss(), 0]
    peak = out[0]
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out[1] = max(peak, proc.memory_info().rss)


def drop_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(paths: list[str], sizes: list[int]) -> None:
    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, BLOCK)])
                left -= BLOCK
            f.flush()
            os.fsync(f.fileno())


def raw_read(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(BLOCK):
                total += len(chunk)
    return total


def build_table(n: int, table: EmbeddingHashTable | None = None) -> EmbeddingHashTable:
    if table is None:
        table = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.adagrad()))
    rng = np.random.default_rng(1)
    step = 1 << 18
    for start in range(0, n, step):
        m = min(step, n - start)
        ids = rng.integers(-(1 << 62), 1 << 62, m, dtype=np.int64)
        grads = rng.standard_normal((m, DIM), dtype=np.float32)
        table.apply_gradients(ids, grads, [0.05], req_time=1_700_000_000 + start)
    return table


@dataclass
class Trial:
    """The fastest of several runs of one operation.

    ``extra`` is the largest RSS rise of any run; ``cpu`` the least CPU time this
    process spent in a run (all threads; on a busy machine a steadier figure than the
    wall time); ``elsewhere`` the largest share of a
    run's wall time that other processes kept a CPU busy (a noisy machine).
    """

    secs: float = float("inf")
    extra: int = 0
    elsewhere: float = 0.0
    cpu: float = float("inf")

    def run(self, fn: Callable[[], object]) -> None:
        """Time one run of ``fn``."""
        with peak_rss() as mem:
            busy0, own0 = cpu_seconds()
            t0 = time.perf_counter()
            fn()
            secs = time.perf_counter() - t0
            busy1, own1 = cpu_seconds()
        self.secs = min(self.secs, secs)
        self.extra = max(self.extra, mem[1] - mem[0])
        self.elsewhere = max(self.elsewhere, ((busy1 - busy0) - (own1 - own0)) / secs)
        self.cpu = min(self.cpu, own1 - own0)


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500k entries instead of 4M")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of every measurement, the fastest counts (default 2)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="measure whole-checkpoint save+commit and restore instead")
    args = parser.parse_args()
    n = args.entries or (500_000 if args.quick else 4_000_000)
    repeat = max(1, args.repeat)
    if args.checkpoint:
        checkpoint_main(n, repeat, args.dir)
        return

    print(f"building a {n:,} x {DIM} Adagrad table ...", flush=True)
    live = [build_table(n)]  # a list, so the table can be dropped before the fresh restores
    n = live[0].size()
    table_bytes = live[0].nbytes()
    print(f"table: {n:,} entries, {table_bytes / 2**20:,.0f} MiB in memory", flush=True)

    work = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    save, raw_w, raw_r, raw_h, inplace, fresh = (Trial() for _ in range(6))
    try:
        # Each operation alternates with its raw counterpart, so both meet the disk in
        # the same state (the first writes of a run are often slower).
        base = os.path.join(work, "t")
        files = save_table(live[0], base, shard_index=0, nshards=4).files  # sizes only
        sizes = [os.path.getsize(p) for p in files]
        nbytes = sum(sizes)
        mb = nbytes / 1e6
        raw_paths = [os.path.join(work, f"raw-{k}") for k in range(len(sizes))]
        for _ in range(repeat):
            raw_w.run(lambda: raw_write(raw_paths, sizes))
            save.run(lambda: save_table(live[0], base, shard_index=0, nshards=4))

        def restore_in_place() -> None:
            got = restore_table(live[0], base, shard_index=0, num_shards=1)
            assert got.entries == n, got

        def raw_read_cold() -> None:
            drop_cache(raw_paths)
            raw_r.run(lambda: raw_read(raw_paths))

        for _ in range(repeat):
            raw_read_cold()
            drop_cache(files)
            inplace.run(restore_in_place)
        raw_h.run(lambda: raw_read(raw_paths))
        live.clear()
        gc.collect()

        fresh_tables: list[EmbeddingHashTable] = []

        def restore_fresh() -> None:
            got = restore_table(fresh_tables[0], base, shard_index=0, num_shards=1)
            assert got.entries == n, got

        for _ in range(repeat):
            raw_read_cold()
            fresh_tables.clear()
            gc.collect()
            drop_cache(files)
            fresh_tables.append(
                EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.adagrad()))
            )
            fresh.run(restore_fresh)
        fresh_bytes = fresh_tables[0].nbytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"files: {len(files)} x ~{sizes[0] / 1e6:,.0f} MB = {mb:,.0f} MB "
          f"({nbytes / n:.0f} bytes/entry); fastest of {repeat} runs each")
    print(f"raw write+fsync        {mb / raw_w.secs:8,.0f} MB/s")
    print(f"raw read (cold)        {mb / raw_r.secs:8,.0f} MB/s   "
          f"(cached: {mb / raw_h.secs:,.0f} MB/s)")
    print()
    print(f"{'':22} {'entries/s':>12} {'MB/s':>8} {'vs raw':>7} {'peak extra mem':>22} "
          f"{'CPU s':>6}")

    def row(label: str, t: Trial, raw: Trial, grown: int, ref: int) -> None:
        extra = max(0, t.extra - grown)
        print(f"{label:22} {n / t.secs:12,.0f} {mb / t.secs:8,.0f} {raw.secs / t.secs:6.2f}x "
              f"{extra / 2**20:9,.0f} MiB = {extra / ref:4.2f}x table {t.cpu:6.2f}")

    row("save", save, raw_w, 0, table_bytes)
    row("restore in place", inplace, raw_r, 0, table_bytes)
    row("restore fresh table", fresh, raw_r, fresh_bytes, fresh_bytes)
    print(f"{'':22} (fresh: peak {fresh.extra / 2**20:,.0f} MiB above the "
          f"baseline for a table of {fresh_bytes / 2**20:,.0f} MiB allocated)")
    print("\nrestore in place: a checking pass over every file, then the loading pass (the "
          "live table\nis only touched once everything checked); a fresh (empty) table is "
          "loaded in one pass.\n'vs raw' compares with one raw read of the bytes. Fresh "
          "table memory: peak above the\nbaseline minus the table's final size.")
    trials = {"save": save, "raw write": raw_w, "raw read": raw_r, "restore in place": inplace,
              "restore fresh": fresh}
    busy = {k: t.elsewhere for k, t in trials.items() if t.elsewhere > 0.1}
    if busy:
        print("\nWARNING: other processes kept a CPU busy during "
              + ", ".join(f"{k} ({v:.0%})" for k, v in busy.items())
              + "; figures are unreliable, rerun on a quiet machine.")


def checkpoint_main(n: int, repeat: int, where: str | None) -> None:
    """Whole checkpoints of a one-table shard: ``save_shard_checkpoint`` +
    ``commit_checkpoint`` (manifest and index included), and ``restore_shard_checkpoint``
    into the same shard (in place) and into a new shard (the table created from the
    manifest, loaded in one pass). Files are evicted from the page cache before each
    restore; the fastest of ``repeat`` runs counts."""
    config = configs.table_config(DIM, optimizer=configs.adagrad())
    print(f"building a {n:,} x {DIM} Adagrad table in a shard ...", flush=True)
    shard = Shard()
    shard.create_table("t", config, saver_parallel=4)
    build_table(n, shard.table("t"))
    n = shard.table("t").size()
    work = tempfile.mkdtemp(prefix="ckpt-bench-", dir=where)
    save, inplace, fresh = Trial(), Trial(), Trial()
    try:
        def save_commit() -> list[str]:
            files = save_shard_checkpoint(shard, work, 1).files
            commit_checkpoint(shard, work, 1, 0)
            return files

        files = save_commit()
        mb = sum(os.path.getsize(p) for p in files) / 1e6
        for _ in range(repeat):
            save.run(save_commit)
        for _ in range(repeat):
            drop_cache(files)
            inplace.run(lambda: restore_shard_checkpoint(shard, work))
        assert shard.table("t").size() == n
        shard.tables.clear()
        gc.collect()
        targets: list[Shard] = []
        for _ in range(repeat):
            drop_cache(files)
            targets[:] = [Shard()]
            fresh.run(lambda: restore_shard_checkpoint(targets[0], work))
            assert targets[0].table("t").size() == n
            targets.clear()
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint of {n:,} entries, {mb:,.0f} MB in {len(files)} files; "
          f"fastest of {repeat} runs")
    for label, t in (("save + commit", save), ("restore in place", inplace),
                     ("restore into new shard", fresh)):
        print(f"{label:24} {t.secs:7.3f} s {mb / t.secs:8,.0f} MB/s"
              + (f"   (busy elsewhere {t.elsewhere:.0%})" if t.elsewhere > 0.1 else ""))


if __name__ == "__main__":
    main()
