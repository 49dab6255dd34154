"""Initializers (docs/semantics.md §5.2): values, shapes, dtypes, config handling."""

from __future__ import annotations

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.initializers import (
    DEFAULT_SEED,
    ConstantsInitializer,
    Initializer,
    OnesInitializer,
    RandomUniformInitializer,
    ZerosInitializer,
    initializer_from_config,
)
from ps_server.errors import ConfigError


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (ZerosInitializer(4), 0.0),
        (OnesInitializer(4), 1.0),
        (ConstantsInitializer(4, 0.1), np.float32(0.1)),
        (ConstantsInitializer(4, -2.5), -2.5),
    ],
)
def test_deterministic_initializers_fill_every_element(init: Initializer, expected: float) -> None:
    out = init.init(3)
    assert out.dtype == np.float32
    assert out.shape == (3, 4)
    assert (out == np.float32(expected)).all()


def test_init_of_zero_entries_is_empty_with_the_right_width() -> None:
    assert OnesInitializer(5).init(0).shape == (0, 5)
    assert RandomUniformInitializer(5).init(0).shape == (0, 5)


def test_init_returns_a_fresh_array_each_call() -> None:
    init = OnesInitializer(2)
    first = init.init(2)
    first[:] = 7.0
    assert (init.init(2) == 1.0).all()


def test_negative_dim_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dim_size"):
        ZerosInitializer(-1)


def test_random_uniform_stays_in_half_open_range() -> None:
    out = RandomUniformInitializer(8, -0.05, 0.05).init(2000)
    assert out.dtype == np.float32
    assert out.shape == (2000, 8)
    assert (out >= np.float32(-0.05)).all()
    assert (out < np.float32(0.05)).all()
    # 16000 draws of U[-0.05, 0.05): mean 0, std 0.1/sqrt(12) ~ 0.0289, so the sample
    # mean is within 5 standard errors (5 * 0.0289 / sqrt(16000) ~ 0.00114) of 0.
    assert abs(float(out.mean())) < 0.00114
    assert float(out.std()) == pytest.approx(0.1 / 12**0.5, rel=0.05)
    # the spread reaches both ends of the interval
    assert float(out.min()) < -0.049
    assert float(out.max()) > 0.049


def test_random_uniform_never_returns_maxval() -> None:
    # One ulp wide interval [1, 1 + 2**-23): u * 2**-23 + 1 rounds up to the upper bound
    # for every u > 0.5, so only the half-open clamp keeps every value at 1.0.
    lo = np.float32(1.0)
    hi = np.nextafter(lo, np.float32(2.0))
    assert float(hi) == 1.0 + 2.0**-23
    out = RandomUniformInitializer(1, float(lo), float(hi)).init(64)
    assert (out == lo).all()


def test_random_uniform_with_equal_bounds_is_constant() -> None:
    out = RandomUniformInitializer(3, 0.25, 0.25).init(4)
    assert (out == np.float32(0.25)).all()


def test_random_uniform_is_reproducible_for_a_seed() -> None:
    a = RandomUniformInitializer(4, -1.0, 1.0, seed=11)
    b = RandomUniformInitializer(4, -1.0, 1.0, seed=11)
    first_a, first_b = a.init(10), b.init(10)
    np.testing.assert_array_equal(first_a, first_b)
    second_a = a.init(10)
    np.testing.assert_array_equal(second_a, b.init(10))
    # the stream advances between calls, and another seed gives other values
    assert not np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, RandomUniformInitializer(4, -1.0, 1.0, seed=12).init(10))


def test_random_uniform_default_seed_is_monoliths_mt19937_default() -> None:
    assert DEFAULT_SEED == 5489
    assert RandomUniformInitializer(2).seed == 5489


def test_from_config_dim_overrides_sub_config_dim_size() -> None:
    cfg = eht.InitializerConfig(zeros=eht.ZerosInitializerConfig(dim_size=7))
    init = initializer_from_config(cfg, dim=3)
    assert isinstance(init, ZerosInitializer)
    assert init.dim == 3
    assert init.init(2).shape == (2, 3)


def test_from_config_ones_and_constants() -> None:
    ones = initializer_from_config(eht.InitializerConfig(ones=eht.OnesInitializerConfig()), 2)
    assert isinstance(ones, OnesInitializer)
    assert (ones.init(1) == 1.0).all()
    const_cfg = eht.InitializerConfig(constants=eht.ConstantsInitializerConfig(constant=2.5))
    const = initializer_from_config(const_cfg, 2)
    assert isinstance(const, ConstantsInitializer)
    assert (const.init(3) == 2.5).all()


def test_from_config_random_uniform_uses_proto_defaults_and_seed() -> None:
    cfg = eht.InitializerConfig(random_uniform=eht.RandomUniformInitializerConfig())
    init = initializer_from_config(cfg, 4)
    assert isinstance(init, RandomUniformInitializer)
    # proto2 defaults minval = -0.05, maxval = 0.05
    assert init.minval == np.float32(-0.05)
    assert init.maxval == np.float32(0.05)
    np.testing.assert_array_equal(
        init.init(5), RandomUniformInitializer(4, -0.05, 0.05, seed=5489).init(5)
    )
    seeded = initializer_from_config(cfg, 4, seed=99)
    np.testing.assert_array_equal(
        seeded.init(5), RandomUniformInitializer(4, -0.05, 0.05, seed=99).init(5)
    )


def test_from_config_custom_bounds() -> None:
    cfg = eht.InitializerConfig(
        random_uniform=eht.RandomUniformInitializerConfig(minval=2.0, maxval=3.0)
    )
    out = initializer_from_config(cfg, 6).init(500)
    assert (out >= 2.0).all()
    assert (out < 3.0).all()


def test_from_config_without_a_member_set_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="zeros, ones, constants or random_uniform"):
        initializer_from_config(eht.InitializerConfig(), 4)
