"""Adam (docs/semantics.md §5.1).

Per entry, with ``g' = g + wd * w`` per element::

    lr_t = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
    m   += (g' - m) * (1 - beta1)
    v   += (g'^2 - v) * (1 - beta2)
    w   -= m * lr_t / (sqrt(v) + eps)                                  plain
    w   -= (g' * (1 - beta1) + beta1 * m) * lr_t / (sqrt(v) + eps)    nesterov
    beta1_power *= beta1;  beta2_power *= beta2

``m`` and ``v`` start at 0; the powers start at ``beta1`` / ``beta2`` and are kept per
entry. The dump is ``SingleOptimizerDump.adam`` (field 7) with ``m`` (1), ``v`` (2),
``beta1_power`` (3) and ``beta2_power`` (4).

Choice (docs/semantics.md §12): Monolith's restore writes the dumped ``beta2_power``
into ``beta1_power`` and leaves ``beta2_power`` at its initial value. Our slots map
one to one onto the dump fields, so both powers restore correctly; the file format
is unchanged. ``use_beta1_warmup`` and ``warmup_steps`` are ignored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    float_slot,
    scalar_slot,
)
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

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        m, v = state["m"], state["v"]
        g = grads + self.weight_decay * params
        m += (g - m) * (np.float32(1) - self.beta1)
        v += (g * g - v) * (np.float32(1) - self.beta2)
        self._move(params, state, g, m, np.sqrt(v), lr)

    def _move(
        self, params: Floats, state: State, g: Floats, m: Floats, sqrt_v: Floats, lr: float
    ) -> None:
        """Move ``w`` given the new moments, then advance the powers."""
        b1p, b2p = state["beta1_power"], state["beta2_power"]
        one = np.float32(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lr_t = np.float32(lr) * np.sqrt(one - b2p) / (one - b1p)  # [m, 1]
            step = g * (one - self.beta1) + self.beta1 * m if self.use_nesterov else m
            params -= (step * lr_t) / (sqrt_v + self.epsilon)
        b1p *= self.beta1
        b2p *= self.beta2
