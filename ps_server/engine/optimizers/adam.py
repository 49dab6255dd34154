"""Adam (docs/semantics.md §5.1).

Per entry, with ``g' = g + wd * w`` per element::

    lr_t = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
    m   += (g' - m) * (1 - beta1)
    v   += (g'^2 - v) * (1 - beta2)
    w   -= m * lr_t / (sqrt(v) + eps)                                  plain
    w   -= (g' * (1 - beta1) + beta1 * m) * lr_t / (sqrt(v) + eps)    nesterov
    beta1_power *= beta1;  beta2_power *= beta2

Arithmetic is Monolith's build (docs/semantics.md §5.4), checked bit for bit against
its compiled C++ (tests/data/monolith_vectors): its unqualified ``sqrt`` is
``::sqrt(double)``, so ``lr_t`` is computed in double and stored as a float; the
numerator ``m * lr_t`` (nesterov ``fma(g', 1 - beta1, beta1 * m) * lr_t``) is a float
product; the quotient by ``sqrt(double(v)) + eps`` and the subtraction from ``w`` are
in double, rounded to float once. ``-mfma`` fuses the rest: ``g' = fma(wd, w, g)``,
``m = fma(g' - m, 1 - beta1, m)``, ``v = fma(fma(g', g', -v), 1 - beta2, v)``.

``m`` and ``v`` start at 0; the powers start at ``beta1`` / ``beta2`` and are kept per
entry. The dump is ``SingleOptimizerDump.adam`` (field 7) with ``m`` (1), ``v`` (2),
``beta1_power`` (3) and ``beta2_power`` (4).

Choice (docs/semantics.md §12): Monolith's restore writes the dumped ``beta2_power``
into ``beta1_power`` and leaves ``beta2_power`` at its initial value. Our slots map
one to one onto the dump fields, so both powers restore correctly; the file format
is unchanged. A table with ``monolith_quirks`` restores as Monolith does
(:meth:`AdamOptimizer.monolith_restored_state`). ``use_beta1_warmup`` and
``warmup_steps`` are ignored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    float_slot,
    scalar_slot,
)
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats


class AdamOptimizer(Optimizer):
    """Adam with per-entry bias-correction powers (float32).

    Slots: ``m`` [dim] (1), ``v`` [dim] (2), ``beta1_power`` scalar (3),
    ``beta2_power`` scalar (4). Dump: ``adam`` (field 7).
    """

    dump_field: ClassVar[int | None] = 7

    def __init__(
        self, config: opt_pb.AdamOptimizerConfig | opt_pb.AmsgradOptimizerConfig, dim: int
    ) -> None:
        super().__init__(config, dim)
        self.beta1 = np.float32(config.beta1)
        self.beta2 = np.float32(config.beta2)
        self.weight_decay = np.float32(config.weight_decay_factor)
        self.epsilon = np.float32(config.epsilon)
        self.use_nesterov = bool(config.use_nesterov)

    def slots(self) -> tuple[StateSlot, ...]:
        return (
            float_slot("m", self.dim, 1),
            float_slot("v", self.dim, 2),
            scalar_slot("beta1_power", 3),
            scalar_slot("beta2_power", 4),
        )

    def init_state(self, n: int) -> State:
        return {
            "m": np.zeros((n, self.dim), np.float32),
            "v": np.zeros((n, self.dim), np.float32),
            "beta1_power": np.full((n, 1), self.beta1, np.float32),
            "beta2_power": np.full((n, 1), self.beta2, np.float32),
        }

    def monolith_restored_state(self, given: State, n: int) -> State:
        """The state Monolith's restore leaves from ``n`` dumped rows ``given``: its
        ``Restore`` writes the dump's ``beta2_power`` into ``beta1_power`` and leaves
        ``beta2_power`` at its initial value (``beta2``); ``m`` and ``v`` as dumped.
        Slots missing from ``given`` keep what the caller would have kept."""
        out = dict(given)
        if "beta2_power" in given:
            out["beta1_power"] = given["beta2_power"]
        out["beta2_power"] = np.full((n, 1), self.beta2, np.float32)
        return out

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        m, v = state["m"], state["v"]
        g = self._moments(params, m, v, grads)
        self._move(params, state, g, m, v, lr)

    def _moments(self, params: Floats, m: Floats, v: Floats, grads: Floats) -> Floats:
        """Update ``m`` and ``v`` in place (FMA as Monolith's build); returns ``g'``."""
        one = np.float32(1)
        g = fma32(self.weight_decay, params, grads)
        m[...] = fma32(g - m, one - self.beta1, m)
        v[...] = fma32(fma32(g, g, -v), one - self.beta2, v)
        return g

    def _move(
        self, params: Floats, state: State, g: Floats, m: Floats, v: Floats, lr: float
    ) -> None:
        """Move ``w`` given the new moments (``v`` = the denominator's second moment),
        then advance the powers."""
        b1p, b2p = state["beta1_power"], state["beta2_power"]
        one = np.float32(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lr_t = (np.float64(np.float32(lr)) * np.sqrt((one - b2p).astype(np.float64))
                    / (one - b1p).astype(np.float64)).astype(np.float32)  # [m, 1]
            step = fma32(g, one - self.beta1, self.beta1 * m) if self.use_nesterov else m
            den = np.sqrt(v.astype(np.float64))
            den += np.float64(self.epsilon)
            delta = (step * lr_t).astype(np.float64)
            delta /= den
            params[...] = params.astype(np.float64) - delta
        b1p *= self.beta1
        b2p *= self.beta2
