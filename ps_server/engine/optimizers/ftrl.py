"""FTRL-proximal (docs/semantics.md §5.1).

Per element, with ``n = norm``::

    n'    = n + g^2
    sigma = (sqrt(n') - sqrt(n)) / lr
    zero += g - sigma * w
    norm  = n'
    w     = lr * (s * l1 - zero) / (sqrt(norm) + beta + l2 * lr)   if |zero| > l1
          = 0                                                    otherwise

State: ``norm`` starts at ``initial_accumulator_value``, ``zero`` at 0. The dump is
``SingleOptimizerDump.ftrl`` (field 3) with ``zero`` (field 1) and ``norm`` (field 2).

Float arithmetic is Monolith's ``-mfma`` build (docs/semantics.md §5.4): ``n + g*g``
and ``g - sigma*w`` are fused multiply-adds (one rounding each), as is ``... + l2*lr`` in
the denominator; ``sqrt`` is ``sqrtf``. Checked bit for bit against Monolith's compiled
C++ (tests/data/monolith_vectors).

Choice (docs/semantics.md §12): ``s`` is 1 when ``zero``'s sign bit is set and 0
otherwise, as Monolith computes it, not the textbook sign ±1. Kept for fidelity; the
two agree when ``l1_regularization_strength`` is 0.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats


class FtrlOptimizer(Optimizer):
    """FTRL-proximal with Monolith's sign-bit form of the l1 term (float32).

    Slots: ``zero`` [dim] (dump field 1), ``norm`` [dim] (dump field 2).
    Dump: ``ftrl`` (field 3). ``warmup_steps`` is ignored.
    """

    dump_field: ClassVar[int | None] = 3

    def __init__(self, config: opt_pb.FtrlOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.initial_accumulator_value = np.float32(config.initial_accumulator_value)
        self.beta = np.float32(config.beta)
        self.l1 = np.float32(config.l1_regularization_strength)
        self.l2 = np.float32(config.l2_regularization_strength)

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("zero", self.dim, 1), float_slot("norm", self.dim, 2))

    def init_state(self, n: int) -> State:
        return {
            "zero": np.zeros((n, self.dim), np.float32),
            "norm": np.full((n, self.dim), self.initial_accumulator_value, np.float32),
        }

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        zero, norm = state["zero"], state["norm"]
        lr32 = np.float32(lr)
        # lr = 0 or a zero accumulator give inf/NaN, as in Monolith; no warning for it.
        with np.errstate(divide="ignore", invalid="ignore"):
            norm_new = fma32(grads, grads, norm)
            root_new = np.sqrt(norm_new)
            sigma = (root_new - np.sqrt(norm)) / lr32
            zero += fma32(-sigma, params, grads)
            norm[...] = norm_new
            sign_bit = np.signbit(zero).astype(np.float32)
            denom = fma32(self.l2, lr32, root_new + self.beta)
            w = lr32 * (sign_bit * self.l1 - zero) / denom
            params[...] = np.where(np.abs(zero) > self.l1, w, np.float32(0))
