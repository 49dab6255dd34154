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

__all__ = ["expm1f", "fma32", "fma64", "fma_chain", "powf_half", "sequential_sum32", "tanhf"]


#: Elements per block of :func:`fma32`: two float64 scratch arrays of 1 MiB, big enough
#: to amortize numpy's per-call cost and small enough to stay mostly in cache (the best
#: of 2^13 ... 2^21 measured on a 2 MiB-L2 machine).
FMA_BLOCK = 1 << 17
_BELOW_F32 = np.uint64((1 << 29) - 1)  # float64 mantissa bits a float32 drops
_F32_HALFWAY = np.uint64(1 << 28)  # ... when the float64 is a float32 halfway point
_F32_MIN_NORMAL = 2.0**-126


def fma32(a: Any, b: Any, c: Any, out: npt.NDArray[np.float32] | None = None
          ) -> npt.NDArray[np.float32]:
    """``a*b + c`` with one rounding to float32 (inputs are taken as float32; they
    broadcast).

    :param out: a C-contiguous ``float32`` array of the broadcast shape to write the
        result into (and return), saving an allocation and a copy when the caller has
        a buffer; it may be one of the inputs (the result then goes through a
        temporary).

    The float64 ``s = a*b + c`` rounded to float32 is already the FMA unless ``s`` is
    a float32 halfway point (its 29 low mantissa bits ``1000…0``) or in float32's
    subnormal range, where the first rounding may have decided the tie: only those
    rare elements take the exact path (:func:`_fma32_exact`). Blocks of
    :data:`FMA_BLOCK` elements keep the float64 scratch in cache.
    """
    a32, b32, c32 = (np.asarray(x, dtype=np.float32) for x in (a, b, c))
    if out is not None:
        if not (out.dtype == np.float32 and out.flags.c_contiguous
                and out.shape == np.broadcast_shapes(a32.shape, b32.shape, c32.shape)):
            raise ValueError("fma32: out must be C-contiguous float32 of the result's shape")
        if any(np.shares_memory(out, x) for x in (a32, b32, c32)):
            out[...] = fma32(a32, b32, c32)
            return out
    if (a32.ndim == 0 and a32 == 0) or (b32.ndim == 0 and b32 == 0):
        # A zero factor (e.g. a weight decay of 0): the float32 product is exact (±0,
        # or NaN against inf/NaN), so adding c rounds once, as the FMA does.
        with np.errstate(invalid="ignore"):
            if out is not None:
                np.multiply(a32, b32, out=out)
                np.add(out, c32, out=out)
                return out
            return np.asarray(a32 * b32 + c32, dtype=np.float32)
    if a32.size <= _SMALL and b32.size <= _SMALL and c32.size <= _SMALL:
        small = _fma32_small(a32, b32, c32)
        if out is None:
            return small
        out[...] = small
        return out
    square = a32 is b32 and a32.ndim > 0  # fma32(g, g, c): widen g once
    shape = np.broadcast_shapes(a32.shape, b32.shape, c32.shape)
    flat = [x if x.ndim == 0 else np.broadcast_to(x, shape).reshape(-1) for x in (a32, b32, c32)]
    if flat[0].ndim == 0 and flat[1].ndim != 0:
        flat[0], flat[1] = flat[1], flat[0]  # a scalar factor goes second
    n = int(np.prod(shape, dtype=np.int64))
    result = np.empty(n, dtype=np.float32) if out is None else out.reshape(-1)
    size = min(FMA_BLOCK, max(n, 1))
    scratch = np.empty(size, dtype=np.float64)
    other = np.empty(size, dtype=np.float64)
    flag = np.empty(size, dtype=bool)
    magnitude = np.empty(size, dtype=np.float32)
    xa, xb, xc = flat
    # Scalars enter the float64 ufuncs as Python floats (exact: float32 values).
    fb = float(xb) if xb.ndim == 0 else None
    fc = float(xc) if xc.ndim == 0 else None
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, n, FMA_BLOCK):
            hi = min(lo + FMA_BLOCK, n)
            m = hi - lo
            s, t = scratch[:m], other[:m]
            # Widen each operand with a plain copy first: a float64 ufunc on float64
            # arrays runs unbuffered, much faster than a mixed-type (casting) one.
            if xa.ndim == 0:  # both factors scalars
                s.fill(float(xa) * float(xb))  # exact: 24 + 24 bits
            else:
                np.copyto(s, xa[lo:hi])
                if square:
                    np.multiply(s, s, out=s)  # exact: 24 + 24 bits
                elif fb is None:
                    np.copyto(t, xb[lo:hi])
                    np.multiply(s, t, out=s)  # exact: 24 + 24 bits
                else:
                    np.multiply(s, fb, out=s)
            if fc is None:
                np.copyto(t, xc[lo:hi])
                np.add(s, t, out=s)
            else:
                np.add(s, fc, out=s)
            o = result[lo:hi]
            np.copyto(o, s, casting="same_kind")
            # Float32 halfway points: the 29 mantissa bits a float32 drops are 1000...0.
            bits = t.view(np.uint64)  # t is free again
            np.bitwise_and(s.view(np.uint64), _BELOW_F32, out=bits)
            suspect = np.equal(bits, _F32_HALFWAY, out=flag[:m])
            # Results in float32's subnormal range (or rounded to its smallest normal or
            # to 0): its halfway points have more zero bits. Zeros that are exact (s == 0)
            # are fine; the rest take the exact path too.
            mag = np.abs(o, out=magnitude[:m])
            if mag.min() <= np.float32(_F32_MIN_NORMAL):
                tiny = (mag <= np.float32(_F32_MIN_NORMAL)) & (s != 0)
                suspect |= tiny
            if suspect.any():
                at = np.flatnonzero(suspect)
                pick = [x if x.ndim == 0 else x[lo:hi][at] for x in (xa, xb, xc)]
                o[at] = _fma32_exact(*pick)
    return result.reshape(shape) if out is None else out


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


