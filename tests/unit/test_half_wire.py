"""The half-size wire's conversions (``protos.wire.narrow`` / ``widen``) against bit
patterns derived by hand: round to nearest with ties to even, overflow, subnormals,
NaN; and the request bytes of float32 traffic left as they were."""

from __future__ import annotations

import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from protos.wire import BFLOAT16, FLOAT16, FLOAT32, narrow, widen, wire_of


def bits_in(*patterns: int) -> np.ndarray:
    return np.array(patterns, dtype=np.uint32).view(np.float32)


# float32 bits -> float16 bits, each derived by hand.
F16_CASES = [
    (0x3F800000, 0x3C00, "1.0"),
    (0x3F801000, 0x3C00, "1 + 2^-11: halfway, tie to the even 0x3C00"),
    (0x3F803000, 0x3C02, "1 + 3*2^-11: halfway between 0x3C01 and 0x3C02, tie to even"),
    (0x3F801001, 0x3C01, "just above halfway rounds up"),
    (0x3F800FFF, 0x3C00, "just below halfway rounds down"),
    (0xBF800000, 0xBC00, "-1.0"),
    (0x477FE000, 0x7BFF, "65504, the largest finite float16"),
    (0x477FEFFF, 0x7BFF, "just below 65520 rounds down to 65504"),
    (0x477FF000, 0x7C00, "65520: halfway to 2^16, tie to even = +inf"),
    (0xD01502F9, 0xFC00, "-1e10 overflows to -inf"),
    (0x7F7FFFFF, 0x7C00, "the largest float32 overflows to +inf"),
    (0x7F800000, 0x7C00, "+inf"),
    (0xFF800000, 0xFC00, "-inf"),
    (0x00000000, 0x0000, "+0"),
    (0x80000000, 0x8000, "-0"),
    (0x38800000, 0x0400, "2^-14, the smallest normal float16"),
    (0x387FC000, 0x03FF, "1023 * 2^-24, the largest subnormal"),
    (0x33800000, 0x0001, "2^-24, the smallest subnormal"),
    (0x33000000, 0x0000, "2^-25: halfway between 0 and 2^-24, tie to even 0"),
    (0x33000001, 0x0001, "just above 2^-25 rounds up to 2^-24"),
    (0x33C00000, 0x0002, "3 * 2^-25: halfway between 0x0001 and 0x0002, tie to even"),
    (0x00000001, 0x0000, "a float32 subnormal underflows to +0"),
    (0x80000001, 0x8000, "... and a negative one to -0"),
    (0x7FC00000, 0x7E00, "quiet NaN"),
    (0x7F800001, 0x7E00, "signalling NaN whose payload float16 cannot hold: still NaN"),
    (0xFFC00001, 0xFE00, "negative NaN keeps its sign"),
]

# float32 bits -> bfloat16 bits, each derived by hand.
BF16_CASES = [
    (0x3F800000, 0x3F80, "1.0"),
    (0x3F808000, 0x3F80, "halfway, tie to the even 0x3F80"),
    (0x3F818000, 0x3F82, "halfway between 0x3F81 and 0x3F82, tie to even"),
    (0x3F808001, 0x3F81, "just above halfway rounds up"),
    (0x3F807FFF, 0x3F80, "just below halfway rounds down"),
    (0xBF818000, 0xBF82, "negative, tie to even"),
    (0x7F7F7FFF, 0x7F7F, "stays the largest finite bfloat16"),
    (0x7F7F8000, 0x7F80, "halfway above the largest finite: tie to even = +inf"),
    (0x7F7FFFFF, 0x7F80, "the largest float32 overflows to +inf"),
    (0xFF7FFFFF, 0xFF80, "the lowest float32 overflows to -inf"),
    (0x7F800000, 0x7F80, "+inf"),
    (0xFF800000, 0xFF80, "-inf"),
    (0x80000000, 0x8000, "-0"),
    (0x00010000, 0x0001, "a subnormal bfloat16, exact"),
    (0x00008000, 0x0000, "subnormal halfway, tie to even 0"),
    (0x00018000, 0x0002, "subnormal halfway, tie to even 0x0002"),
    (0x80008001, 0x8001, "negative subnormal above halfway"),
    (0x007FFFFF, 0x0080, "the largest float32 subnormal rounds up to the smallest normal"),
    (0x7FC00000, 0x7FC0, "quiet NaN"),
    (0x7F800001, 0x7FC0, "signalling NaN: rounding would make it +inf; stays NaN, quiet"),
    (0x7FFFFFFF, 0x7FFF, "NaN with every payload bit: no carry into the sign"),
    (0xFFFFFFFF, 0xFFFF, "negative NaN with every bit set"),
]


