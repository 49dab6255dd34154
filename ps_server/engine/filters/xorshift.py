"""Monolith's filter random source: glibc ``srand``/``rand`` seeding, then xorshift128+.

Monolith's probabilistic filter draws ``Rand32`` from a per-thread generator that its
constructor seeds like this (facts measured on Monolith's compiled code, see
``tests/data/monolith_vectors/filters.json``):

1. ``srand(seed)`` with ``seed = time(0)`` (glibc's default ``TYPE_3`` generator);
2. ``x = rand1 * 2147483647 + rand2`` (the first two ``rand()`` outputs, in that
   order, as ``uint64``);
3. sixteen xorshift64* outputs from ``x`` fill the state ``s[0..15]``; only ``s[0]``
   and ``s[1]`` are used afterwards;
4. each draw is the low 32 bits of one xorshift128+ step over ``(s[0], s[1])``.

:class:`XorShift128Plus` reproduces that stream bit for bit, in batches.

Batch form. Write the state after ``k`` steps as ``(z[k], z[k+1])``; a step computes
``z[k+2]`` from ``z[k]`` and ``z[k+1]`` and draw ``k`` is ``low32(z[k+1] + z[k+2])``.
The step is linear over GF(2), so every bit of ``z`` obeys the generator's degree-128
characteristic polynomial ``P``: ``z[k+128] = XOR of z[k+j]`` over the taps ``j`` of
``P`` (found once by Berlekamp-Massey, cached). Over GF(2), ``P(x)^L = P(x^L)`` for
``L`` a power of two, so ``z[k+128L] = XOR of z[k+jL]``: given the last ``128 L``
values, the next ``L`` come from one XOR reduction over the tap rows of that history
seen as a ``128 x L`` matrix. The first 128 values are stepped directly (once, at
construction); ``L`` then doubles as history accumulates, up to :data:`BLOCK`.

Cost: about ``len(taps)`` (~ 64) uint64 XORs per draw inside numpy, plus a
``128 * BLOCK`` uint64 history (1 MiB) per generator; a few tens of ns per draw,
against ~1 us for a Python loop per draw.
"""

from __future__ import annotations

import secrets
from functools import cache

import numpy as np
import numpy.typing as npt

__all__ = ["BLOCK", "XorShift128Plus", "glibc_rand", "monolith_state", "xorshift_taps"]

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_RAND_MAX = 2147483647
_DEGREE = 128
#: Largest block of values produced by one XOR reduction (a power of two).
BLOCK = 1024
_HISTORY = _DEGREE * BLOCK

_U64 = npt.NDArray[np.uint64]


def glibc_rand(seed: int, n: int) -> list[int]:
    """The first ``n`` outputs of glibc ``rand()`` after ``srand(seed)`` (TYPE_3).

    ``seed`` is taken as C's ``unsigned int`` (modulo 2**32); 0 acts as 1, as in glibc.
    The state is 31 words from the Park-Miller LCG (``16807 * x mod 2**31 - 1``,
    Schrage's method on the signed seed), then an additive lagged-Fibonacci
    recurrence ``r[i] = r[i-31] + r[i-3]`` (mod 2**32) of which 310 values are
    skipped; each output is ``r[i] >> 1``.
    """
    u = seed & _M32
    if u == 0:
        u = 1
    word = u - (1 << 32) if u >= 1 << 31 else u  # glibc keeps the seed as int32
    r = [word & _M32]
    for _ in range(30):
        q = abs(word) // 127773
        hi = q if word >= 0 else -q  # C division truncates toward zero
        lo = word - hi * 127773
        word = 16807 * lo - 2836 * hi
        if word < 0:
            word += 2147483647
        r.append(word & _M32)
    r += r[:3]
    for i in range(34, 344 + n):
        r.append((r[i - 31] + r[i - 3]) & _M32)
    return [v >> 1 for v in r[344:344 + n]]


def monolith_state(seed: int) -> tuple[int, int]:
    """``(s[0], s[1])`` of Monolith's ``XorShift`` constructed while ``time(0) == seed``."""
    a, b = glibc_rand(seed, 2)
    x = (a * _RAND_MAX + b) & _M64
    out = []
    for _ in range(2):  # s[2..15] are filled too, but never read by Rand32
        x ^= x >> 12
        x ^= (x << 25) & _M64
        x ^= x >> 27
        out.append((x * 2685821657736338717) & _M64)
    return out[0], out[1]


def _step(z0: int, z1: int) -> int:
    """One xorshift128+ step: the new ``s[1]`` from ``s[0] = z0`` and ``s[1] = z1``."""
    x = z0 ^ ((z0 << 23) & _M64)
    x ^= x >> 17
    return x ^ z1 ^ (z1 >> 26)