# ----------------------------------------------------------------- glibc float functions
#
# Monolith's HashNet retriever calls ``std::tanh(float)`` and ``std::pow(float, float)``,
# i.e. glibc's ``tanhf`` and ``powf``. The vectors were recorded against glibc 2.36, whose
# ``tanhf`` is fdlibm's (via ``expm1f``) and is *not* correctly rounded: a float64
# ``tanh`` rounded once to float32 differs from it in the last bit for about one input in
# eight. :func:`tanhf` below follows fdlibm's float algorithm step by step, each
# operation a float32 operation as glibc's SSE code performs it (glibc's generic x86-64
# build has no FMA, so nothing there is fused).

_F32 = np.float32
#: Elements per block of :func:`tanhf` (its temporaries, 4 bytes each, stay in cache).
LIBM_BLOCK = 1 << 16
_LN2_HI = np.uint32(0x3F317180).view(np.float32)
_LN2_LO = np.uint32(0x3717F7D1).view(np.float32)
_INV_LN2 = np.uint32(0x3FB8AA3B).view(np.float32)
# fdlibm's scaled expm1 coefficients Q1..Q5 (as float32 bit patterns).
_EXPM1_Q = np.array([0xBD088889, 0x3AD00D01, 0xB8A670CD, 0x36867E54, 0xB457EDBB],
                    dtype=np.uint32).view(np.float32)


def _with_exponent_added(y: npt.NDArray[np.float32], k: npt.NDArray[np.int32]
                         ) -> npt.NDArray[np.float32]:
    """``y * 2**k`` by adding ``k`` to the float32 exponent field (no range checks)."""
    bits = y.view(np.int32) + (k.astype(np.int32) << 23)
    return np.asarray(bits.view(np.float32))


