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

__all__ = ["fma32", "fma_chain", "sequential_sum32"]


#: Elements per block of :func:`fma32`: two float64 scratch arrays of 1 MiB, big enough
#: to amortize numpy's per-call cost and small enough to stay mostly in cache (the best
#: of 2^13 ... 2^21 measured on a 2 MiB-L2 machine).
FMA_BLOCK = 1 << 17
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
    if (a32.ndim == 0 and a32 == 0) or (b32.ndim == 0 and b32 == 0):
        # A zero factor (e.g. a weight decay of 0): the float32 product is exact (±0,
        # or NaN against inf/NaN), so adding c rounds once, as the FMA does.
        with np.errstate(invalid="ignore"):
            return np.asarray(a32 * b32 + c32, dtype=np.float32)
    if a32.size <= _SMALL and b32.size <= _SMALL and c32.size <= _SMALL:
        return _fma32_small(a32, b32, c32)
    shape = np.broadcast_shapes(a32.shape, b32.shape, c32.shape)
    flat = [x if x.ndim == 0 else np.broadcast_to(x, shape).reshape(-1) for x in (a32, b32, c32)]
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float32)
    size = min(FMA_BLOCK, max(n, 1))
    scratch = np.empty(size, dtype=np.float64)
    other = np.empty(size, dtype=np.float64)
    flag = np.empty(size, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n, FMA_BLOCK):
            hi = min(lo + FMA_BLOCK, n)
            m = hi - lo
            xa, xb, xc = (x if x.ndim == 0 else x[lo:hi] for x in flat)
            s, t = scratch[:m], other[:m]
            # Widen each operand with a plain copy first: a float64 ufunc on float64
            # arrays runs unbuffered, much faster than a mixed-type (casting) one.
            s[...] = xa
            t[...] = xb
            np.multiply(s, t, out=s)  # exact: 24 + 24 bits
            t[...] = xc
            np.add(s, t, out=s)
            o = out[lo:hi]
            o[...] = s
            # Float32 halfway points: the 29 mantissa bits a float32 drops are 1000...0.
            bits = t.view(np.uint64)  # t is free again
            np.bitwise_and(s.view(np.uint64), _BELOW_F32, out=bits)
            suspect = np.equal(bits, _F32_HALFWAY, out=flag[:m])
            # Results in float32's subnormal range (or rounded to its smallest normal or
            # to 0): its halfway points have more zero bits. Zeros that are exact (s == 0)
            # are fine; the rest take the exact path too.
            tiny = np.abs(o) <= np.float32(_F32_MIN_NORMAL)
            if tiny.any():
                tiny &= s != 0
                suspect |= tiny
            if suspect.any():
                at = np.flatnonzero(suspect)
                pick = [x if x.ndim == 0 else x[at] for x in (xa, xb, xc)]
                o[at] = _fma32_exact(*pick)
    return out.reshape(shape)


#: Inputs up to this many elements take :func:`_fma32_small`: a few numpy calls on
#: whole arrays instead of the blocked loop, whose set-up costs tens of µs (an
#: optimizer stepping one hot row once per occurrence makes many such tiny calls).
_SMALL = 4096


def _fma32_small(a32: npt.NDArray[np.float32], b32: npt.NDArray[np.float32],
                 c32: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """:func:`fma32` of small float32 arrays: the same rule, unblocked."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.multiply(a32, b32, dtype=np.float64)  # exact: 24 + 24 bits
        s = np.add(s, c32, dtype=np.float64)
        out = s.astype(np.float32)
        suspect = (s.view(np.uint64) & _BELOW_F32) == _F32_HALFWAY
        suspect |= (np.abs(out) <= np.float32(_F32_MIN_NORMAL)) & (s != 0)
        if suspect.any():
            at = np.nonzero(suspect)
            shape = out.shape
            pick = [np.broadcast_to(x, shape)[at] for x in (a32, b32, c32)]
            out[at] = _fma32_exact(*pick)
    return np.asarray(out)


def fma_chain(a: Any, b: Any, start: Any) -> npt.NDArray[np.float32]:
    """``out[k] = fma32(a[k], b[k], out[k-1])`` for ``k < c``, with ``out[-1] = start``:
    ``c`` dependent FMAs (e.g. one entry's repeated SGD steps), each rounded exactly as
    :func:`fma32` rounds it.

    The products do not depend on the chain, so they are formed once, exactly, in
    float64; each step is then one float64 add and a rounding to float32 (three numpy
    calls on ``start``'s shape, whatever ``c``). The steps whose float64 sum may have
    decided a tie (see :func:`fma32`) are checked afterwards; where the exact FMA
    differs (rare), the chain is redone from that step.

    :param a: ``[c, ...]`` or a scalar; ``b``: ``[c, ...]``; ``start``: ``[...]``.
    :returns: ``float32[c, ...]``.
    """
    a32, b32 = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    first = np.asarray(start, dtype=np.float32)
    shape = np.broadcast_shapes(a32.shape, b32.shape, (1, *first.shape))
    steps = shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        products = np.multiply(a32, b32, dtype=np.float64)  # exact: 24 + 24 bits
        products = np.broadcast_to(products, shape)
        sums = np.empty(shape, dtype=np.float64)
        out = np.empty(shape, dtype=np.float32)
        prev = np.empty(first.shape, dtype=np.float64)

        # Row views made once: the loop below runs once per step, so its cost is the
        # three numpy calls and nothing else.
        product_rows, sum_rows, out_rows = list(products), list(sums), list(out)
        add, copyto = np.add, np.copyto

        def run(begin: int, value: npt.NDArray[np.float32]) -> None:
            prev[...] = value
            for p, s, o in zip(product_rows[begin:], sum_rows[begin:], out_rows[begin:],
                               strict=True):
                add(prev, p, out=s)
                copyto(o, s, casting="same_kind")
                copyto(prev, o)

        run(0, first)
        begin = 0
        while begin < steps:
            s, o = sums[begin:], out[begin:]
            suspect = (s.view(np.uint64) & _BELOW_F32) == _F32_HALFWAY
            suspect |= (np.abs(o) <= np.float32(_F32_MIN_NORMAL)) & (s != 0)
            at = np.flatnonzero(suspect.reshape(suspect.shape[0], -1).any(axis=1)) + begin
            redo = None
            row_shape = shape[1:]
            for j in at.tolist():
                # Only the suspect elements of step j: a step of many rows may hold one.
                where = np.nonzero(suspect[j - begin])
                fixed = _fma32_exact(
                    a32 if a32.ndim == 0 else np.broadcast_to(a32[j], row_shape)[where],
                    np.broadcast_to(b32[j], row_shape)[where],
                    np.broadcast_to(first if j == 0 else out[j - 1], row_shape)[where])
                got = out[j][where]
                if not np.array_equal(fixed.view(np.uint32), got.view(np.uint32)):
                    out[j][where] = fixed
                    redo = j
                    break
            if redo is None:
                break
            run(redo + 1, out[redo])
            begin = redo + 1
    return out


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
