"""Monolith's filter generator: glibc srand/rand seeding and batched xorshift128+.

Expected values come from outside our code: the Rand32 stream and filter decisions
recorded from Monolith's compiled C++ (tests/data/monolith_vectors/filters.json) and
outputs of glibc's own ``rand()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.filters import ProbabilisticFilter
from ps_server.engine.filters.xorshift import (
    BLOCK,
    XorShift128Plus,
    glibc_rand,
    monolith_state,
    xorshift_taps,
)

VECTORS = Path(__file__).resolve().parents[2] / "data" / "monolith_vectors" / "filters.json"
M64 = (1 << 64) - 1


def _vectors() -> dict:
    with open(VECTORS, encoding="utf-8") as f:
        return json.load(f)["probabilistic"]


def test_glibc_rand_matches_glibc() -> None:
    # glibc 2.36 rand() after srand(seed); seed 0 behaves as 1.
    assert glibc_rand(1, 3) == [1804289383, 846930886, 1681692777]
    assert glibc_rand(0, 3) == glibc_rand(1, 3)
    assert glibc_rand(1700000000, 3) == [280491303, 626398474, 65378190]
    # A seed >= 2**31 is a negative int32 inside glibc.
    assert glibc_rand(3000000000, 3) == [2058147116, 854483408, 922419988]
    assert glibc_rand(3000000000 + (1 << 32), 3) == glibc_rand(3000000000, 3)


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no libc")
def test_glibc_rand_matches_this_libc_when_glibc() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(12345)
    first = [libc.rand() for _ in range(5)]
    if first[0] != 383100999:  # not glibc (musl, macOS): nothing to compare
        pytest.skip("the C library is not glibc")
    assert glibc_rand(12345, 5) == first
    libc.srand(4294967295)
    assert glibc_rand(4294967295, 5) == [libc.rand() for _ in range(5)]


def test_first_draws_are_monolith_rand32() -> None:
    v = _vectors()
    got = XorShift128Plus(v["fixed_time"]).rand32(64)
    assert got.dtype == np.uint32
    assert got.tolist() == v["rand32_first64"]


def test_batches_of_any_size_continue_one_stream() -> None:
    v = _vectors()
    g = XorShift128Plus(v["fixed_time"])
    parts = [g.rand32(n) for n in (0, 1, 5, 0, 17, 41)]
    assert np.concatenate(parts).tolist() == v["rand32_first64"]
    assert g.draws == 64


def _reference(seed: int, n: int) -> np.ndarray:
    """Monolith's step, one call at a time (the definition the batches must equal)."""
    s0, s1 = monolith_state(seed)
    out = []
    for _ in range(n):
        x, y = s0, s1
        s0 = y
        x ^= (x << 23) & M64
        x ^= x >> 17
        x ^= y ^ (y >> 26)
        s1 = x
        out.append((x + y) & 0xFFFFFFFF)
    return np.array(out, dtype=np.uint32)


def test_long_stream_equals_sequential_steps() -> None:
    # Long enough for the lag to reach BLOCK and the history to be compacted.
    n = 128 * BLOCK * 2 + 777
    want = _reference(99, n)
    g = XorShift128Plus(99)
    rng = np.random.default_rng(5)
    parts, done = [], 0
    while done < n:
        k = min(n - done, int(rng.choice([1, 3, 100, 5000, 70000])))
        parts.append(g.rand32(k))
        done += k
    assert np.array_equal(np.concatenate(parts), want)


def test_recurrence_taps() -> None:
    taps = xorshift_taps()
    assert taps.min() == 0 and taps.max() < 128  # degree 128, constant term present
    # z[k+128] = XOR of z[k+j]: check on 64-bit words from a state.
    s0, s1 = monolith_state(3)
    z = [s0, s1]
    while len(z) < 400:
        x = z[-2] ^ ((z[-2] << 23) & M64)
        x ^= x >> 17
        z.append(x ^ z[-1] ^ (z[-1] >> 26))
    for k in range(0, 400 - 128):
        acc = 0
        for j in taps:
            acc ^= z[k + int(j)]
        assert acc == z[k + 128]


def test_state_option() -> None:
    s = monolith_state(1700000000)
    a, b = XorShift128Plus(state=s), XorShift128Plus(1700000000)
    assert np.array_equal(a.rand32(300), b.rand32(300))
    with pytest.raises(ValueError):
        XorShift128Plus(state=(0, 0))
    with pytest.raises(ValueError):
        XorShift128Plus(1, state=s)


def test_unseeded_streams_differ_and_report_their_seed() -> None:
    a, b = XorShift128Plus(), XorShift128Plus()
    assert a.seed is not None and 0 <= a.seed < 1 << 32
    assert not np.array_equal(a.rand32(64), b.rand32(64))
    again = XorShift128Plus(a.seed)
    again.rand32(64)
    assert np.array_equal(a.rand32(10), again.rand32(10))


def _cfg(default: int, **slots: int) -> eht.SlotOccurrenceThresholdConfig:
    cfg = eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=default)
    for slot, t in slots.items():
        cfg.slot_occurrence_thresholds.add(slot=int(slot[1:]), occurrence_threshold=t)
    return cfg


def test_filter_with_monolith_seed_reproduces_every_recorded_run() -> None:
    v = _vectors()
    ids = np.arange(64, dtype=np.int64)
    for run in v["runs"]:
        if "filtered_first64" not in run:
            continue
        f = ProbabilisticFilter(run["equal_probability"], _cfg(run["threshold"]),
                                seed=v["fixed_time"])
        got = f.should_be_filtered(ids, np.full(64, run["count"], np.uint32), with_table=True)
        assert got.astype(int).tolist() == run["filtered_first64"], run["name"]
        assert f.seed == v["fixed_time"]


def test_every_asked_occurrence_draws_even_at_threshold_zero() -> None:
    # Monolith's filter draws for each missing id whatever its threshold; a slot with
    # threshold 0 admits but still moves the stream.
    v = _vectors()
    (t7,) = [r for r in v["runs"] if r["name"] == "unequal_c1_t7"]
    slot1 = np.int64(1 << 48)  # an id in slot 1
    f = ProbabilisticFilter(False, _cfg(7, s1=0), seed=v["fixed_time"])
    ids = np.arange(64, dtype=np.int64)
    ids[::2] += slot1  # even positions: threshold 0
    got = f.should_be_filtered(ids, None, with_table=True)
    want = np.array(t7["filtered_first64"], dtype=bool)
    want[::2] = False
    assert np.array_equal(got, want)


def test_no_table_draws_nothing() -> None:
    v = _vectors()
    (t7,) = [r for r in v["runs"] if r["name"] == "unequal_c1_t7"]
    f = ProbabilisticFilter(False, _cfg(7), seed=v["fixed_time"])
    assert not f.should_be_filtered(np.arange(1000), None, with_table=False).any()
    got = f.should_be_filtered(np.arange(64), None, with_table=True)
    assert got.astype(int).tolist() == t7["filtered_first64"]


def test_state_can_be_read_and_handed_over() -> None:
    v = _vectors()
    a = XorShift128Plus(v["fixed_time"])
    assert a.state == monolith_state(v["fixed_time"])
    a.rand32(10)
    b = XorShift128Plus(5)
    b.state = a.state  # b now continues a's stream
    assert b.rand32(54).tolist() == v["rand32_first64"][10:]
    big = XorShift128Plus(5)
    big.rand32(200_000)
    c = XorShift128Plus(6)
    c.state = big.state
    assert np.array_equal(c.rand32(1000), big.rand32(1000))
    with pytest.raises(ValueError):
        c.state = (0, 0)