@pytest.mark.parametrize(("wire", "cases"), [(FLOAT16, F16_CASES), (BFLOAT16, BF16_CASES)],
                         ids=["float16", "bfloat16"])
def test_narrow_hand_derived_bits(wire: np.dtype, cases: list[tuple[int, int, str]]) -> None:
    x = bits_in(*(c[0] for c in cases))
    got = narrow(x, wire).view(np.uint16)
    for (src, want, why), out in zip(cases, got.tolist(), strict=True):
        assert out == want, f"{src:#010x} -> {out:#06x}, expected {want:#06x} ({why})"


def test_narrow_float16_matches_numpy_except_nan_payloads() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 1 << 32, size=300_000, dtype=np.uint64).astype(np.uint32).view(
        np.float32)
    # Many blocks of the chunked loop, and every exponent near float16's range.
    near = (rng.standard_normal(200_000) * 2.0 ** rng.integers(-30, 18, 200_000)).astype(
        np.float32)
    for arr in (x, near):
        got = narrow(arr, FLOAT16).view(np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):
            want = arr.astype(np.float16).view(np.uint16)
        nan = np.isnan(arr)
        assert np.array_equal(got[~nan], want[~nan])
        assert np.array_equal(got[nan] & 0x7FFF, np.full(int(nan.sum()), 0x7E00, np.uint16))


@pytest.mark.parametrize("wire", [FLOAT16, BFLOAT16], ids=["float16", "bfloat16"])
def test_widen_is_exact_and_narrow_inverts_it(wire: np.dtype) -> None:
    every = np.arange(1 << 16, dtype=np.uint16)
    wide = widen(every.view(wire), wire)
    assert wide.dtype == np.float32
    if wire == BFLOAT16:
        assert np.array_equal(wide.view(np.uint32), every.astype(np.uint32) << 16)
        nan = np.isnan(wide)
    else:
        want = every.view(np.float16).astype(np.float32)
        nan = np.isnan(want)
        assert np.array_equal(wide.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
        assert np.isnan(wide[nan]).all()
    back = narrow(wide, wire).view(np.uint16)
    assert np.array_equal(back[~nan], every[~nan])  # every half value is exactly a float32
    assert np.isnan(widen(back[nan].view(wire), wire)).all()


def test_narrow_keeps_shape_and_writes_into_out() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    out = np.empty((3, 4), dtype=BFLOAT16)
    assert narrow(x, BFLOAT16, out) is out
    assert np.array_equal(widen(out, BFLOAT16), x)
    assert narrow(np.zeros((0, 4), np.float32), FLOAT16).shape == (0, 4)
    assert np.array_equal(narrow(x, FLOAT32), x)


def test_wire_of_names_a_bad_value() -> None:
    assert wire_of(0) == FLOAT32 and wire_of(1) == FLOAT16 and wire_of(2) == BFLOAT16
    with pytest.raises(ValueError, match=r"values_wire 7 is not a FloatWire"):
        wire_of(7, "values_wire")


def test_float32_requests_keep_their_bytes() -> None:
    """Unset = float32: a request saying float32 encodes as one from before the option."""
    ids = pb.Tensor(data=b"\x01" * 8, shape=[1])
    assert (pb.LookupRequest(table="t", ids=ids, values_wire=pb.FLOAT_WIRE_FLOAT32)
            .SerializeToString() == pb.LookupRequest(table="t", ids=ids).SerializeToString())
    assert (pb.ApplyGradientsRequest(table="t", grads_wire=pb.FLOAT_WIRE_FLOAT32)
            .SerializeToString() == pb.ApplyGradientsRequest(table="t").SerializeToString())
    assert [pb.FLOAT_WIRE_FLOAT32, pb.FLOAT_WIRE_FLOAT16, pb.FLOAT_WIRE_BFLOAT16] == [0, 1, 2]
