"""Float compressors and retrievers (docs/semantics.md §5.3), with hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.compressors import (
    FixedR8Compressor,
    FixedR8Retriever,
    Fp16Compressor,
    Fp32Compressor,
    OneBitCompressor,
    OneBitRetriever,
    RawRetriever,
    compressor_from_config,
    retriever_from_config,
)
from ps_server.errors import ConfigError

FCC = eht.FloatCompressorConfig
NAN = float("nan")
INF = float("inf")


def f32(values: list[float] | list[list[float]]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# ------------------------------------------------------------------------------ fixed_r8


def test_fixed_r8_r1_rounds_to_nearest_level_of_one_128th() -> None:
    comp = FixedR8Compressor(dim=1, r=1.0)
    # step = 1/128 = 0.0078125, half = 1/256 = 0.00390625
    # 0.3:    trunc((0.3 + 1/256) * 128) = trunc(38.9)  =  38 -> 38/128 = 0.296875
    # -0.3:   trunc((-0.3 - 1/256) * 128) = trunc(-38.9) = -38 -> -0.296875
    # 0.0:    trunc(1/256 * 128) = trunc(0.5) = 0
    # 1/256:  trunc(2/256 * 128) = 1 (half a level rounds away from zero) -> 0.0078125
    # -1/256: -1 -> -0.0078125
    # 0.01:   trunc((0.01 + 0.00390625) * 128) = trunc(1.78) = 1 -> 0.0078125
    values = f32([0.3, -0.3, 0.0, 1 / 256, -1 / 256, 0.01])
    q = comp.encode(values)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [38, -38, 0, 1, -1, 1])
    decoded = comp.decode(q)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, [0.296875, -0.296875, 0.0, 1 / 128, -1 / 128, 1 / 128])


def test_fixed_r8_clamps_to_int8_range_and_maps_nan_to_zero() -> None:
    comp = FixedR8Compressor(dim=1, r=1.0)
    # 1.0 -> trunc(128.5) = 128 -> clamp 127 -> 127/128 = 0.9921875
    # -1.0 -> trunc(-128.5) = -128 -> -1.0 ; 5 -> 127 ; -5, -inf -> -128 ; NaN -> 0
    # +inf and 3e38 are beyond int range: Monolith's (int) cast gives INT_MIN -> -128
    # (tests/data/monolith_vectors/compressors.json, fixed_r8_r1).
    values = f32([1.0, -1.0, 5.0, -5.0, INF, -INF, NAN, 3e38])
    np.testing.assert_array_equal(comp.encode(values), [127, -128, 127, -128, -128, -128, 0, -128])
    np.testing.assert_array_equal(
        comp.roundtrip(values),
        [0.9921875, -1.0, 0.9921875, -1.0, -1.0, -1.0, 0.0, -1.0],
    )


def test_fixed_r8_other_range_and_shape_kept() -> None:
    comp = FixedR8Compressor(dim=3, r=2.0)
    # step = 2/128 = 1/64, half = 1/128
    # 0.31 -> trunc((0.31 + 0.0078125) * 64) = trunc(20.34) = 20 -> 20/64 = 0.3125
    # 1.99 -> trunc((1.99 + 0.0078125) * 64) = trunc(127.86) = 127 -> 1.984375
    # -0.5 -> trunc((-0.5 - 0.0078125) * 64) = trunc(-32.5) = -32 -> -0.5
    # -3.0 -> -192.5 -> -128 -> -2.0 ; 0.0 -> 0 ; 0.05 -> trunc(3.7) = 3 -> 0.046875
    values = f32([[0.31, 1.99, -0.5], [-3.0, 0.0, 0.05]])
    q = comp.encode(values)
    assert q.shape == (2, 3)
    np.testing.assert_array_equal(q, [[20, 127, -32], [-128, 0, 3]])
    np.testing.assert_array_equal(comp.decode(q), [[0.3125, 1.984375, -0.5], [-2.0, 0.0, 0.046875]])
    assert comp.bytes_per_value == 1


def test_fixed_r8_does_not_modify_its_input() -> None:
    values = f32([0.3, NAN])
    FixedR8Compressor(dim=2, r=1.0).encode(values)
    assert values[0] == np.float32(0.3)
    assert math.isnan(values[1])


@pytest.mark.parametrize("r", [0.0, -1.0, INF, NAN])
def test_fixed_r8_rejects_a_bad_range(r: float) -> None:
    with pytest.raises(ConfigError, match="fixed_r8"):
        FixedR8Compressor(dim=1, r=r)


# ---------------------------------------------------------------------------- fp16 / fp32


def test_fp16_rounds_to_nearest_even_and_overflows_to_inf() -> None:
    comp = Fp16Compressor(dim=1)
    # 0.1 = 1.6 * 2**-4; 10-bit mantissa 0.6 * 1024 = 614.4 -> 614 -> 1638/16384
    # 1 + 2**-11 is halfway between 1 and 1 + 2**-10: the even neighbour is 1.0
    # 1 + 3 * 2**-11 is halfway between 1 + 2**-10 and 1 + 2**-9: even is 1 + 2**-9
    # 65504 is the largest half; 65519 rounds down to it; 65520 ties to 65536 = overflow
    values = f32([0.1, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, 1e5, -1e5])
    enc = comp.encode(values)
    assert enc.dtype == np.float16
    dec = comp.decode(enc)
    assert dec.dtype == np.float32
    np.testing.assert_array_equal(
        dec, [1638 / 16384, 1.0, 1 + 2**-9, 65504.0, 65504.0, INF, INF, -INF]
    )
    assert comp.bytes_per_value == 2


def test_fp16_keeps_nan_and_shape() -> None:
    out = Fp16Compressor(dim=2).roundtrip(f32([[NAN, 0.5]]))
    assert out.shape == (1, 2)
    assert math.isnan(out[0, 0])
    assert out[0, 1] == 0.5


def test_fp16_quiets_nans_as_half_hpp_does() -> None:
    # half.hpp v2.1.0: sign | 0x7E00 | ((bits >> 13) & 0x3FF). Float 0x7F800001 (a
    # signalling NaN) is 0x7E00 in Monolith's vectors (numpy's cast gives 0x7C01);
    # 0xFF812345 -> 0x8000 | 0x7E00 | (0x012345 >> 13 = 0x9) = 0xFE09; a quiet 0x7FC00000
    # stays 0x7E00.
    x = np.array([0x7F800001, 0xFF812345, 0x7FC00000, 0x3F800000], dtype=np.uint32)
    enc = Fp16Compressor(dim=4).encode(x.view(np.float32))
    assert enc.view(np.uint16).tolist() == [0x7E00, 0xFE09, 0x7E00, 0x3C00]


def test_fp32_is_identity_and_copies() -> None:
    comp = Fp32Compressor(dim=2)
    values = f32([[0.1, -3.5], [NAN, INF]])
    enc = comp.encode(values)
    enc[0, 0] = 9.0
    assert values[0, 0] == np.float32(0.1)
    np.testing.assert_array_equal(comp.roundtrip(values), values)
    assert comp.bytes_per_value == 4


# ------------------------------------------------------------------------------- one_bit


def test_one_bit_compressor_keeps_the_sign_scaled_by_amplitude() -> None:
    comp = OneBitCompressor(dim=1, amplitude=0.1, init_scale=1.0)
    # tanh(w) > 0 only for w > 0; 0, -0 and NaN give -1
    values = f32([0.5, -0.5, 0.0, -0.0, 1e-30, NAN, 100.0])
    q = comp.encode(values)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [1, -1, -1, -1, 1, -1, 1])
    a = np.float32(0.1)
    np.testing.assert_array_equal(comp.decode(q), [a, -a, -a, -a, a, -a, a])


def test_one_bit_compressor_uses_init_scale_and_signed_amplitude() -> None:
    # scale 0: tanh(0 * w) = 0, never > 0, so everything encodes to -1
    np.testing.assert_array_equal(
        OneBitCompressor(dim=1, amplitude=0.1, init_scale=0.0).encode(f32([0.5, -0.5])), [-1, -1]
    )
    # negative amplitude flips the sign test: -0.2 * tanh(0.5) < 0 -> -1 -> decodes to +0.2
    comp = OneBitCompressor(dim=1, amplitude=-0.2, init_scale=1.0)
    np.testing.assert_array_equal(comp.encode(f32([0.5, -0.5])), [-1, 1])
    np.testing.assert_array_equal(comp.roundtrip(f32([0.5])), [np.float32(0.2)])


# ---------------------------------------------------------------------------- from config


def test_compressor_from_config_picks_each_kind_and_overrides_dim() -> None:
    assert isinstance(compressor_from_config(FCC(fp32=FCC.Fp32(dim_size=9)), 3), Fp32Compressor)
    fp16 = compressor_from_config(FCC(fp16=FCC.Fp16(dim_size=9)), 3)
    assert isinstance(fp16, Fp16Compressor)
    assert fp16.dim == 3
    r8 = compressor_from_config(FCC(fixed_r8=FCC.FixedR8(r=2.0)), 3)
    assert isinstance(r8, FixedR8Compressor)
    assert r8.step == np.float32(2.0 / 128)
    default_r8 = compressor_from_config(FCC(fixed_r8=FCC.FixedR8()), 3)
    assert isinstance(default_r8, FixedR8Compressor)
    assert default_r8.r == 1.0  # proto2 default
    ob = compressor_from_config(FCC(one_bit=FCC.OneBit()), 3)
    assert isinstance(ob, OneBitCompressor)
    assert ob.amplitude == np.float32(0.1)  # proto2 defaults: amplitude 0.1, init_scale 1
    assert ob.init_scale == 1.0


def test_compressor_from_config_without_a_member_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fp32, fp16, fixed_r8 or one_bit"):
        compressor_from_config(FCC(), 4)


def test_compressor_from_config_rejects_zero_range() -> None:
    with pytest.raises(ConfigError, match="fixed_r8"):
        compressor_from_config(FCC(fixed_r8=FCC.FixedR8(r=0.0)), 4)


# ----------------------------------------------------------------------------- retrievers


def test_raw_retriever_passes_values_and_grads_through() -> None:
    ret = RawRetriever(dim=2)
    params = f32([[0.3, -0.7]])
    grads = f32([[1.0, 2.0]])
    np.testing.assert_array_equal(ret.forward(params), f32([[0.3, -0.7]]))
    np.testing.assert_array_equal(ret.backward(params, grads, 5), f32([[1.0, 2.0]]))


def test_fixed_r8_retriever_fake_quantizes_lookups_only() -> None:
    ret = FixedR8Retriever(dim=4, r=1.0)
    params = f32([[0.3, 1.0, -5.0, NAN]])
    # same arithmetic as the fixed_r8 test: 38/128, clamp 127/128, clamp -1, NaN -> 0
    np.testing.assert_array_equal(ret.forward(params), [[0.296875, 0.9921875, -1.0, 0.0]])
    grads = f32([[0.5, -1.5, 2.0, 3.0]])
    np.testing.assert_array_equal(ret.backward(params, grads, 0), [[0.5, -1.5, 2.0, 3.0]])
    assert params[0, 0] == np.float32(0.3)


def test_one_bit_retriever_forward_is_amplitude_tanh_scale_w() -> None:
    ret = OneBitRetriever(dim=2, step_size=200, init_scale=1.0, max_scale=10000.0, amplitude=0.1)
    out = ret.forward(f32([[0.5, -2.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.1 * math.tanh(0.5), 0.1 * math.tanh(-2.0)]], rtol=1e-6)


def test_one_bit_retriever_backward_rescales_grad_and_grows_scale() -> None:
    ret = OneBitRetriever(dim=2, step_size=200, init_scale=1.0, max_scale=10000.0, amplitude=0.1)
    w = f32([[0.5, -2.0]])
    g = f32([[1.0, -3.0]])
    # float32 1 - tanh(2.83)**2 = 1 - 0.986 cancels ~6 bits, hence rtol 2e-5 below
    tol = 2e-5

    def expected(scale: float) -> list[list[float]]:
        # g * amplitude * scale * (1 - tanh(scale * w)**2) for (w, g) = (0.5, 1), (-2, -3)
        return [
            [
                1.0 * 0.1 * scale * (1 - math.tanh(scale * 0.5) ** 2),
                -3.0 * 0.1 * scale * (1 - math.tanh(scale * -2.0) ** 2),
            ]
        ]

    # step 0: 0 % 200 == 0 -> scale = min(1 * sqrt(1 + 0), 1e4) = 1
    # g = 1 * 0.1 * 1 * (1 - tanh(0.5)**2) = 0.1 * (1 - 0.2135529...) = 0.0786447...
    out0 = ret.backward(w, g, 0)
    assert out0[0, 0] == pytest.approx(0.1 * (1 - math.tanh(0.5) ** 2), rel=1e-6)
    np.testing.assert_allclose(out0, expected(1.0), rtol=1e-6)
    # step 200: scale = sqrt(1 + 0.005 * 200) = sqrt(2)
    np.testing.assert_allclose(ret.backward(w, g, 200), expected(math.sqrt(2)), rtol=tol)
    assert float(ret.scale) == pytest.approx(math.sqrt(2), rel=1e-7)
    # the new scale is shared state: lookups now see 0.1 * tanh(sqrt(2) * w)
    np.testing.assert_allclose(
        ret.forward(w),
        [[0.1 * math.tanh(math.sqrt(2) * 0.5), 0.1 * math.tanh(-2 * math.sqrt(2))]],
        rtol=1e-6,
    )
    # steps 201 and 300 are not multiples of 200: the scale stays sqrt(2)
    np.testing.assert_allclose(ret.backward(w, g, 201), expected(math.sqrt(2)), rtol=tol)
    np.testing.assert_allclose(ret.backward(w, g, 300), expected(math.sqrt(2)), rtol=tol)
    # step 400: scale = sqrt(1 + 0.005 * 400) = sqrt(3)
    np.testing.assert_allclose(ret.backward(w, g, 400), expected(math.sqrt(3)), rtol=tol)
    # inputs are not modified
    np.testing.assert_array_equal(g, [[1.0, -3.0]])


def test_one_bit_retriever_scale_is_capped_and_uses_init_scale() -> None:
    capped = OneBitRetriever(dim=1, step_size=100, init_scale=1.0, max_scale=1.2, amplitude=0.1)
    # step 200: 1 * sqrt(1 + 1) = 1.414 > 1.2 -> scale 1.2
    capped.backward(f32([[0.0]]), f32([[1.0]]), 200)
    assert capped.scale == np.float32(1.2)
    big = OneBitRetriever(dim=1, step_size=100, init_scale=2.0, max_scale=1e4, amplitude=0.5)
    # step 600: 2 * sqrt(1 + 3) = 4; at w = 0 the factor is 0.5 * 4 * (1 - 0) = 2
    out = big.backward(f32([[0.0]]), f32([[3.0]]), 600)
    assert big.scale == np.float32(4.0)
    assert out[0, 0] == pytest.approx(6.0)


def test_one_bit_retriever_first_backward_off_schedule_keeps_init_scale() -> None:
    ret = OneBitRetriever(dim=1, step_size=200, init_scale=3.0, max_scale=1e4, amplitude=0.1)
    # step 7 is no multiple of 200: scale stays init_scale = 3
    out = ret.backward(f32([[0.2]]), f32([[1.0]]), 7)
    assert out[0, 0] == pytest.approx(0.1 * 3.0 * (1 - math.tanh(0.6) ** 2), rel=1e-6)


def bits32(values: list[list[int]]) -> np.ndarray:
    return np.array(values, dtype=np.uint32).view(np.float32)


def test_one_bit_retriever_rounds_as_monolith_compiled_code() -> None:
    # From Monolith's vectors (hash_net_quantizer, defaults): w = 0xbfe77578, g =
    # 0xbf07fe0e at step 0 give 0xbbb17613, which needs 1 - y*y fused (one rounding)
    ret = OneBitRetriever(dim=1)
    out = ret.backward(bits32([[0xBFE77578]]), bits32([[0xBF07FE0E]]), 0)
    assert out.view(np.uint32).tolist() == [[0xBBB17613]]
    # glibc's powf(1 + 0.005 * 855, 0.5f) = 0x4012fdbd, one ulp above sqrt (0x4012fdbc)
    ret = OneBitRetriever(dim=1, step_size=855)
    ret.backward(f32([[0.0]]), f32([[1.0]]), 855)
    assert np.float32(ret.scale).view(np.uint32) == 0x4012FDBD


def test_one_bit_retriever_rejects_non_positive_step_size() -> None:
    with pytest.raises(ConfigError, match="step_size"):
        OneBitRetriever(dim=1, step_size=0)


def test_retriever_from_config_choices() -> None:
    assert isinstance(retriever_from_config(None, 2), RawRetriever)
    assert isinstance(retriever_from_config(FCC(), 2), RawRetriever)
    assert isinstance(retriever_from_config(FCC(fp32=FCC.Fp32()), 2), RawRetriever)
    assert isinstance(retriever_from_config(FCC(fp16=FCC.Fp16()), 2), RawRetriever)
    r8 = retriever_from_config(FCC(fixed_r8=FCC.FixedR8(r=2.0)), 2)
    assert isinstance(r8, FixedR8Retriever)
    # r = 2: 0.31 -> 20/64 = 0.3125
    np.testing.assert_array_equal(r8.forward(f32([[0.31, 0.0]])), [[0.3125, 0.0]])
    ob = retriever_from_config(FCC(one_bit=FCC.OneBit(dim_size=8)), 2)
    assert isinstance(ob, OneBitRetriever)
    assert ob.dim == 2
    # proto2 defaults: step_size 200, init_scale 1, max_scale 10000, amplitude 0.1
    assert (ob.step_size, float(ob.scale), float(ob.max_scale)) == (200, 1.0, 10000.0)
    assert ob.amplitude == np.float32(0.1)
