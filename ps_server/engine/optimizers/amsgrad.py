"""AMSGrad (docs/semantics.md §5.1).

Adam (see :mod:`~ps_server.engine.optimizers.adam`) with a running maximum of the
second moment in the denominator::

    vhat = max(vhat, v)            (after v's update)
    w   -= m * lr_t / (sqrt(vhat) + eps)        (nesterov: as Adam, same denominator)

State ``m = v = vhat = 0`` and per-entry ``beta1_power = beta1``, ``beta2_power = beta2``.
The dump is ``SingleOptimizerDump.amsgrad`` (field 8) with ``m`` (1), ``v`` (2),
``vhat`` (3), ``beta1_power`` (4), ``beta2_power`` (5). Monolith restores this one
correctly. ``warmup_steps`` is ignored. Arithmetic (double ``lr_t`` and step, FMAs)
as Adam's.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.adam import AdamOptimizer
from ps_server.engine.optimizers.base import State, StateSlot, float_slot, scalar_slot
from ps_server.engine.types import Floats


class AmsgradOptimizer(AdamOptimizer):
    """AMSGrad: Adam whose denominator uses ``max`` over time of ``v`` (float32).

    Slots: ``m``, ``v``, ``vhat`` [dim] (1, 2, 3), ``beta1_power`` (4),
    ``beta2_power`` (5) scalars. Dump: ``amsgrad`` (field 8).
    """

    dump_field: ClassVar[int | None] = 8

    def __init__(self, config: opt_pb.AmsgradOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)

    def slots(self) -> tuple[StateSlot, ...]:
        return (
            float_slot("m", self.dim, 1),
            float_slot("v", self.dim, 2),
            float_slot("vhat", self.dim, 3),
            scalar_slot("beta1_power", 4),
            scalar_slot("beta2_power", 5),
        )

    def init_state(self, n: int) -> State:
        state = super().init_state(n)
        state["vhat"] = np.zeros((n, self.dim), np.float32)
        return state

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        m, v, vhat = state["m"], state["v"], state["vhat"]
        g = self._moments(params, m, v, grads)
        # max(vhat, v) keeping vhat unless v is larger (a NaN v leaves vhat alone).
        vhat[...] = np.where(vhat < v, v, vhat)
        self._move(params, state, g, m, vhat, lr)
