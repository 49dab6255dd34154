"""Moving average (docs/semantics.md §5.1): the gradient is a target, not a slope.

Per element, with ``mu = momentum``: ``w = mu * w + (1 - mu) * g``, computed as
Monolith's ``-mfma`` build does (docs/semantics.md §5.4): ``fma(mu, w, (1 - mu) * g)``
(the first product fuses into the sum, the second rounds on its own), checked bit for
bit against its compiled C++ (tests/data/monolith_vectors).

No state and no dump: ``dump_field`` is None, so the optimizer contributes zero
``SingleOptimizerDump`` messages to an entry's ``opt.dump`` (Monolith has no
MovingAverage dump message).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats


class MovingAverageOptimizer(Optimizer):
    """``w = mu * w + (1 - mu) * g`` (float32). Slots: none. Dump: none."""

    dump_field: ClassVar[int | None] = None

    def __init__(self, config: opt_pb.MovingAverageOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.momentum = np.float32(config.momentum)

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def init_state(self, n: int) -> State:
        return {}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        mu = self.momentum
        params[...] = fma32(mu, params, (np.float32(1) - mu) * grads)