def expm1f(x: Any) -> npt.NDArray[np.float32]:
    """glibc 2.36 ``expm1f`` (fdlibm's algorithm), bit for bit, on float32 arrays.

    Every lane runs the reduction and polynomial and the result of its branch is
    selected (``np.where``), which is much faster in numpy than gathering each branch.
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        hx = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
        neg = x.view(np.int32) < 0
        out = _expm1f_main(x, hx, neg)
        # |x| < 2^-25: x itself.
        out = np.where(hx < np.uint32(0x33000000), x, out)
        # x < -27 ln2: -1 (tiny - 1 rounds to -1).
        out = np.where((hx >= np.uint32(0x4195B844)) & neg, _F32(-1), out)
        # Not finite, or beyond the overflow threshold: NaN stays NaN (x + x), exp(+inf)
        # - 1 = +inf, exp(-inf) - 1 = -1, x > 88.72 overflows to +inf.
        big = hx >= np.uint32(0x42B17218)
        if big.any():
            out = np.where(big, np.where(neg, _F32(-1), _F32(np.inf)), out)
            out = np.where(np.isnan(x), x + x, out)
    return np.asarray(out, dtype=np.float32)


def _expm1f_main(x: npt.NDArray[np.float32], hx: npt.NDArray[np.uint32],
                 neg: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """:func:`expm1f` for 2^-25 <= |x| < 88.72 (x > -27 ln2): reduction and polynomial.
    Other lanes compute garbage that :func:`expm1f` replaces."""
    one, half, two = _F32(1), _F32(0.5), _F32(2)
    reduce = hx > np.uint32(0x3EB17218)  # |x| > ln2 / 2
    near = reduce & (hx < np.uint32(0x3F851592))  # ... and |x| < 1.5 ln2: k = ±1
    # k = (int)(x / ln2 ± 0.5) (truncation), then x - k ln2 as hi - lo.
    kf = np.trunc(_INV_LN2 * x + np.where(neg, -half, half))
    kf = np.where(np.abs(kf) < _F32(2.0**30), kf, _F32(0))
    t = kf.astype(np.float32)
    hi = np.where(near, x + np.where(neg, _LN2_HI, -_LN2_HI), x - t * _LN2_HI)
    lo = np.where(near, np.where(neg, -_LN2_LO, _LN2_LO), t * _LN2_LO)
    k = np.where(near, np.where(neg, -1, 1), kf.astype(np.int32))
    k = np.where(reduce, k, 0).astype(np.int32)
    xr = np.where(reduce, hi - lo, x)
    c = np.where(reduce, (hi - xr) - lo, _F32(0))

    x = xr
    q1, q2, q3, q4, q5 = _EXPM1_Q
    hfx = half * x
    hxs = x * hfx
    r1 = one + hxs * (q1 + hxs * (q2 + hxs * (q3 + hxs * (q4 + hxs * q5))))
    t = _F32(3) - r1 * hfx
    e = hxs * ((r1 - t) / (_F32(6) - x * t))

    out = x - (x * e - hxs)  # k == 0 (c is 0)
    if not (k != 0).any():
        return np.asarray(out)
    e = (x * (e - c) - c) - hxs
    out = np.where(k == -1, half * (x - e) - half, out)
    if (k == 1).any():
        k1 = np.where(x < _F32(-0.25), -two * (e - (x + half)), one + two * (x - e))
        out = np.where(k == 1, k1, out)
    # k <= -2 or k > 56: exp(x) - 1 as 2^k * (1 - (e - x)) - 1.
    wide = (k <= -2) | (k > 56)
    if wide.any():
        y = one - (e - x)
        y = np.where(k == 128, y * two * _F32(2.0**127), _with_exponent_added(y, k))
        out = np.where(wide, y - one, out)
    # 2 <= k < 23: t = 1 - 2^-k; y = t - (e - x), scaled by 2^k.
    mid = (k >= 2) & (k < 23)
    if mid.any():
        t = (np.int32(0x3F800000) - (np.int32(0x1000000) >> np.clip(k, 0, 31))).view(np.float32)
        out = np.where(mid, _with_exponent_added(t - (e - x), k), out)
    # 23 <= k <= 56: t = 2^-k; y = (x - (e + t)) + 1, scaled by 2^k.
    high = (k >= 23) & (k <= 56)
    if high.any():
        t = ((np.int32(0x7F) - np.clip(k, 0, 127)) << 23).view(np.float32)
        out = np.where(high, _with_exponent_added((x - (e + t)) + one, k), out)
    return np.asarray(out)


def tanhf(x: Any) -> npt.NDArray[np.float32]:
    """glibc 2.36 ``tanhf`` (fdlibm's algorithm), bit for bit, on float32 arrays.

    ``|x| < 2^-55``: ``x * (1 + x)``; ``|x| < 1``: ``-t / (t + 2)`` with ``t =
    expm1f(-2|x|)``; ``|x| < 22``: ``1 - 2 / (t + 2)`` with ``t = expm1f(2|x|)``;
    beyond: ±1; NaN stays NaN; the sign is put back last. Large arrays go in blocks of
    :data:`LIBM_BLOCK` elements, so the many float32 temporaries stay in cache.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size <= LIBM_BLOCK:
        return _tanhf_block(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float32)
    for lo in range(0, flat.size, LIBM_BLOCK):
        out[lo : lo + LIBM_BLOCK] = _tanhf_block(flat[lo : lo + LIBM_BLOCK])
    return out.reshape(x.shape)


def _tanhf_block(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """:func:`tanhf` of one block."""
    ix = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    neg = x.view(np.int32) < 0
    ax = np.abs(x)
    one, two = _F32(1), _F32(2)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ge1 = ix >= np.uint32(0x3F800000)
        t = expm1f(np.where(ge1, two * ax, -two * ax))
        z = np.where(ge1, one - two / (t + two), -t / (t + two))
        z = np.where(ix >= np.uint32(0x41B00000), one, z)  # |x| >= 22 (and inf): 1 - tiny
        z = np.where(neg, -z, z)
        z = np.where(ix < np.uint32(0x24000000), x * (one + x), z)  # tiny, and ±0
        z = np.where(np.isnan(x), one / x + one, z)  # quiets a signalling NaN
    return np.asarray(z, dtype=np.float32)


def fma64(a: Any, b: Any, c: Any) -> npt.NDArray[np.float64]:
    """``a*b + c`` on float64 arrays with one rounding (a double-precision FMA).

    Boldo & Melquiond's emulation ("Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", 2008): the exact product ``uh + ul`` (Dekker's
    split), ``th + tl = c + uh`` (TwoSum), ``v`` = ``tl + ul`` rounded to odd, then
    ``th + v`` rounded to nearest. Exact for finite operands away from float64's
    overflow and subnormal ranges (the only use here: :func:`powf_half`'s polynomials).
    """
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))
    uh = a * b
    split = np.float64(134217729.0)  # 2^27 + 1
    ta, tb = split * a, split * b
    ah = ta - (ta - a)
    bh = tb - (tb - b)
    al, bl = a - ah, b - bh
    ul = ((ah * bh - uh) + ah * bl + al * bh) + al * bl
    th, tl = _two_sum(c, uh)
    v, e = _two_sum(tl, ul)
    vi = v.view(np.int64)
    odd_fix = (e != 0) & ((vi & 1) == 0)
    vi = vi + np.where((e > 0) == (v > 0), 1, -1) * odd_fix
    return np.asarray(th + vi.view(np.float64))


