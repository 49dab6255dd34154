"""Group AdaGrad: one accumulator per entry and a group-lasso (l2) shrink (docs/semantics.md §5.1).

Per entry, with ``g'_i = g_i + wd * w_i``::

    G    += max_i g'_i^2
    eta   = lr / (beta + sqrt(G))
    z_i   = g'_i - w_i / eta
    Z     = ||z||_2
    w     = 0                              if Z < l2
    w_i   = -eta * (Z - l2) / Z * z_i      otherwise

Float arithmetic is Monolith's ``-mfma`` build (docs/semantics.md §5.4), checked bit
for bit against its compiled C++ (tests/data/monolith_vectors): ``g' = fma(wd, w, g)``
and ``Z^2`` is summed left to right in float32 with one fused multiply-add per element
(``s = fma(z_i, z_i, s)``), a column at a time over the batch.

``G`` starts at ``initial_accumulator_value``. The dump is
``SingleOptimizerDump.group_adagrad`` (field 15) with the scalar ``grad_square_sum``
(field 1).

Choice (docs/semantics.md §5.1 records it): when ``Z`` is 0 (zero weights and a zero gradient)
Monolith divides 0 by 0 and stores NaN; we store 0, the limit of the formula. With
``zero_norm_nan`` (a table's ``monolith_quirks``) we store Monolith's NaN. Every
other case, NaN inputs included, follows the formula. ``warmup_steps`` is ignored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, scalar_slot
from ps_server.engine.types import Floats


class GroupAdagradOptimizer(Optimizer):
    """Group AdaGrad with a per-entry scalar accumulator (float32).

    Slots: ``grad_square_sum`` scalar (dump field 1). Dump: ``group_adagrad`` (field 15).

    :param zero_norm_nan: a row with ``Z = 0`` (and ``l2 = 0``; a positive ``l2``
        zeroes it anyway) gets Monolith's ``0/0``, NaN, instead of 0.
    """

    dump_field: ClassVar[int | None] = 15

    def __init__(
        self, config: opt_pb.GroupAdaGradOptimizerConfig, dim: int, *, zero_norm_nan: bool = False
    ) -> None:
        super().__init__(config, dim)
        self.zero_norm_nan = zero_norm_nan
        self.initial_accumulator_value = np.float32(config.initial_accumulator_value)
        self.beta = np.float32(config.beta)
        self.l2 = np.float32(config.l2_regularization_strength)
        self.weight_decay = np.float32(config.weight_decay_factor)

    def slots(self) -> tuple[StateSlot, ...]:
        return (scalar_slot("grad_square_sum", 1),)

    def init_state(self, n: int) -> State:
        return {"grad_square_sum": np.full((n, 1), self.initial_accumulator_value, np.float32)}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        acc = state["grad_square_sum"]  # [m, 1]
        g = fma32(self.weight_decay, params, grads)
        sq = g * g
        # Monolith's running max starts at 0 and skips NaN squares.
        acc += np.fmax.reduce(sq, axis=1, keepdims=True, initial=np.float32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            eta = np.float32(lr) / (self.beta + np.sqrt(acc))  # [m, 1]
            z = g - params / eta
            norm = np.sqrt(_sequential_fma_square_sum(z))
            coeff = -eta * (norm - self.l2) / norm
            shrunk = norm < self.l2
            if not self.zero_norm_nan:
                shrunk |= norm == 0
            params[...] = np.where(shrunk, np.float32(0), coeff * z)


def _sequential_fma_square_sum(z: Floats) -> Floats:
    """``s = 0; for i: s = fma(z_i, z_i, s)`` per row (float32, left to right), as
    Monolith's loop compiles with ``-mfma``; vectorized over rows. Returns ``[m, 1]``."""
    cols = np.ascontiguousarray(z.T)  # [dim, m]: one contiguous column per step
    s = np.zeros(z.shape[0], dtype=np.float32)
    for col in cols:
        s = fma32(col, col, s)
    return s[:, None]
