"""fpmath against exact rational arithmetic: :func:`fma32` is ``a*b + c`` rounded once
to float32 (round half to even), :func:`sequential_sum32` a left-to-right float32 sum."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest

from ps_server.engine import fpmath
from ps_server.engine.fpmath import fma32, sequential_sum32


def round_to_f32(x: Fraction) -> float:
    """The float32 nearest ``x`` (ties to even), overflowing to ±inf, computed exactly."""
    if x == 0:
        return 0.0
    sign = -1 if x < 0 else 1
    m = abs(x)
    e = m.numerator.bit_length() - m.denominator.bit_length()
    while Fraction(2) ** e > m:
        e -= 1
    while Fraction(2) ** (e + 1) <= m:
        e += 1
    ulp_exp = max(e, -126) - 23  # subnormals share 2**-149
    scaled = m / Fraction(2) ** ulp_exp
    q, r = divmod(scaled.numerator, scaled.denominator)
    if 2 * r > scaled.denominator or (2 * r == scaled.denominator and q % 2 == 1):
        q += 1
    value = Fraction(q) * Fraction(2) ** ulp_exp
    if value >= Fraction(2) ** 128 - Fraction(2) ** 103:  # rounds past FLT_MAX
        return sign * float("inf")
    return sign * float(value)


def exact_fma(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32],
              c: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.array([
        round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
        for x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)
    ], dtype=np.float32)


def halfway_cases(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.float32], ...]:
    """Triples where rounding twice goes wrong: ``a*b = ulp(c)/2 * (1 - k**2 * 2**-46)``
    (``a = 1 + k*2**-23``, ``b = ulp(c)/2 * (1 - k*2**-23)``) is just below half an ulp
    of ``c``, so the float64 sum rounds up to the float32 halfway point and then ties to
    even; with ``c``'s last mantissa bit odd that goes up, though the exact value is
    below the halfway point. Signs are random; half the ``c`` have an even last bit."""
    k = rng.integers(1, 8, n).astype(np.float32)
    c = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
    half_ulp = np.spacing(c) / np.float32(2)
    a = np.float32(1.0) + k * np.float32(2.0**-23)
    b = half_ulp * (np.float32(1.0) - k * np.float32(2.0**-23))
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n)
    return (a * sign).astype(np.float32), b.astype(np.float32), (c * sign).astype(np.float32)


def test_fma32_rounds_once_on_random_and_halfway_inputs() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    a = rng.standard_normal(n).astype(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-12, 4, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    ha, hb, hc = halfway_cases(rng, n)
    a, b, c = (np.concatenate(p) for p in ((a, ha), (b, hb), (c, hc)))
    got = fma32(a, b, c)
    want = exact_fma(a, b, c)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fma32_small_inputs_round_once_too() -> None:
    # Inputs of at most fpmath._SMALL elements take the unblocked path: same rule,
    # including broadcasting (a scalar factor, a column against rows).
    rng = np.random.default_rng(9)
    a, b, c = halfway_cases(rng, 600)
    for lo in range(0, 600, 100):
        part = slice(lo, lo + 100)
        got = fma32(a[part], b[part], c[part])
        assert np.array_equal(got.view(np.uint32), exact_fma(a[part], b[part], c[part]).view(
            np.uint32))
    col = rng.standard_normal((7, 1)).astype(np.float32)
    rows = rng.standard_normal((7, 5)).astype(np.float32)
    got = fma32(np.float32(-0.3), col, rows)
    assert got.shape == (7, 5)
    assert np.array_equal(got, fpmath._fma32_exact(np.float32(-0.3), col, rows))


def test_fma32_halfway_inputs_are_where_rounding_twice_fails() -> None:
    # The cases above are meaningful: the naive float32(float64 sum) gets some wrong.
    a, b, c = halfway_cases(np.random.default_rng(8), 3000)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert not np.array_equal(naive.view(np.uint32), exact_fma(a, b, c).view(np.uint32))


def test_fma32_subnormal_results_and_overflow() -> None:
    tiny = np.float32(2.0**-140)
    a = np.array([tiny, tiny, 3e38, -3e38, 1.5], dtype=np.float32)
    b = np.array([np.float32(2.0**-9) * np.float32(1.5), 0.75, 2.0, 2.0, 0.0], dtype=np.float32)
    c = np.array([np.float32(2.0**-149), -tiny, 0.0, 0.0, -0.0], dtype=np.float32)
    assert np.array_equal(fma32(a, b, c).view(np.uint32), exact_fma(a, b, c).view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, fpmath.FMA_BLOCK - 1, fpmath.FMA_BLOCK + 3])
def test_fma32_broadcasts_and_crosses_blocks(n: int) -> None:
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, 2)).astype(np.float32)
    g = rng.standard_normal((n, 2)).astype(np.float32)
    got = fma32(np.float32(-0.1), g, w)
    assert got.shape == (n, 2) and got.dtype == np.float32
    assert np.array_equal(got, fpmath._fma32_exact(np.float32(-0.1), g, w))


def test_sequential_sum32_adds_left_to_right() -> None:
    # Left to right, every 2**-24 added to 1.0 is a tie that rounds back to 1.0.
    x = np.array([[1.0] + [2.0**-24] * 20, [2.0**-24] * 20 + [1.0]], dtype=np.float32)
    want = []
    for row in x.tolist():
        acc = np.float32(0)
        for v in row:
            acc = np.float32(acc + np.float32(v))
        want.append(acc)
    assert sequential_sum32(x).tolist() == [1.0, float(np.float32(1.0 + 20 * 2.0**-24))]
    assert sequential_sum32(x).tolist() == [float(w) for w in want]


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_fma32_zero_factor_fast_path_matches_the_exact_fma(zero: float) -> None:
    special = [0.0, -0.0, 1.0, -3.5, 1e-45, -1e-45, 2.0**-126, 3.4e38, np.inf, -np.inf, np.nan]
    x = np.array(special, dtype=np.float32)
    w, g = (a.reshape(-1) for a in np.meshgrid(x, x))
    for got in (fma32(np.float32(zero), w, g), fma32(w, np.float32(zero), g)):
        want = fpmath._fma32_exact(np.float32(zero), w, g)
        np.testing.assert_array_equal(got, want)  # NaN where the FMA gives NaN
        num = ~np.isnan(want)
        assert np.array_equal(np.signbit(got[num]), np.signbit(want[num]))  # signed zeros


@pytest.mark.parametrize("steps", [1, 2, 300])
def test_fma_chain_is_one_fma32_per_step(steps: int) -> None:
    # Halfway-prone steps: every addend is just below half an ulp of the running value
    # (the naive float64 chain rounds some of them the wrong way), mixed with random ones.
    rng = np.random.default_rng(steps)
    start = np.array([1.0, -3.0, 2.0**-130, 5.5], dtype=np.float32)
    a = np.empty((steps, 4), dtype=np.float32)
    b = np.empty((steps, 4), dtype=np.float32)
    w = start.copy()
    for k in range(steps):
        if k % 3 == 0:
            ha, hb, _ = halfway_cases(rng, 4)
            a[k], b[k] = ha * np.sign(w + np.float32(1e-30)), hb
            half_ulp = np.spacing(np.abs(w)) / np.float32(2)
            b[k] = half_ulp * (np.float32(1.0) - np.abs(a[k]) + np.float32(1.0))
        else:
            a[k] = rng.standard_normal(4).astype(np.float32)
            b[k] = (rng.standard_normal(4) * 1e-3).astype(np.float32)
        w = fma32(a[k], b[k], w)
    want = np.empty((steps, 4), dtype=np.float32)
    w = start.copy()
    for k in range(steps):
        w = fma32(a[k], b[k], w)
        want[k] = w
    got = fpmath.fma_chain(a, b, start)
    assert got.shape == (steps, 4)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if steps == 300:  # the chain met steps where one float64 add rounds wrong
        prev = np.vstack([start, want[:-1]]).astype(np.float64)
        naive = (a.astype(np.float64) * b + prev).astype(np.float32)
        assert not np.array_equal(naive.view(np.uint32), want.view(np.uint32))
    # a scalar factor (SGD's -lr) broadcasts
    lr = np.float32(-0.25)
    w, seq = start.copy(), []
    for k in range(steps):
        w = fma32(lr, b[k], w)
        seq.append(w)
    assert np.array_equal(fpmath.fma_chain(lr, b, start).view(np.uint32),
                          np.array(seq).view(np.uint32))


# ------------------------------------------------------------ glibc float functions
# Expected bits are glibc 2.36's own results (libm tanhf / expm1f / powf on x86-64 with
# FMA, the library Monolith's reference vectors were recorded against).


def _f32_from_bits(bits: list[int]) -> npt.NDArray[np.float32]:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def _bits(x: npt.NDArray[np.float32]) -> list[int]:
    return [int(v) for v in np.asarray(x, dtype=np.float32).view(np.uint32).reshape(-1)]


def test_tanhf_is_glibcs_not_a_correctly_rounded_tanh() -> None:
    # glibc's tanhf is one ulp off the correctly rounded value here (a float64 tanh
    # rounded once gives 0x3d0070f3 and 0x3f768417)
    x = _f32_from_bits([0x3D007BBC, 0x3FFE14C6])
    assert _bits(fpmath.tanhf(x)) == [0x3D0070F4, 0x3F768416]


def test_tanhf_branches_and_special_values() -> None:
    x = _f32_from_bits([0xBF800000, 0x24000000, 0x23FFFFFF, 0x41B00000, 0x41AFFFFF,
                        0x7F800000, 0xFF800000, 0x80000000, 0x3F000000, 0xBE000000])
    assert _bits(fpmath.tanhf(x)) == [0xBF42F7D6, 0x24000000, 0x23FFFFFF, 0x3F800000,
                                      0x3F800000, 0x3F800000, 0xBF800000, 0x80000000,
                                      0x3EEC9A9F, 0xBDFEACCA]
    assert np.isnan(fpmath.tanhf(np.float32(np.nan)))
    assert fpmath.tanhf(np.zeros((2, 3), np.float32)).shape == (2, 3)


def test_expm1f_matches_glibc_across_its_reductions() -> None:
    # k = 0, k = -1 / +1, 2 <= k < 23, k > 56 is not reachable below 88.7, k <= -2,
    # x < -27 ln2 (-1), near overflow, |x| < 2^-25 (x itself)
    x = _f32_from_bits([0x3E000000, 0xBE000000, 0x3F000000, 0xBF400000, 0x40000000,
                        0x41000000, 0x42000000, 0xC1000000, 0xC2000000, 0x42B00000,
                        0x33800000])
    assert _bits(fpmath.expm1f(x)) == [0x3E085811, 0xBDF0A577, 0x3F261299, 0xBF0712FC,
                                       0x40CC7326, 0x453A3F54, 0x568FA1FE, 0xBF7FEA04,
                                       0xBF800000, 0x7EF882B7, 0x33800000]


def test_powf_half_is_glibcs_powf_not_sqrt() -> None:
    # 1 + 0.005 * 855 = 0x40a8cccd: glibc's powf(x, 0.5f) is 0x4012fdbd, the correctly
    # rounded square root 0x4012fdbc
    x = _f32_from_bits([0x40A8CCCD, 0x40000000, 0x40400000, 0x40C00000, 0x4916B410])
    assert _bits(fpmath.powf_half(x)) == [0x4012FDBD, 0x3FB504F3, 0x3FDDB3D7, 0x401CC471,
                                          0x44446B07]


def test_powf_half_special_values() -> None:
    # smallest subnormal, largest subnormal, -0, +0, +inf, -inf, -1, largest float
    x = _f32_from_bits([0x00000001, 0x007FFFFF, 0x80000000, 0x00000000, 0x7F800000,
                        0xFF800000, 0xBF800000, 0x7F7FFFFF])
    assert _bits(fpmath.powf_half(x)) == [0x1A3504F3, 0x1FFFFFFF, 0x00000000, 0x00000000,
                                          0x7F800000, 0x7F800000, 0xFFC00000, 0x5F7FFFFF]


def test_fma64_rounds_once() -> None:
    # (1 + 2^-30)(1 - 2^-30) - 1 = -2^-60 exactly; unfused float64 gives 0
    a, b = 1 + 2.0**-30, 1 - 2.0**-30
    assert a * b - 1 == 0.0
    assert fpmath.fma64(a, b, -1.0) == -(2.0**-60)
    # (1 + 2^-27)^2 = 1 + 2^-26 + 2^-54; adding -2^-26 + 2^-53 leaves 1 + 2^-53 + 2^-54,
    # above the halfway point 1 + 2^-53, so 1 + 2^-52. Unfused, the product first rounds
    # to 1 + 2^-26 and the sum is the tie 1 + 2^-53, which rounds to even: 1.
    a = b = 1 + 2.0**-27
    c = -(2.0**-26) + 2.0**-53
    assert a * b + c == 1.0
    assert fpmath.fma64(a, b, c) == 1 + 2.0**-52


@pytest.mark.parametrize("scalar", ["a", "b", "c", "ab"])
def test_fma32_scalar_operands_in_blocks_round_once(scalar: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The blocked path (more than _SMALL elements; blocks of 1,000 here so several are
    # crossed) feeds scalar operands to the float64 ufuncs directly. Halfway cases with
    # the scalar in each position, subnormal results, and plain random triples.
    monkeypatch.setattr(fpmath, "FMA_BLOCK", 1000)
    rng = np.random.default_rng(21)
    n = fpmath._SMALL + 1500
    k = np.float32(3)
    one_k = np.float32(1.0) + k * np.float32(2.0**-23)
    if scalar in ("a", "b", "ab"):
        # factor 1 + 3 * 2**-23 as the scalar, the other factor half an ulp of c less a bit
        c = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
        c[::3] = rng.standard_normal(c[::3].size).astype(np.float32)
        other = (np.spacing(c) / np.float32(2)) * (np.float32(1.0) - k * np.float32(2.0**-23))
        other[::5] = rng.standard_normal(other[::5].size).astype(np.float32)
        other[7::11] = np.float32(2.0**-140)  # subnormal products, c tiny there too
        c[7::11] = np.float32(2.0**-149) * rng.integers(-4, 4, c[7::11].size)
        if scalar == "ab":
            # both factors scalar: products 2**-140 * 1.5 against subnormal and normal c
            a, b = np.float32(2.0**-140), np.float32(1.5)
            c = c.astype(np.float32)
        else:
            a, b = (one_k, other) if scalar == "a" else (other, one_k)
        got = fma32(a, b, c)
        want = exact_fma(*(np.broadcast_to(np.asarray(x, dtype=np.float32), (n,))
                           for x in (a, b, c)))
    else:
        cs = np.float32(1.0 + 2.0**-23)  # an odd last mantissa bit: the ties go wrong
        a = np.full(n, one_k, dtype=np.float32)
        a[::4] = rng.standard_normal(a[::4].size).astype(np.float32)
        half_less = (np.spacing(cs) / np.float32(2)) * (np.float32(1.0) - k * np.float32(2.0**-23))
        b = np.full(n, half_less, dtype=np.float32)
        b[1::4] = rng.standard_normal(b[1::4].size).astype(np.float32)
        c = np.full(n, cs, dtype=np.float32)
        got = fma32(a, b, cs)
        want = exact_fma(a, b, c)
    assert got.shape == (n,) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    naive = (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)
             ).astype(np.float32)
    if scalar != "ab":
        assert not np.array_equal(naive.view(np.uint32), want.view(np.uint32))


def test_fma32_of_a_square_widens_once_and_rounds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # fma32(g, g, c) (one array passed twice) squares a single widened copy: the same
    # value, checked across blocks, with subnormal squares and exact ties.
    monkeypatch.setattr(fpmath, "FMA_BLOCK", 1000)
    rng = np.random.default_rng(23)
    n = fpmath._SMALL + 1500
    g = (rng.standard_normal(n) * 2.0 ** rng.integers(-40, 20, n)).astype(np.float32)
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-40, 20, n)).astype(np.float32)
    g[::9] = np.float32(2.0**-70) * rng.integers(1, 4, g[::9].size)  # squares below 2**-126
    c[::9] = np.float32(2.0**-149) * rng.integers(-3, 3, c[::9].size)
    g[4::9] = np.float32(3 * 2.0**-12)  # g*g = 9 * 2**-24: half an ulp of 1 times 9
    c[4::9] = np.float32(1.0)
    got = fma32(g, g, c)
    assert np.array_equal(got.view(np.uint32), exact_fma(g, g, c).view(np.uint32))
    assert np.array_equal(got.view(np.uint32), fma32(g, g.copy(), c).view(np.uint32))


@pytest.mark.parametrize("n", [5, fpmath.FMA_BLOCK + 3])
def test_fma32_writes_into_out_even_when_out_is_an_input(n: int) -> None:
    rng = np.random.default_rng(n + 1)
    ha, hb, hc = halfway_cases(rng, n)
    want = fpmath._fma32_exact(ha, hb, hc)
    out = np.empty(n, dtype=np.float32)
    assert fma32(ha, hb, hc, out=out) is out
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    c = hc.copy()
    assert fma32(ha, hb, c, out=c) is c  # aliasing the addend
    assert np.array_equal(c.view(np.uint32), want.view(np.uint32))
    w = rng.standard_normal((n, 1)).astype(np.float32)
    out2 = np.empty((n, 1), dtype=np.float32)
    fma32(np.float32(-0.1), w, w, out=out2)
    assert np.array_equal(out2, fpmath._fma32_exact(np.float32(-0.1), w, w))
    fma32(np.float32(0.0), w, w, out=out2)  # zero-factor path
    assert np.array_equal(out2, w)
    with pytest.raises(ValueError):
        fma32(ha, hb, hc, out=np.empty(n + 1, dtype=np.float32))
