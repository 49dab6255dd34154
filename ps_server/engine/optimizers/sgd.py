"""Plain stochastic gradient descent (reference §5.1).

``w -= lr * g`` per element. No state; the dump is an empty
``SingleOptimizerDump.sgd`` (field 2). Repeated steps on one entry compose
exactly, so :meth:`SgdOptimizer.apply_sequential` needs no waves.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    first_occurrences,
    has_duplicates,
)
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
        """One step per occurrence, in order.

        Distinct rows take one gather/scatter. With duplicates, each row's first
        occurrence is applied by gather/scatter and the remaining occurrences by
        ``np.subtract.at``, which is unbuffered and walks them in input order, so every
        occurrence is its own float32 step as Monolith makes it.
        """
        if rows.size == 0:
            return
        delta = np.float32(lr) * grads
        if not has_duplicates(rows):
            values[rows] -= delta
            return
        first = first_occurrences(rows)
        values[rows[first]] -= delta[first]
        rest = np.ones(rows.size, dtype=bool)
        rest[first] = False
        np.subtract.at(values, rows[rest], delta[rest])
