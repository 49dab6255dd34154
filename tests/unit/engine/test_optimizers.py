"""Optimizers (docs/semantics.md §5.1): update formulas, state layout, the factory.

Expected numbers are worked out from the formulas of docs/semantics.md: either written as
arithmetic in the test, or by a per-element scalar transcription of the formula in
plain Python floats (``_reference_*``), never from the optimizer code under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.optimizers import (
    AdadeltaOptimizer,
    AdagradOptimizer,
    AdamOptimizer,
    AmsgradOptimizer,
    BatchSoftmaxOptimizer,
    FtrlOptimizer,
    GroupAdagradOptimizer,
    MomentumOptimizer,
    MovingAverageOptimizer,
    Optimizer,
    RmspropOptimizer,
    RmspropV2Optimizer,
    SgdOptimizer,
    StochasticRoundingFloat16,
    optimizer_from_config,
)
from ps_server.engine.optimizers.stochastic_rounding import MultiplyWithCarry, stochastic_round
from ps_server.errors import ConfigError, InvalidArgumentError

f32 = np.float32

CONFIG_CLASSES: dict[str, Any] = {
    "adagrad": eht.AdagradOptimizerConfig,
    "sgd": eht.SgdOptimizerConfig,
    "ftrl": eht.FtrlOptimizerConfig,
    "dynamic_wd_adagrad": eht.DynamicWdAdagradOptimizerConfig,
    "adadelta": eht.AdadeltaOptimizerConfig,
    "adam": eht.AdamOptimizerConfig,
    "amsgrad": eht.AmsgradOptimizerConfig,
    "momentum": eht.MomentumOptimizerConfig,
    "moving_average": eht.MovingAverageOptimizerConfig,
    "rmsprop": eht.RmspropOptimizerConfig,
    "rmspropv2": eht.RmspropV2OptimizerConfig,
    "dc": eht.DcOptimizerConfig,
    "group_ftrl": eht.GroupFtrlOptimizerConfig,
    "batch_softmax": eht.BatchSoftmaxOptimizerConfig,
    "group_adagrad": eht.GroupAdaGradOptimizerConfig,
}

BUILDABLE: dict[str, type[Optimizer]] = {
    "adagrad": AdagradOptimizer,
    "sgd": SgdOptimizer,
    "ftrl": FtrlOptimizer,
    "adadelta": AdadeltaOptimizer,
    "adam": AdamOptimizer,
    "amsgrad": AmsgradOptimizer,
    "momentum": MomentumOptimizer,
    "moving_average": MovingAverageOptimizer,
    "rmsprop": RmspropOptimizer,
    "rmspropv2": RmspropV2Optimizer,
    "batch_softmax": BatchSoftmaxOptimizer,
    "group_adagrad": GroupAdagradOptimizer,
}


def config(kind: str, sr: bool = False, **fields: Any) -> eht.OptimizerConfig:
    cfg = eht.OptimizerConfig(stochastic_rounding_float16=sr)
    getattr(cfg, kind).CopyFrom(CONFIG_CLASSES[kind](**fields))
    return cfg


def make(kind: str, dim: int, sr: bool = False, **fields: Any) -> Optimizer:
    return optimizer_from_config(config(kind, sr, **fields), dim)


def run(
    opt: Optimizer,
    grads: Sequence[Sequence[float]],
    lr: float,
    w0: Sequence[float] | None = None,
    global_step: int = 0,
) -> list[np.ndarray]:
    """Apply one step per gradient row to a single entry; return w after each step."""
    params = np.zeros((1, opt.dim), np.float32) if w0 is None else np.array([w0], np.float32)
    state = opt.init_state(1)
    out = []
    for g in grads:
        opt.apply(params, state, np.array([g], np.float32), lr, global_step)
        assert params.dtype == np.float32
        out.append(params[0].copy())
    return out


def close(actual: np.ndarray, expected: Sequence[float], rtol: float = 2e-6) -> None:
    np.testing.assert_allclose(actual, np.asarray(expected, np.float64), rtol=rtol, atol=1e-7)


def _reference(
    step: Callable[[float, float, dict[str, float]], float],
    init: dict[str, float],
    grads: Sequence[Sequence[float]],
    w0: Sequence[float],
) -> list[list[float]]:
    """Scalar transcription driver: per element, state dict, step -> new w."""
    states = [dict(init) for _ in w0]
    w = list(w0)
    out = []
    for g in grads:
        w = [step(w[i], g[i], states[i]) for i in range(len(w))]
        out.append(list(w))
    return out


# ---------------------------------------------------------------- sgd


def test_sgd_steps_in_float32() -> None:
    opt = make("sgd", 3)
    out = run(opt, [[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]], lr=0.1)
    lr = f32(0.1)
    g = np.array([1.0, -2.0, 0.5], np.float32)
    w1 = f32(0) - lr * g
    w2 = w1 - lr * g
    np.testing.assert_array_equal(out[0], w1)
    np.testing.assert_array_equal(out[1], w2)
    close(out[1], [-0.2, 0.4, -0.1])
    assert opt.slots() == () and opt.init_state(4) == {}


def test_sgd_apply_sequential_duplicates_reference_example() -> None:
    # docs/semantics.md §4.2: ids [0,1,0,1,0], grad -1, lr 0.1, dim 10 -> id0 0.3, id1 0.2.
    opt = make("sgd", 10)
    values = np.zeros((2, 10), np.float32)
    rows = np.array([0, 1, 0, 1, 0], np.int64)
    opt.apply_sequential(values, {}, rows, np.full((5, 10), -1.0, np.float32), 0.1, 0)
    step = f32(0.1) * f32(-1.0)
    id0 = f32(0) - step - step - step
    id1 = f32(0) - step - step
    np.testing.assert_array_equal(values[0], np.full(10, id0))
    np.testing.assert_array_equal(values[1], np.full(10, id1))
    close(values[0], [0.3] * 10)
    close(values[1], [0.2] * 10)


# ---------------------------------------------------------------- adagrad


def test_adagrad_cpp_test_values() -> None:
    opt = make("adagrad", 2, initial_accumulator_value=1.0)
    (w,) = run(opt, [[1.0, 2.0]], lr=0.1)
    # norm = 1 + g^2 = (2, 5); w = -0.1 / sqrt(norm) * g
    close(w, [-0.1 / math.sqrt(2) * 1, -0.1 / math.sqrt(5) * 2])
    close(w, [-0.07071067, -0.08944272])


def test_adagrad_weight_decay_uses_decayed_grad_everywhere() -> None:
    opt = make("adagrad", 2, initial_accumulator_value=1.0, weight_decay_factor=0.1)
    out = run(opt, [[1.0, 2.0], [1.0, 2.0]], lr=0.1)
    close(out[1], [-0.128173, -0.155943], rtol=1e-5)
    # Second step by hand for dim 0: g' = 1 + 0.1 * w1, norm = 2 + g'^2.
    w1 = -0.1 / math.sqrt(2)
    gp = 1 + 0.1 * w1
    close(out[1][:1], [w1 - 0.1 / math.sqrt(2 + gp * gp) * gp])


def test_adagrad_three_steps_against_formula() -> None:
    def step(w: float, g: float, s: dict[str, float]) -> float:
        gp = g + 0.05 * w
        s["norm"] += gp * gp
        return w - 0.3 / math.sqrt(s["norm"]) * gp

    grads = [[0.5, -1.0, 3.0], [-0.25, 2.0, 1.0], [1.5, 0.0, -2.0]]
    opt = make("adagrad", 3, initial_accumulator_value=0.1, weight_decay_factor=0.05)
    out = run(opt, grads, lr=0.3, w0=[0.1, -0.2, 0.3])
    expected = _reference(step, {"norm": 0.1}, grads, [0.1, -0.2, 0.3])
    for a, e in zip(out, expected, strict=True):
        close(a, e)
    # The accumulator is the dump's norm field.
    state = opt.init_state(2)
    np.testing.assert_array_equal(state["norm"], np.full((2, 3), f32(0.1)))


# ---------------------------------------------------------------- ftrl


def test_ftrl_cpp_test_values() -> None:
    opt = make("ftrl", 1)
    out = run(opt, [[10.0], [10.0]], lr=0.01)
    # Step 1: n' = 0.1 + 100; zero = 10 (w was 0); w = 0.01 * (0 - 10) / sqrt(100.1).
    close(out[0], [0.01 * -10 / math.sqrt(100.1)])
    close(out[0], [-0.009995], rtol=1e-4)
    close(out[1], [-0.0170643], rtol=1e-5)


def test_ftrl_sign_bit_l1_term_and_threshold() -> None:
    lr, acc, l1, l2, beta = 0.1, 0.1, 0.5, 0.2, 1.0

    def step(w: float, g: float, s: dict[str, float]) -> float:
        n_new = s["norm"] + g * g
        sigma = (math.sqrt(n_new) - math.sqrt(s["norm"])) / lr
        s["zero"] += g - sigma * w
        s["norm"] = n_new
        if abs(s["zero"]) <= l1:
            return 0.0
        sign_bit = 1.0 if math.copysign(1.0, s["zero"]) < 0 else 0.0
        return lr * (sign_bit * l1 - s["zero"]) / (math.sqrt(n_new) + beta + l2 * lr)

    grads = [[2.0, -2.0, 0.3], [-0.5, 1.0, 0.1], [0.25, 0.5, -1.0]]
    opt = make(
        "ftrl",
        3,
        initial_accumulator_value=acc,
        l1_regularization_strength=l1,
        l2_regularization_strength=l2,
        beta=beta,
    )
    out = run(opt, grads, lr=lr)
    expected = _reference(step, {"zero": 0.0, "norm": acc}, grads, [0.0, 0.0, 0.0])
    for a, e in zip(out, expected, strict=True):
        close(a, e)
    # Step 1 by hand: zero = g; positive zero has s = 0 (textbook would give -0.15/d).
    d = math.sqrt(4.1) + 1.0 + 0.02
    close(out[0], [0.1 * (0 - 2.0) / d, 0.1 * (0.5 + 2.0) / d, 0.0])


# ---------------------------------------------------------------- adadelta


def test_adadelta_first_step_by_hand_and_three_steps() -> None:
    opt = make("adadelta", 1)
    (w,) = run(opt, [[10.0]], lr=0.01)
    # accum' = 0.1 * 100 = 10; u = sqrt(0 + 0.01) / sqrt(10 + 0.01) * 10; w = -0.01 * u.
    u = math.sqrt(0.01) / math.sqrt(10.01) * 10
    close(w, [-0.01 * u])

    rho, eps, wd, lr = 0.8, 0.05, 0.1, 0.5

    def step(w: float, g: float, s: dict[str, float]) -> float:
        gp = g + wd * w
        acc_new = rho * s["accum"] + (1 - rho) * gp * gp
        u = math.sqrt(s["accum_update"] + eps) / math.sqrt(acc_new + eps) * gp
        s["accum_update"] = rho * s["accum_update"] + (1 - rho) * u * u
        s["accum"] = acc_new
        return w - lr * u

    grads = [[1.0, -3.0], [0.5, 2.0], [-1.0, 0.25]]
    opt = make("adadelta", 2, averaging_ratio=rho, epsilon=eps, weight_decay_factor=wd)
    out = run(opt, grads, lr=lr, w0=[0.5, -0.5])
    expected = _reference(step, {"accum": 0.0, "accum_update": 0.0}, grads, [0.5, -0.5])
    for a, e in zip(out, expected, strict=True):
        close(a, e)


# ---------------------------------------------------------------- adam / amsgrad


def _adam_reference(
    grads: Sequence[Sequence[float]],
    w0: Sequence[float],
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    wd: float,
    nesterov: bool,
    amsgrad: bool,
) -> tuple[list[list[float]], tuple[float, float]]:
    w = list(w0)
    dim = len(w)
    m, v, vhat = [0.0] * dim, [0.0] * dim, [0.0] * dim
    p1, p2 = b1, b2
    out = []
    for g in grads:
        lr_t = lr * math.sqrt(1 - p2) / (1 - p1)
        for i in range(dim):
            gp = g[i] + wd * w[i]
            m[i] += (gp - m[i]) * (1 - b1)
            v[i] += (gp * gp - v[i]) * (1 - b2)
            vhat[i] = max(vhat[i], v[i])
            denom = math.sqrt(vhat[i] if amsgrad else v[i]) + eps
            num = gp * (1 - b1) + b1 * m[i] if nesterov else m[i]
            w[i] -= num * lr_t / denom
        p1, p2 = p1 * b1, p2 * b2
        out.append(list(w))
    return out, (p1, p2)


def test_adam_cpp_test_values_and_powers() -> None:
    opt = make("adam", 1)
    params = np.zeros((1, 1), np.float32)
    state = opt.init_state(1)
    for _ in range(2):
        opt.apply(params, state, np.array([[10.0]], np.float32), 0.01, 0)
        if _ == 0:
            # lr_t = 0.01*sqrt(1-0.99)/(1-0.9) = 0.01; m = 1; v = 1; w = -0.01/(1+0.01).
            close(params[0], [-0.01 / 1.01])
            close(params[0], [-0.00990099])
    close(params[0], [-0.0198306], rtol=1e-5)
    close(state["beta1_power"][0], [0.9**3])
    close(state["beta2_power"][0], [0.99**3])
    assert state["beta1_power"].shape == (1, 1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adam_three_steps_against_formula(nesterov: bool) -> None:
    grads = [[1.0, -2.0, 0.5], [0.5, 1.0, -3.0], [-1.0, 0.0, 2.0]]
    kw = dict(beta1=0.8, beta2=0.95, epsilon=0.001, weight_decay_factor=0.1)
    opt = make("adam", 3, use_nesterov=nesterov, **kw)
    out = run(opt, grads, lr=0.05, w0=[0.2, -0.1, 0.0])
    expected, _ = _adam_reference(
        grads, [0.2, -0.1, 0.0], 0.05, 0.8, 0.95, 0.001, 0.1, nesterov, amsgrad=False
    )
    for a, e in zip(out, expected, strict=True):
        close(a, e, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_amsgrad_keeps_the_largest_second_moment(nesterov: bool) -> None:
    # A large gradient then small ones: v shrinks, vhat keeps the early maximum.
    grads = [[5.0, -4.0], [0.1, 0.2], [0.1, -0.1]]
    opt = make("amsgrad", 2, beta1=0.9, beta2=0.5, epsilon=0.01, use_nesterov=nesterov)
    params = np.zeros((1, 2), np.float32)
    state = opt.init_state(1)
    out = []
    for g in grads:
        opt.apply(params, state, np.array([g], np.float32), 0.1, 0)
        out.append(params[0].copy())
    expected, (p1, p2) = _adam_reference(
        grads, [0.0, 0.0], 0.1, 0.9, 0.5, 0.01, 0.0, nesterov, amsgrad=True
    )
    for a, e in zip(out, expected, strict=True):
        close(a, e, rtol=1e-5)
    # vhat is the step-1 v = 0.5 * g^2, larger than the current v.
    close(state["vhat"][0], [0.5 * 25, 0.5 * 16])
    assert (state["v"] < state["vhat"]).all()
    close(state["beta1_power"][0], [p1])
    close(state["beta2_power"][0], [p2])
    # And the result differs from plain Adam on the same inputs.
    adam_out, _ = _adam_reference(grads, [0.0, 0.0], 0.1, 0.9, 0.5, 0.01, 0.0, nesterov, False)
    assert not np.allclose(out[-1], adam_out[-1], rtol=1e-3)


# ---------------------------------------------------------------- momentum


def test_momentum_plain_by_hand() -> None:
    out = run(make("momentum", 1), [[1.0]] * 3, lr=0.1)
    # n1 = -0.1, w1 = -0.1; n2 = 0.9*-0.1 - 0.1 = -0.19, w2 = -0.29; n3 = -0.271, w3 = -0.561.
    close(np.concatenate(out), [-0.1, -0.29, -0.561])


def test_momentum_nesterov_by_hand() -> None:
    out = run(make("momentum", 1, use_nesterov=True), [[1.0]] * 2, lr=0.1)
    # w1 = -0.9*0 + 1.9*(-0.1) = -0.19; w2 = -0.19 - 0.9*(-0.1) + 1.9*(-0.19) = -0.461.
    close(np.concatenate(out), [-0.19, -0.461])


def test_momentum_weight_decay_against_formula() -> None:
    mu, wd, lr = 0.5, 0.2, 0.3

    def step(w: float, g: float, s: dict[str, float]) -> float:
        dx = lr * (g + wd * w)
        n_new = mu * s["n"] - dx
        s["n"] = n_new
        return w + n_new

    grads = [[1.0, -1.0], [2.0, 0.5], [-0.5, 0.0]]
    opt = make("momentum", 2, momentum=mu, weight_decay_factor=wd)
    out = run(opt, grads, lr=lr, w0=[1.0, -2.0])
    for a, e in zip(out, _reference(step, {"n": 0.0}, grads, [1.0, -2.0]), strict=True):
        close(a, e)


# ---------------------------------------------------------------- moving average


def test_moving_average_by_hand() -> None:
    opt = make("moving_average", 2)
    out = run(opt, [[1.0, -2.0]] * 3, lr=123.0)  # lr is not used
    # w = 0.9 w + 0.1 g: 0.1, 0.19, 0.271 (times g).
    close(np.stack(out), [[0.1, -0.2], [0.19, -0.38], [0.271, -0.542]])
    assert opt.dump_field is None
    assert opt.slots() == () and opt.init_state(3) == {}


# ---------------------------------------------------------------- rmsprop


def test_rmsprop_v1_uses_the_config_learning_rate() -> None:
    opt = make("rmsprop", 1)  # learning_rate 0.01, momentum 0.9
    out = run(opt, [[1.0], [1.0]], lr=100.0)
    # n1 = 0.1 * 1 = 0.1; w1 = -0.01 / (sqrt(0.1) + 1) * 1
    w1 = -0.01 / (math.sqrt(0.1) + 1)
    # n2 = 0.9 * 0.1 + 0.1 = 0.19; w2 = w1 - 0.01 / (sqrt(0.19) + 1)
    w2 = w1 - 0.01 / (math.sqrt(0.19) + 1)
    close(np.concatenate(out), [w1, w2])


def test_rmsprop_v1_weight_decay_against_formula() -> None:
    cfg_lr, mu, wd = 0.05, 0.7, 0.3

    def step(w: float, g: float, s: dict[str, float]) -> float:
        dx = g + wd * w
        s["n"] = mu * s["n"] + (1 - mu) * dx * dx
        return w - cfg_lr / (math.sqrt(s["n"]) + 1) * dx

    grads = [[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]]
    opt = make("rmsprop", 2, learning_rate=cfg_lr, momentum=mu, weight_decay_factor=wd)
    out = run(opt, grads, lr=0.0, w0=[0.5, 1.0])
    for a, e in zip(out, _reference(step, {"n": 0.0}, grads, [0.5, 1.0]), strict=True):
        close(a, e)


def test_rmspropv2_by_hand_and_against_formula() -> None:
    out = run(make("rmspropv2", 1, learning_rate=7.0), [[1.0], [1.0]], lr=0.1)
    # n1 = 0 + 1 = 1; w1 = -0.1 / 2. n2 = 0.9 + 1 = 1.9; w2 = w1 - 0.1 / (sqrt(1.9) + 1).
    close(np.concatenate(out), [-0.05, -0.05 - 0.1 / (math.sqrt(1.9) + 1)])

    mu, wd, lr = 0.5, 0.1, 0.2

    def step(w: float, g: float, s: dict[str, float]) -> float:
        dx = g + wd * w
        s["n"] = mu * s["n"] + dx * dx
        return w - lr / (math.sqrt(s["n"]) + 1) * dx

    grads = [[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]]
    opt = make("rmspropv2", 2, momentum=mu, weight_decay_factor=wd)
    out = run(opt, grads, lr=lr, w0=[-0.5, 0.25])
    for a, e in zip(out, _reference(step, {"n": 0.0}, grads, [-0.5, 0.25]), strict=True):
        close(a, e)


# ---------------------------------------------------------------- group adagrad


def _group_adagrad_reference(
    grads: Sequence[Sequence[float]],
    w0: Sequence[float],
    lr: float,
    beta: float,
    acc0: float,
    l2: float,
    wd: float,
) -> tuple[list[list[float]], float]:
    w, acc = list(w0), acc0
    out = []
    for g in grads:
        gp = [g[i] + wd * w[i] for i in range(len(w))]
        acc += max(x * x for x in gp)
        eta = lr / (beta + math.sqrt(acc))
        z = [gp[i] - w[i] / eta for i in range(len(w))]
        norm = math.sqrt(sum(x * x for x in z))
        w = [0.0] * len(w) if norm < l2 else [-eta * (norm - l2) / norm * x for x in z]
        out.append(list(w))
    return out, acc


def test_group_adagrad_first_step_by_hand() -> None:
    opt = make("group_adagrad", 2, learning_rate=0.5)
    (w,) = run(opt, [[1.0, -2.0]], lr=0.1)
    # G = 0.1 + max(1, 4) = 4.1; eta = 0.1 / (0 + sqrt(4.1)); z = g; w = -eta * z.
    eta = 0.1 / math.sqrt(4.1)
    close(w, [-eta * 1.0, -eta * -2.0])


def test_group_adagrad_three_steps_and_group_shrink() -> None:
    grads = [[1.0, -2.0, 0.5], [0.2, 0.1, -0.3], [-1.0, 0.5, 2.0]]
    kw = dict(beta=0.5, initial_accumulator_value=0.2, weight_decay_factor=0.1)
    opt = make("group_adagrad", 3, l2_regularization_strength=0.3, **kw)
    params = np.array([[0.1, 0.2, -0.1]], np.float32)
    state = opt.init_state(1)
    out = []
    for g in grads:
        opt.apply(params, state, np.array([g], np.float32), 0.2, 0)
        out.append(params[0].copy())
    expected, acc = _group_adagrad_reference(grads, [0.1, 0.2, -0.1], 0.2, 0.5, 0.2, 0.3, 0.1)
    for a, e in zip(out, expected, strict=True):
        close(a, e, rtol=1e-5)
    close(state["grad_square_sum"][0], [acc])
    assert state["grad_square_sum"].shape == (1, 1)

    # A small gradient whose ||z|| stays under l2 zeroes the whole entry.
    opt = make("group_adagrad", 2, l2_regularization_strength=10.0)
    (w,) = run(opt, [[1.0, -2.0]], lr=0.1)
    np.testing.assert_array_equal(w, [0.0, 0.0])


def test_group_adagrad_zero_group_stays_zero() -> None:
    # Z = 0 (zero weights, zero gradient): the formula's limit 0, not 0/0 = NaN.
    (w,) = run(make("group_adagrad", 2), [[0.0, 0.0]], lr=0.1)
    np.testing.assert_array_equal(w, [0.0, 0.0])


# ---------------------------------------------------------------- batch softmax


def test_batch_softmax_first_hits_by_hand() -> None:
    opt = make("batch_softmax", 1)
    params = np.ones((1, 1), np.float32)
    state = opt.init_state(1)
    nan_grad = np.full((1, 1), np.nan, np.float32)  # the gradient is ignored
    opt.apply(params, state, nan_grad, 0.1, 5)
    # B = 0.9 * 1 + 0.1 * (5 - 0) = 1.4; A = 5
    close(params[0], [1.4])
    assert state["global_step"].dtype == np.int64 and state["global_step"][0, 0] == 5
    opt.apply(params, state, nan_grad, 0.1, 15)
    close(params[0], [0.9 * 1.4 + 0.1 * 10])
    assert state["global_step"][0, 0] == 15


def test_batch_softmax_interval_estimate_over_1000_steps() -> None:
    opt = make("batch_softmax", 1)
    params = np.ones((2, 1), np.float32)
    state = opt.init_state(2)
    periods = np.array([5, 10])
    for step in range(1, 1001):
        hit = np.flatnonzero(step % periods == 0)
        if hit.size == 0:
            continue
        p = params[hit]
        s = {"global_step": state["global_step"][hit]}
        opt.apply(p, s, np.zeros((hit.size, 1), np.float32), 0.1, step)
        params[hit] = p
        state["global_step"][hit] = s["global_step"]
    prob = 1.0 / np.maximum(params[:, 0], 1.0)
    close(prob, [0.2, 0.1], rtol=1e-3)


def test_batch_softmax_rejects_negative_step_before_any_change() -> None:
    opt = make("batch_softmax", 1)
    params = np.full((1, 1), 3.0, np.float32)
    state = opt.init_state(1)
    state["global_step"][0, 0] = 7
    with pytest.raises(InvalidArgumentError, match="global_step"):
        opt.apply(params, state, np.zeros((1, 1), np.float32), 0.1, -1)
    assert params[0, 0] == 3.0 and state["global_step"][0, 0] == 7


def test_batch_softmax_needs_dim_1() -> None:
    with pytest.raises(ConfigError, match="dim"):
        make("batch_softmax", 2)


# ---------------------------------------------------------------- stochastic rounding


def _mwc_reference(k: int) -> list[float]:
    """The generator of docs/semantics.md §5.1, one draw at a time, both halves of the state."""
    s0, s1 = 0, 1
    out = []
    for _ in range(k):
        s0 = (36969 * (s0 & 65535) + (s0 >> 16)) % 2**32
        s1 = (18000 * (s1 & 65535) + (s1 >> 16)) % 2**32
        out.append(float(f32(((s0 & 65535) << 16) + s1 % 2**32)) / 2**32)
    return out


def test_mwc_stream_matches_the_recurrence_across_calls_and_chunks() -> None:
    n = 70_000  # crosses the generator's internal chunk of 65536
    expected = np.array(_mwc_reference(n), np.float32)
    rng = MultiplyWithCarry()
    got = np.concatenate([rng.draw(3), rng.draw(0), rng.draw(n - 3)])
    np.testing.assert_array_equal(got, expected)
    # First draws by hand: s1 = 18000, then 18000 * 18000 = 324000000 (< 2^16 * 18000).
    close(got[:2], [18000 / 2**32, 324_000_000 / 2**32])


def test_stochastic_round_picks_float16_neighbours() -> None:
    ulp = 2.0**-10  # float16 spacing in [1, 2)
    w = np.array([1 + ulp / 4, 1 + ulp / 4, -(1 + ulp / 4), 0.5, 7e4, np.nan], np.float32)
    p = np.array([0.2, 0.3, 0.8, 0.0, 0.5, 0.5], np.float32)
    out = stochastic_round(w, p)
    # frac = (w - down)/(up - down) = 0.25 for +-(1 + ulp/4) (for the negative one the
    # lower neighbour is -(1 + ulp), so frac = 0.75): up iff p <= frac.
    assert out[0] == f32(1 + ulp)
    assert out[1] == f32(1.0)
    assert out[2] == f32(-(1 + ulp))  # p 0.8 > 0.75 -> down
    assert out[3] == f32(0.5)  # exactly representable stays
    assert out[4] == f32(65504.0)  # neighbours 65504 and inf: frac 0 -> down
    assert np.isnan(out[5])


def test_stochastic_rounding_wrapper_rounds_the_inner_update() -> None:
    opt = make("sgd", 4, sr=True)
    assert isinstance(opt, StochasticRoundingFloat16)
    assert isinstance(opt.inner, SgdOptimizer) and opt.dump_field == 2
    w0 = np.array([[1.0, 1.0, 1.0, 0.5]], np.float32)
    g = np.array([[-(2.0**-12), -(2.0**-11) * 3, 2.0**-13, 0.0]], np.float32)
    params = w0.copy()
    opt.apply(params, {}, g, 1.0, 0)
    p = _mwc_reference(4)
    # Inner SGD gives w = 1 + 2^-12, 1 + 3*2^-11, 1 - 2^-13, 0.5. Neighbours in float16:
    # spacing above 1 is 2^-10, below 1 it is 2^-11.
    cases = [
        (1.0, 1 + 2.0**-10, 0.25),
        (1 + 2.0**-10, 1 + 2.0**-9, 0.5),
        (1 - 2.0**-11, 1.0, 0.75),
    ]
    for i, (down, up, frac) in enumerate(cases):
        assert params[0, i] == f32(up if p[i] <= frac else down)
    assert params[0, 3] == f32(0.5)


def test_stochastic_rounding_wrapper_passes_global_step_zero() -> None:
    opt = make("batch_softmax", 1, sr=True)
    assert opt.dump_field == 14
    assert opt.slots() == BatchSoftmaxOptimizer(eht.BatchSoftmaxOptimizerConfig(), 1).slots()
    params = np.full((1, 1), 2.0, np.float32)
    state = opt.init_state(1)
    opt.apply(params, state, np.zeros((1, 1), np.float32), 0.5, 9)
    # Inner step with global_step 0: B = 0.5 * 2 + 0.5 * (0 - 0) = 1 (exact in float16).
    assert params[0, 0] == 1.0 and state["global_step"][0, 0] == 0


# ---------------------------------------------------------------- apply_sequential


SEQUENTIAL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {}),
    ("adagrad", {"weight_decay_factor": 0.1}),
    ("ftrl", {"l1_regularization_strength": 0.1}),
    ("adadelta", {}),
    ("adam", {}),
    ("amsgrad", {"use_nesterov": True}),
    ("momentum", {"use_nesterov": True}),
    ("moving_average", {}),
    ("rmsprop", {}),
    ("rmspropv2", {}),
    ("group_adagrad", {"l2_regularization_strength": 0.1}),
]


@pytest.mark.parametrize(("kind", "fields"), SEQUENTIAL_CASES)
def test_apply_sequential_equals_steps_one_by_one(kind: str, fields: dict[str, Any]) -> None:
    dim, capacity = 3, 5
    opt = make(kind, dim, **fields)
    rng = np.random.default_rng(7)
    rows = np.array([3, 1, 3, 3, 0, 1, 4, 3], np.int64)
    grads = rng.normal(size=(rows.size, dim)).astype(np.float32)
    values = rng.normal(size=(capacity, dim)).astype(np.float32)
    state = opt.init_state(capacity)

    one_values = values.copy()
    one_state = {k: v.copy() for k, v in state.items()}
    for i, r in enumerate(rows):
        p = one_values[r : r + 1].copy()
        s = {k: v[r : r + 1].copy() for k, v in one_state.items()}
        opt.apply(p, s, grads[i : i + 1], 0.05, 11)
        one_values[r] = p[0]
        for k in one_state:
            one_state[k][r] = s[k][0]

    opt.apply_sequential(values, state, rows, grads, 0.05, 11)
    np.testing.assert_array_equal(values, one_values)
    for k in state:
        np.testing.assert_array_equal(state[k], one_state[k])


def test_apply_sequential_batch_softmax_duplicates() -> None:
    opt = make("batch_softmax", 1)
    values = np.ones((2, 1), np.float32)
    state = opt.init_state(2)
    opt.apply_sequential(values, state, np.array([1, 1]), np.zeros((2, 1), np.float32), 0.5, 4)
    # Row 1: B = 0.5*1 + 0.5*4 = 2.5, then B = 0.5*2.5 + 0.5*(4 - 4) = 1.25. Row 0 untouched.
    close(values[:, 0], [1.0, 1.25])
    assert state["global_step"][:, 0].tolist() == [0, 4]


# ---------------------------------------------------------------- factory


@pytest.mark.parametrize("kind", sorted(BUILDABLE))
def test_factory_builds_each_type_with_the_segment_dim(kind: str) -> None:
    dim = 1 if kind == "batch_softmax" else 3
    cfg = config(kind, dim_size=99)
    opt = optimizer_from_config(cfg, dim)
    assert type(opt) is BUILDABLE[kind]
    assert opt.dim == dim and opt.config.dim_size == dim
    assert getattr(cfg, kind).dim_size == 99  # the caller's config is untouched
    wrapped = optimizer_from_config(config(kind, sr=True), dim)
    assert isinstance(wrapped, StochasticRoundingFloat16)
    assert type(wrapped.inner) is BUILDABLE[kind]


def test_factory_rejects_missing_type() -> None:
    with pytest.raises(ConfigError, match="no type set"):
        optimizer_from_config(eht.OptimizerConfig(), 4)


@pytest.mark.parametrize("kind", ["dynamic_wd_adagrad", "group_ftrl", "dc"])
def test_factory_rejects_unimplemented_types(kind: str) -> None:
    with pytest.raises(ConfigError, match="not implemented"):
        optimizer_from_config(config(kind), 4)


def test_factory_rejects_non_positive_dim() -> None:
    with pytest.raises(ConfigError, match="dim"):
        optimizer_from_config(config("sgd"), 0)


# ---------------------------------------------------------------- dump layout

EXPECTED_DUMP_FIELDS = {
    "adagrad": 1,
    "sgd": 2,
    "ftrl": 3,
    "adadelta": 6,
    "adam": 7,
    "amsgrad": 8,
    "momentum": 9,
    "rmsprop": 11,
    "rmspropv2": 12,
    "batch_softmax": 14,
    "group_adagrad": 15,
    "moving_average": None,
}


@pytest.mark.parametrize("kind", sorted(BUILDABLE))
def test_slots_mirror_single_optimizer_dump(kind: str) -> None:
    dim = 1 if kind == "batch_softmax" else 3
    opt = make(kind, dim)
    assert opt.dump_field == EXPECTED_DUMP_FIELDS[kind]
    if opt.dump_field is None:
        assert opt.slots() == ()
        return
    oneof = eht.SingleOptimizerDump.DESCRIPTOR.fields_by_number[opt.dump_field]
    assert oneof.name == kind
    msg_desc = oneof.message_type
    slots = opt.slots()
    assert {s.field for s in slots} == set(msg_desc.fields_by_number)
    assert [s.field for s in slots] == sorted(s.field for s in slots)
    state = opt.init_state(2)
    assert set(state) == {s.name for s in slots}
    for slot in slots:
        fd = msg_desc.fields_by_number[slot.field]
        assert fd.name == slot.name
        assert fd.is_repeated == slot.repeated
        expected_type = fd.TYPE_INT64 if slot.dtype == np.int64 else fd.TYPE_FLOAT
        assert fd.type == expected_type
        assert slot.width == (dim if slot.repeated else 1)
        assert state[slot.name].shape == (2, slot.width)
        assert state[slot.name].dtype == slot.dtype

    # Build the dump for entry 0 through reflection and round-trip it.
    dump = eht.SingleOptimizerDump()
    sub = getattr(dump, kind)
    sub.SetInParent()
    for slot in slots:
        row = state[slot.name][0]
        if slot.repeated:
            getattr(sub, slot.name).extend(row.tolist())
        else:
            setattr(sub, slot.name, row[0].item())
    back = eht.SingleOptimizerDump.FromString(dump.SerializeToString())
    assert back.WhichOneof("type") == kind
    for slot in slots:
        got = getattr(getattr(back, kind), slot.name)
        values = list(got) if slot.repeated else [got]
        np.testing.assert_array_equal(np.array(values, slot.dtype), state[slot.name][0])
