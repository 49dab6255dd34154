"""Float32 arithmetic as Monolith's compiled C++ does it (docs/semantics.md §5.4).

Monolith is built with ``-O3 -mavx2 -mfma`` and g++'s default ``-ffp-contract=fast``,
so ``a*b + c`` in its C++ becomes one fused multiply-add: a single rounding of the
exact ``a*b + c`` to float32. numpy has no FMA, so :func:`fma32` computes it exactly:

* ``a*b`` of two float32 values is exact in float64 (24 + 24 <= 53 mantissa bits);
* the float64 sum ``s = p + c`` and its exact error ``e`` (Knuth's TwoSum) are formed;
* ``s`` is turned into the *round-to-odd* float64 of ``p + c`` (if ``e != 0`` and the
  last mantissa bit of ``s`` is even, step one float64 ulp towards ``e``);
* rounding that to float32 is then the correctly rounded ``p + c`` (round-to-odd
  with at least two extra bits, 53 >= 24 + 2, makes the second rounding innocuous;
  Boldo & Melquiond, "When double rounding is odd", 2005). A plain ``float32(p + c)``
  is *not* always right: ``p + c`` rounded to float64 can land exactly on a float32
  halfway point and then round the wrong way.

Non-finite inputs give what the float64 sum gives (inf/NaN), as an FMA would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["fma32", "sequential_sum32"]


#: Elements per block of :func:`fma32` (float64 scratch of 256 KiB: stays in cache).
FMA_BLOCK = 1 << 15
_BELOW_F32 = np.uint64((1 << 29) - 1)  # float64 mantissa bits a float32 drops
_F32_HALFWAY = np.uint64(1 << 28)  # ... when the float64 is a float32 halfway point
_F32_MIN_NORMAL = 2.0**-126


def fma32(a: Any, b: Any, c: Any) -> npt.NDArray[np.float32]:
    """``a*b + c`` with one rounding to float32 (inputs are taken as float32; they
    broadcast).

    The float64 ``s = a*b + c`` rounded to float32 is already the FMA unless ``s`` is
    a float32 halfway point (its 29 low mantissa bits ``1000…0``) or in float32's
    subnormal range, where the first rounding may have decided the tie: only those
    rare elements take the exact path (:func:`_fma32_exact`). Blocks of
    :data:`FMA_BLOCK` elements keep the float64 scratch in cache.
    """
    a32, b32, c32 = (np.asarray(x, dtype=np.float32) for x in (a, b, c))
    shape = np.broadcast_shapes(a32.shape, b32.shape, c32.shape)
    flat = [x if x.ndim == 0 else np.broadcast_to(x, shape).reshape(-1) for x in (a32, b32, c32)]
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float32)
    scratch = np.empty(min(FMA_BLOCK, max(n, 1)), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n, FMA_BLOCK):
            hi = min(lo + FMA_BLOCK, n)
            xa, xb, xc = (x if x.ndim == 0 else x[lo:hi] for x in flat)
            s = scratch[: hi - lo]
            np.multiply(xa, xb, out=s, dtype=np.float64)  # exact: 24 + 24 bits
            np.add(s, xc, out=s, dtype=np.float64)
            out[lo:hi] = s
            bits = s.view(np.uint64)
            suspect = (bits & _BELOW_F32) == _F32_HALFWAY
            tiny = np.abs(s) < _F32_MIN_NORMAL
            tiny &= s != 0
            suspect |= tiny
            if suspect.any():
                at = np.flatnonzero(suspect)
                pick = [x if x.ndim == 0 else x[at] for x in (xa, xb, xc)]
                out[lo + at] = _fma32_exact(*pick)
    return out.reshape(shape)


def _fma32_exact(a: Any, b: Any, c: Any) -> npt.NDArray[np.float32]:
    """:func:`fma32` for any input, by round-to-odd (the module docstring)."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    c64 = np.asarray(c, dtype=np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a64 * b64
        s = np.asarray(p + c64)
        # TwoSum: e = (p + c) - s exactly.
        bb = s - p
        e = (p - (s - bb)) + (c64 - bb)
        si = s.view(np.int64)
        # Inexact and even: step one ulp towards the exact sum (same sign as s: away
        # from zero, bits + 1; else bits - 1); both neighbours are odd. e is NaN only
        # when s is not finite, and then e != 0 but the step is skipped.
        fix = (e != 0) & ((si & 1) == 0) & np.isfinite(s)
        step = np.where((e > 0) == (s > 0), 1, -1) * fix
        si += step
        return np.asarray(s.astype(np.float32))


def sequential_sum32(x: npt.NDArray[np.float32], axis: int = -1) -> npt.NDArray[np.float32]:
    """Float32 sum along ``axis`` added strictly left to right (a C ``for`` loop's
    ``sum += x[i]``), not numpy's pairwise summation."""
    acc = np.add.accumulate(np.asarray(x, dtype=np.float32), axis=axis, dtype=np.float32)
    return np.asarray(np.take(acc, -1, axis=axis))