def _two_sum(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
             ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Knuth's TwoSum: ``s + e == a + b`` exactly, ``s`` the rounded sum."""
    s = np.asarray(a + b)
    bb = s - a
    return s, np.asarray((a - (s - bb)) + (b - bb))


# glibc's powf (glibc >= 2.28; its tables are Arm's optimized-routines, MIT licence, see
# THIRD_PARTY_NOTICES.md): log2(x) from a 16-interval table and a degree-5 polynomial,
# times y, then exp2 from a 32-entry table and a cubic, all in float64. On x86-64 with
# FMA (Monolith's machines, and the recorded vectors) glibc picks its FMA build, where
# g++ fuses every ``a*b + c`` below.
def _hex_floats(text: str) -> npt.NDArray[np.float64]:
    """float64 array from C hex-float literals separated by white space."""
    return np.array([float.fromhex(v) for v in text.split()], dtype=np.float64)


_POWF_OFF = np.uint32(0x3F330000)
# Interval i of log2's reduction: 1/c and log2(c).
_POWF_INVC = _hex_floats("""
    0x1.661ec79f8f3bep+0 0x1.571ed4aaf883dp+0 0x1.49539f0f010bp+0 0x1.3c995b0b80385p+0
    0x1.30d190c8864a5p+0 0x1.25e227b0b8eap+0 0x1.1bb4a4a1a343fp+0 0x1.12358f08ae5bap+0
    0x1.0953f419900a7p+0 0x1p+0 0x1.e608cfd9a47acp-1 0x1.ca4b31f026aap-1
    0x1.b2036576afce6p-1 0x1.9c2d163a1aa2dp-1 0x1.886e6037841edp-1 0x1.767dcf5534862p-1
""")
_POWF_LOGC = _hex_floats("""
    -0x1.efec65b963019p-2 -0x1.b0b6832d4fca4p-2 -0x1.7418b0a1fb77bp-2 -0x1.39de91a6dcf7bp-2
    -0x1.01d9bf3f2b631p-2 -0x1.97c1d1b3b7afp-3 -0x1.2f9e393af3c9fp-3 -0x1.960cbbf788d5cp-4
    -0x1.a6f9db6475fcep-5 0x0p+0 0x1.338ca9f24f53dp-4 0x1.476a9543891bap-3
    0x1.e840b4ac4e4d2p-3 0x1.40645f0c6651cp-2 0x1.88e9c2c1b9ff8p-2 0x1.ce0a44eb17bccp-2
""")
_POWF_LOG2_POLY = tuple(_hex_floats("""
    0x1.27616c9496e0bp-2 -0x1.71969a075c67ap-2 0x1.ec70a6ca7baddp-2 -0x1.7154748bef6c8p-1
    0x1.71547652ab82bp0
""").tolist())
# 2^(i/32) as bits, minus i << 47 (so adding k << 47 scales by 2^(k/32)).
_EXP2F_TAB = np.array([
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
], dtype=np.uint64)
_EXP2F_POLY = tuple(_hex_floats("0x1.c6af84b912394p-5 0x1.ebfce50fac4f3p-3 0x1.62e42ff0c52d6p-1"
                                 ).tolist())
_EXP2F_SHIFT = np.float64(float.fromhex("0x1.8p+52") / 32)


def powf_half(x: Any) -> npt.NDArray[np.float32]:
    """glibc's ``powf(x, 0.5f)`` (its FMA build), bit for bit, on float32 arrays.

    Not the correctly rounded square root: for about 1 positive float in 1,600 (e.g.
    ``1 + 0.005 * 855``) it is one ulp off it. ``powf(±0, 0.5) = +0``, ``powf(+inf,
    0.5) = powf(-inf, 0.5) = +inf``, a NaN stays NaN (quieted), ``x < 0`` gives x86's default NaN
    (``0xFFC00000``).
    """
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    x = x.reshape(-1)
    ix = x.view(np.uint32).copy()
    out = np.empty_like(x)
    with np.errstate(invalid="ignore", over="ignore"):
        special = (ix - np.uint32(0x00800000)) >= np.uint32(0x7F800000 - 0x00800000)
        zero_inf = (ix & np.uint32(0x7FFFFFFF)) == 0
        zero_inf |= (ix & np.uint32(0x7FFFFFFF)) == np.uint32(0x7F800000)
        nan = np.isnan(x)
        negative = ~nan & ~zero_inf & (x < 0)
        out[zero_inf] = x[zero_inf] * x[zero_inf]  # +0 or +inf
        out[nan] = x[nan] + np.float32(0.5)
        out[negative] = np.uint32(0xFFC00000).view(np.float32)  # x86's default NaN (0/0)
        sub = special & ~(zero_inf | nan | negative)  # positive subnormals
        if sub.any():
            ix[sub] = ((x[sub] * np.float32(2.0**23)).view(np.uint32) & np.uint32(0x7FFFFFFF)
                       ) - np.uint32(23 << 23)
        main = ~(zero_inf | nan | negative)
        if main.any():
            out[main] = _powf_core(ix[main], 0.5)
    return out.reshape(shape)


def _powf_core(ix: npt.NDArray[np.uint32], y: float) -> npt.NDArray[np.float32]:
    """glibc powf's ``exp2(y * log2(x))`` for positive ``x`` given as (normalized) bits."""
    tmp = ix - _POWF_OFF
    i = ((tmp >> np.uint32(19)) % np.uint32(16)).astype(np.intp)
    top = tmp & np.uint32(0xFF800000)
    iz = ix - top
    k = top.view(np.int32) >> 23
    z = iz.view(np.float32).astype(np.float64)
    r = fma64(z, _POWF_INVC[i], -1.0)
    y0 = _POWF_LOGC[i] + k.astype(np.float64)
    a0, a1, a2, a3, a4 = _POWF_LOG2_POLY
    r2 = r * r
    p01 = fma64(a0, r, a1)
    p23 = fma64(a2, r, a3)
    r4 = r2 * r2
    q = fma64(a4, r, y0)
    q = fma64(p23, r2, q)
    logx = fma64(p01, r4, q)

    xd = np.float64(y) * logx
    kd = xd + _EXP2F_SHIFT
    ki = kd.view(np.uint64)
    kd = kd - _EXP2F_SHIFT
    rr = xd - kd
    t = _EXP2F_TAB[(ki % np.uint64(32)).astype(np.intp)] + (ki << np.uint64(47))
    s = t.view(np.float64)
    c0, c1, c2 = _EXP2F_POLY
    zz = fma64(c0, rr, c1)
    rr2 = rr * rr
    yy = fma64(c2, rr, 1.0)
    yy = fma64(zz, rr2, yy)
    return np.asarray((yy * s).astype(np.float32))
