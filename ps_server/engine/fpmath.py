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


def fma32(a: Any, b: Any, c: Any) -> npt.NDArray[np.float32]:
    """``a*b + c`` with one rounding to float32 (inputs are taken as float32)."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    c64 = np.asarray(c, dtype=np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a64 * b64
        s = p + c64
        # TwoSum: e = (p + c) - s exactly.
        bb = s - p
        e = (p - (s - bb)) + (c64 - bb)
        s = np.asarray(s)
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