def _stepped(z0: int, z1: int, n: int) -> list[int]:
    z = [z0, z1]
    while len(z) < n:
        z.append(_step(z[-2], z[-1]))
    return z[:n]


@cache
def xorshift_taps() -> npt.NDArray[np.intp]:
    """Taps ``j`` (``0 <= j < 128``) with ``z[k+128] = XOR of z[k+j]`` for xorshift128+.

    Berlekamp-Massey over the low bit of a fixed stream finds the recurrence; it has
    degree 128 (the generator's full period), so it holds for every bit and state.
    """
    bits = [v & 1 for v in _stepped(0x123456789ABCDEF, 0xFEDCBA987654321, 4 * _DEGREE)]
    conn, length, prev, last = 1, 0, 1, -1
    for i, bit in enumerate(bits):
        d = bit
        for j in range(1, length + 1):
            if (conn >> j) & 1:
                d ^= bits[i - j]
        if d:
            old = conn
            conn ^= prev << (i - last)
            if 2 * length <= i:
                length, last, prev = i + 1 - length, i, old
    if length != _DEGREE:  # pragma: no cover - a property of the generator
        raise AssertionError(f"xorshift128+ recurrence has degree {length}, expected 128")
    return np.array(
        sorted(_DEGREE - j for j in range(1, _DEGREE + 1) if (conn >> j) & 1), dtype=np.intp
    )


class XorShift128Plus:
    """Monolith's ``XorShift::Rand32`` stream, drawn in batches.

    :param seed: what Monolith's ``srand`` receives (its ``time(0)``), taken modulo
        2**32; ``None`` picks one from OS entropy (a fresh, unrepeatable stream, as
        Monolith's wall-clock seed is in practice).
    :param state: ``(s[0], s[1])`` to start from instead of a seed (not both zero).
    """

    def __init__(self, seed: int | None = None, *, state: tuple[int, int] | None = None) -> None:
        if state is None:
            self.seed: int | None = secrets.randbits(32) if seed is None else int(seed) & _M32
            s0, s1 = monolith_state(self.seed)
        else:
            if seed is not None:
                raise ValueError("give a seed or a state, not both")
            self.seed = None
            s0, s1 = int(state[0]) & _M64, int(state[1]) & _M64
            if s0 == 0 and s1 == 0:
                raise ValueError("xorshift128+ state must not be all zero")
        self._taps = xorshift_taps()
        # z[_base + i] = _z[i]; valid for i < _len. Draw k uses z[k+1] and z[k+2].
        self._z: _U64 = np.array(_stepped(s0, s1, _DEGREE), dtype=np.uint64)
        self._base = 0
        self._len = _DEGREE
        self.draws = 0  # draws made so far

    @property
    def state(self) -> tuple[int, int]:
        """``(s[0], s[1])`` now: the generator Monolith would hold after these draws."""
        i = self.draws - self._base
        return int(self._z[i]), int(self._z[i + 1])

    @state.setter
    def state(self, value: tuple[int, int]) -> None:
        s0, s1 = int(value[0]) & _M64, int(value[1]) & _M64
        if s0 == 0 and s1 == 0:
            raise ValueError("xorshift128+ state must not be all zero")
        self._z = np.array(_stepped(s0, s1, _DEGREE), dtype=np.uint64)
        self._base, self._len = self.draws, _DEGREE

    def rand32(self, n: int) -> npt.NDArray[np.uint32]:
        """The next ``n`` draws (``uint32[n]``), as ``n`` calls of ``Rand32()``."""
        if n <= 0:
            return np.zeros(0, dtype=np.uint32)
        self._extend(self.draws + n + 2)
        first = self.draws + 1 - self._base
        z = self._z[first:first + n + 1]
        self.draws += n
        return (z[:-1] + z[1:]).astype(np.uint32)  # uint64 addition wraps; keep low 32

    def _extend(self, upto: int) -> None:
        """Make ``z`` valid for absolute indices below ``upto``."""
        end = self._base + self._len
        if upto <= end:
            return
        keep_from = min(self.draws + 1, max(self._base, end - _HISTORY))
        kept = self._z[keep_from - self._base:self._len]
        buf = np.empty(kept.size + (upto - end) + BLOCK, dtype=np.uint64)
        buf[:kept.size] = kept
        self._z, self._base, self._len = buf, keep_from, kept.size
        taps = self._taps
        while self._base + self._len < upto:
            m = self._len  # values available, all consecutive
            lag = min(BLOCK, 1 << ((m // _DEGREE).bit_length() - 1))
            hist = self._z[m - _DEGREE * lag:m].reshape(_DEGREE, lag)
            np.bitwise_xor.reduce(hist[taps], axis=0, out=self._z[m:m + lag])
            self._len = m + lag
