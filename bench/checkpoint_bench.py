"""Checkpoint benchmark: table save/restore against raw file I/O of the same bytes.

Builds an N x 32 Adagrad table (N = 4M, ``--quick``: 500k; random int64 ids, one
optimizer step each), then measures in one process, on one disk:

* **save** (``save_table``, 4 files): entries/s, MB/s of file bytes, and the ratio to
  a raw sequential write of the same number of bytes (16 MiB ``write`` calls into 4
  files, ``fsync`` each: the durability a save gives);
* **restore** (``restore_table``) into the same table (in place: a checking pass over
  every file, then the loading pass; storage already sized) and into a fresh table
  (one pass; storage grows as entries arrive): MB/s and the ratio to a raw sequential
  read of the same bytes;
* **peak extra memory** during each: the highest RSS seen by a sampling thread (every
  2 ms) minus the RSS before the operation (for the fresh table also minus its final
  size), relative to the table's own bytes (``table.nbytes()``).

Page cache: every file (raw and table) is written, fsynced, then evicted from the
page cache with ``posix_fadvise(DONTNEED)`` (allowed without privileges for clean
pages) before it is read, so both reads start from the device. The restore's second
pass rereads files the first pass just read (cached), as it would in production.
A cached raw read is printed for reference.

Usage: ``python bench/checkpoint_bench.py [--quick] [--entries N] [--dir PATH]``.
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
from typing import TypeVar

import numpy as np
import psutil

from ps_server.checkpoint.table_files import restore_table, save_table
from ps_server.engine import configs
from ps_server.engine.hash_table import EmbeddingHashTable

DIM = 32
BLOCK = 16 << 20
T = TypeVar("T")


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


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def raw_write(directory: str, sizes: list[int]) -> list[str]:
    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    paths = []
    for k, size in enumerate(sizes):
        path = os.path.join(directory, f"raw-{k}")
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, BLOCK)])
                left -= BLOCK
            f.flush()
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def raw_read(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(BLOCK):
                total += len(chunk)
    return total


def build_table(n: int) -> EmbeddingHashTable:
    table = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.adagrad()))
    rng = np.random.default_rng(1)
    step = 1 << 18
    for start in range(0, n, step):
        m = min(step, n - start)
        ids = rng.integers(-(1 << 62), 1 << 62, m, dtype=np.int64)
        grads = rng.standard_normal((m, DIM), dtype=np.float32)
        table.apply_gradients(ids, grads, [0.05], req_time=1_700_000_000 + start)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500k entries instead of 4M")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    args = parser.parse_args()
    n = args.entries or (500_000 if args.quick else 4_000_000)

    print(f"building a {n:,} x {DIM} Adagrad table ...", flush=True)
    table = build_table(n)
    n = table.size()
    table_bytes = table.nbytes()
    print(f"table: {n:,} entries, {table_bytes / 2**20:,.0f} MiB in memory")

    work = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    try:
        base = os.path.join(work, "t")
        with peak_rss() as save_mem:
            t0 = time.perf_counter()
            result = save_table(table, base, shard_index=0, nshards=4)
            save_s = time.perf_counter() - t0
        sizes = [os.path.getsize(p) for p in result.files]
        nbytes = sum(sizes)
        mb = nbytes / 1e6

        raw_paths, raw_write_s = timed(lambda: raw_write(work, sizes))
        drop_cache(raw_paths)
        _, raw_read_s = timed(lambda: raw_read(raw_paths))
        _, raw_hot_s = timed(lambda: raw_read(raw_paths))
        for p in raw_paths:
            os.unlink(p)

        drop_cache(result.files)
        with peak_rss() as inplace_mem:
            t0 = time.perf_counter()
            got = restore_table(table, base, shard_index=0, num_shards=1)
            inplace_s = time.perf_counter() - t0
        assert got.entries == n, got

        del table
        gc.collect()
        drop_cache(result.files)
        fresh = EmbeddingHashTable(configs.table_config(DIM, optimizer=configs.adagrad()))
        with peak_rss() as fresh_mem:
            t0 = time.perf_counter()
            got = restore_table(fresh, base, shard_index=0, num_shards=1)
            fresh_s = time.perf_counter() - t0
        assert got.entries == n, got
        fresh_bytes = fresh.nbytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    raw_w, raw_r, raw_h = mb / raw_write_s, mb / raw_read_s, mb / raw_hot_s
    print(f"files: {len(result.files)} x ~{sizes[0] / 1e6:,.0f} MB = {mb:,.0f} MB "
          f"({nbytes / n:.0f} bytes/entry)")
    print(f"raw write+fsync        {raw_w:8,.0f} MB/s")
    print(f"raw read (cold)        {raw_r:8,.0f} MB/s   (cached: {raw_h:,.0f} MB/s)")
    print()
    print(f"{'':22} {'entries/s':>12} {'MB/s':>8} {'vs raw':>7} {'peak extra mem':>22}")

    def row(label: str, secs: float, raw: float, mem: list[int], grown: int, ref: int) -> None:
        extra = max(0, mem[1] - mem[0] - grown)
        print(f"{label:22} {n / secs:12,.0f} {mb / secs:8,.0f} {mb / secs / raw:6.2f}x "
              f"{extra / 2**20:9,.0f} MiB = {extra / ref:4.2f}x table")

    row("save", save_s, raw_w, save_mem, 0, table_bytes)
    row("restore in place", inplace_s, raw_r, inplace_mem, 0, table_bytes)
    row("restore fresh table", fresh_s, raw_r, fresh_mem, fresh_bytes, fresh_bytes)
    print(f"{'':22} (fresh: peak {(fresh_mem[1] - fresh_mem[0]) / 2**20:,.0f} MiB above the "
          f"baseline for a table of {fresh_bytes / 2**20:,.0f} MiB allocated)")
    print("\nrestore in place: a checking pass over every file, then the loading pass (the "
          "live table\nis only touched once everything checked); a fresh (empty) table is "
          "loaded in one pass.\n'vs raw' compares with one raw read of the bytes. Fresh "
          "table memory: peak above the\nbaseline plus the table's final size (its growth "
          "by doubling is included).")


if __name__ == "__main__":
    main()
