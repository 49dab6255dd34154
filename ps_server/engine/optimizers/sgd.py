"""Plain stochastic gradient descent (reference §5.1).

``w -= lr * g`` per element. No state; the dump is an empty
``SingleOptimizerDump.sgd`` (field 2). Repeated steps on one entry compose
exactly, so :meth:`SgdOptimizer.apply_sequential` does every occurrence in one
unbuffered pass instead of waves.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot
from ps_server.engine.types import Floats, Rows


class SgdOptimizer(Optimizer):
    """``w -= lr * g`` (float32). Slots: none. Dump: ``sgd {}`` (field 2).

    The config's ``learning_rate`` and ``warmup_steps`` are ignored; ``lr`` is the
    segment's learning rate.
    """

    dump_field: ClassVar[int | None] = 2

    def __init__(self, config: opt_pb.SgdOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def init_state(self, n: int) -> State:
        return {}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        params -= np.float32(lr) * grads

    def apply_sequential(
        self,
        values: Floats,
        state: State,
        rows: Rows,
        grads: Floats,
        lr: float,
        global_step: int,
    ) -> None:
        """One step per occurrence, in order: ``np.subtract.at`` is unbuffered, so a
        repeated row is decremented once per occurrence in float32, like separate steps."""
        if rows.size == 0:
            return
        np.subtract.at(values, rows, np.float32(lr) * grads)
