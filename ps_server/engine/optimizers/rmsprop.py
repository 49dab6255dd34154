"""RMSprop, Monolith's first version (docs/semantics.md §5.1).

Per element, with ``mu = momentum``, computed in float64 and stored as float32::

    dx  = g + wd * w
    n   = mu * n + (1 - mu) * dx^2
    w  -= config.learning_rate / (sqrt(n) + 1) * dx

``n`` starts at 0. The dump is ``SingleOptimizerDump.rmsprop`` (field 11) with ``n``
(field 1).

Choice (docs/semantics.md §12): the step size is the **config's** ``learning_rate``
(default 0.01); the segment's learning rate passed to :meth:`apply` is ignored, as in
Monolith. Rounding follows Monolith's mix of widths: the new ``n`` is rounded to
float32 and its square root taken in float32; everything else is float64 until ``w``
is stored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats

Doubles = npt.NDArray[np.float64]


class RmspropOptimizer(Optimizer):
    """RMSprop v1 stepping with ``config.learning_rate`` (float64 compute).

    Slots: ``n`` [dim] (dump field 1). Dump: ``rmsprop`` (field 11).
    """

    dump_field: ClassVar[int | None] = 11

    def __init__(
        self, config: opt_pb.RmspropOptimizerConfig | opt_pb.RmspropV2OptimizerConfig, dim: int
    ) -> None:
        super().__init__(config, dim)
        # Config floats are float32 values; Monolith widens them to double.
        self.learning_rate = float(np.float32(config.learning_rate))
        self.weight_decay = float(np.float32(config.weight_decay_factor))
        self.momentum = float(np.float32(config.momentum))

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
        dx = grads.astype(np.float64) + self.weight_decay * params.astype(np.float64)
        n[...] = self._accumulate(n.astype(np.float64), dx)
        denom = (np.sqrt(n) + np.float32(1)).astype(np.float64)
        params[...] = params.astype(np.float64) - (self._step_size(lr) / denom) * dx

    def _accumulate(self, n: Doubles, dx: Doubles) -> Doubles:
        """The new accumulator, float64: ``mu * n + (1 - mu) * dx^2``."""
        return self.momentum * n + (1.0 - self.momentum) * dx * dx

    def _step_size(self, lr: float) -> float:
        """v1 ignores the segment's learning rate (QUIRK kept)."""
        return self.learning_rate
