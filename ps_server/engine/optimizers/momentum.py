"""Momentum (docs/semantics.md §5.1).

Per element, with ``mu = momentum``::

    dx    = lr * (g + wd * w)
    n_new = mu * n - dx
    w    += n_new                                   plain
    w    += -mu * n + (1 + mu) * n_new              nesterov (n = the old value)
    n     = n_new

Float arithmetic is Monolith's ``-mfma`` build (docs/semantics.md §5.4), checked bit
for bit against its compiled C++ (tests/data/monolith_vectors): ``g + wd*w`` is one
fused multiply-add, ``n_new = fma(-lr, g + wd*w, mu*n)`` (the ``lr`` product fuses into
the subtraction, ``mu*n`` rounds on its own) and, nesterov,
``w += fma(1 + mu, n_new, -mu*n)``.

``n`` starts at 0. The dump is ``SingleOptimizerDump.momentum`` (field 9) with ``n``
(field 1). ``warmup_steps`` is ignored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats


class MomentumOptimizer(Optimizer):
    """Heavy-ball or Nesterov momentum (float32).

    Slots: ``n`` [dim] (dump field 1). Dump: ``momentum`` (field 9).
    """

    dump_field: ClassVar[int | None] = 9

    def __init__(self, config: opt_pb.MomentumOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.weight_decay = np.float32(config.weight_decay_factor)
        self.momentum = np.float32(config.momentum)
        self.use_nesterov = bool(config.use_nesterov)

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("n", self.dim, 1),)

    def init_state(self, n: int) -> State:
        return {"n": np.zeros((n, self.dim), np.float32)}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        n = state["n"]
        mu = self.momentum
        decayed = fma32(self.weight_decay, params, grads)
        mu_n = mu * n
        n_new = fma32(-np.float32(lr), decayed, mu_n)
        if self.use_nesterov:
            params += fma32(np.float32(1) + mu, n_new, -mu_n)
        else:
            params += n_new
        n[...] = n_new
