"""Adadelta (docs/semantics.md §5.1).

Per element, with ``g' = g + wd * w`` and ``rho = averaging_ratio``::

    accum'       = rho * accum + (1 - rho) * g'^2
    u            = sqrt(accum_update + eps) / sqrt(accum' + eps) * g'
    w           -= lr * u
    accum_update = rho * accum_update + (1 - rho) * u^2
    accum        = accum'

Float arithmetic is Monolith's ``-mfma`` build (docs/semantics.md §5.4), checked bit
for bit against its compiled C++ (tests/data/monolith_vectors): ``g' = fma(wd, w, g)``;
each accumulator is ``fma(acc, rho, (x*x)*(1-rho))`` (the product ``x*x*(1-rho)`` rounds
twice, ``acc*rho`` fuses into the sum); ``w = fma(-u, lr, w)``.

Both accumulators start at 0. The dump is ``SingleOptimizerDump.adadelta`` (field 6)
with ``accum`` (field 1) and ``accum_update`` (field 2).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats


class AdadeltaOptimizer(Optimizer):
    """Adadelta with weight decay folded into the gradient (float32).

    Slots: ``accum`` [dim] (dump field 1), ``accum_update`` [dim] (dump field 2).
    Dump: ``adadelta`` (field 6). ``warmup_steps`` is ignored.
    """

    dump_field: ClassVar[int | None] = 6

    def __init__(self, config: opt_pb.AdadeltaOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.weight_decay = np.float32(config.weight_decay_factor)
        self.rho = np.float32(config.averaging_ratio)
        self.epsilon = np.float32(config.epsilon)

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("accum", self.dim, 1), float_slot("accum_update", self.dim, 2))

    def init_state(self, n: int) -> State:
        return {
            "accum": np.zeros((n, self.dim), np.float32),
            "accum_update": np.zeros((n, self.dim), np.float32),
        }

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        accum, accum_update = state["accum"], state["accum_update"]
        rho = self.rho
        one_minus_rho = np.float32(1) - rho
        g = fma32(self.weight_decay, params, grads)
        new_accum = fma32(accum, rho, g * g * one_minus_rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            update = np.sqrt(accum_update + self.epsilon) / np.sqrt(new_accum + self.epsilon) * g
        params[...] = fma32(-update, np.float32(lr), params)
        accum_update[...] = fma32(accum_update, rho, update * update * one_minus_rho)
        accum[...] = new_accum
