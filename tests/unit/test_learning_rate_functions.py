"""Learning-rate functions (docs/semantics.md §9) and per-segment evaluation (§4.4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ps_client.learning_rate_functions import (
    LearningRateFunction,
    PolynomialDecay,
    evaluate_learning_rates,
)


def test_str_lists_params_sorted_by_name() -> None:
    assert str(PolynomialDecay(0.01, 10, 0.11)) == (
        'LearningRateFunction("PolynomialDecay",Params:cycle=False,decay_steps=10,'
        "end_learning_rate=0.11,initial_learning_rate=0.01,name=None,power=1.0)"
    )
    assert str(PolynomialDecay(0.5, 3, power=2, cycle=True, name="lr")) == (
        'LearningRateFunction("PolynomialDecay",Params:cycle=True,decay_steps=3,'
        "end_learning_rate=0.0001,initial_learning_rate=0.5,name=lr,power=2)"
    )


def test_str_of_another_subclass_uses_its_own_name_and_attributes() -> None:
    class Constant(LearningRateFunction):
        def __init__(self, value: float) -> None:
            self.value = value
            self.alpha = "a"

        def __call__(self, global_step: int = 0) -> float:
            return self.value

    assert str(Constant(0.5)) == 'LearningRateFunction("Constant",Params:alpha=a,value=0.5)'


def test_linear_decay_from_001_to_011_over_10_steps() -> None:
    fn = PolynomialDecay(0.01, 10, 0.11)
    # lr = (0.01 - 0.11) * (1 - s/10) + 0.11
    assert fn(0) == pytest.approx(0.01, rel=1e-6)  # -0.1 * 1.0 + 0.11
    assert fn(1) == pytest.approx(0.02, rel=1e-6)  # -0.1 * 0.9 + 0.11
    assert fn(2) == pytest.approx(0.03, rel=1e-6)  # -0.1 * 0.8 + 0.11
    assert fn(5) == pytest.approx(0.06, rel=1e-6)  # -0.1 * 0.5 + 0.11
    assert fn(10) == pytest.approx(0.11, rel=1e-6)  # -0.1 * 0.0 + 0.11
    # without cycle the step is capped at decay_steps
    assert fn(15) == pytest.approx(0.11, rel=1e-6)
    assert fn(10_000) == pytest.approx(0.11, rel=1e-6)


def test_no_argument_means_step_zero() -> None:
    assert PolynomialDecay(0.01, 10, 0.11)() == pytest.approx(0.01, rel=1e-6)


def test_computed_in_float32() -> None:
    f32 = np.float32
    # step 1 done by hand in float32: (0.01 - 0.11) * (1 - 1/10) ** 1 + 0.11
    by_hand = (f32(0.01) - f32(0.11)) * (f32(1) - f32(1) / f32(10)) ** f32(1) + f32(0.11)
    in_float64 = (0.01 - 0.11) * (1 - 1 / 10) + 0.11
    assert float(by_hand) != in_float64  # the two precisions really differ here
    got = PolynomialDecay(0.01, 10, 0.11)(1)
    assert isinstance(got, float)
    assert got == float(by_hand)


def test_cycle_restarts_every_decay_steps() -> None:
    fn = PolynomialDecay(0.01, 10, 0.11, cycle=True)
    # s = 0: D = 10 (multiplier 1) -> 0.01
    assert fn(0) == pytest.approx(0.01, rel=1e-6)
    # s = 10: D = 10 * ceil(1) = 10 -> -0.1 * 0 + 0.11
    assert fn(10) == pytest.approx(0.11, rel=1e-6)
    # s = 15: D = 10 * ceil(1.5) = 20 -> -0.1 * (1 - 0.75) + 0.11 = 0.085
    assert fn(15) == pytest.approx(0.085, rel=1e-6)
    # s = 25: D = 30 -> -0.1 * (1/6) + 0.11 = 0.0933333...
    assert fn(25) == pytest.approx(0.11 - 0.1 / 6, rel=1e-6)
    # the non-cycling schedule stays at the end rate instead
    assert PolynomialDecay(0.01, 10, 0.11)(15) == pytest.approx(0.11, rel=1e-6)


def test_power_two() -> None:
    fn = PolynomialDecay(0.1, 100, power=2.0)
    # s = 50: (0.1 - 0.0001) * 0.5**2 + 0.0001 = 0.024975 + 0.0001 = 0.025075
    assert fn(50) == pytest.approx(0.025075, rel=1e-6)
    # s = 90: 0.0999 * 0.1**2 + 0.0001 = 0.000999 + 0.0001 = 0.001099
    assert fn(90) == pytest.approx(0.001099, rel=1e-5)
    assert fn(100) == pytest.approx(0.0001, rel=1e-6)


@pytest.mark.parametrize("decay_steps", [0, -5])
def test_non_positive_decay_steps_is_rejected(decay_steps: int) -> None:
    with pytest.raises(ValueError, match="decay_steps"):
        PolynomialDecay(0.01, decay_steps)


def test_evaluate_mixed_numbers_and_callables() -> None:
    class NoArg:
        def __call__(self) -> float:
            return 0.75

    fns: list[Any] = [
        0.5,
        lambda: 0.25,
        lambda step: step / 100,
        PolynomialDecay(0.01, 10, 0.11),
        np.float32(0.125),
        3,
        NoArg(),
        lambda step=7: step * 2.0,
    ]
    out = evaluate_learning_rates(fns, global_step=4)
    assert out.dtype == np.float32
    assert out.shape == (8,)
    # step 4: 4/100 = 0.04; decay -0.1 * 0.6 + 0.11 = 0.05; defaulted arg gets the step: 8
    np.testing.assert_allclose(out, [0.5, 0.25, 0.04, 0.05, 0.125, 3.0, 0.75, 8.0], rtol=1e-6)


def test_evaluate_empty_gives_empty_vector() -> None:
    out = evaluate_learning_rates([], 3)
    assert out.dtype == np.float32
    assert out.shape == (0,)


@pytest.mark.parametrize(
    "bad",
    ["0.1", None, True, lambda: "x", lambda a, b: 0.1],
)
def test_evaluate_rejects_what_is_not_a_learning_rate(bad: Any) -> None:
    with pytest.raises(TypeError, match="learning"):
        evaluate_learning_rates([0.1, bad], 0)
