"""Plain stochastic gradient descent (docs/semantics.md §5.1).

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
    has_duplicates,
    repeated_positions,
)
from ps_server.engine.rows import put_rows
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

        All rows take one gather/scatter. Rows that repeat are then put back as they
        were and stepped through ``np.subtract.at``, which is unbuffered and walks
        their occurrences in input order, so every occurrence is its own float32
        step as in Monolith.
        """
        if rows.size == 0:
            return
        delta = np.float32(lr) * grads
        repeated = repeated_positions(rows) if has_duplicates(rows) else None
        if repeated is not None:
            repeated_rows = np.unique(rows[repeated])
            before = np.take(values, repeated_rows, axis=0)
        # np.take moves whole rows, several times faster than fancy indexing; the
        # scatter leaves each repeated row with one occurrence applied, undone below.
        current = np.take(values, rows, axis=0)
        current -= delta
        put_rows(values, rows, current)
        if repeated is not None:
            put_rows(values, repeated_rows, before)
            np.subtract.at(values, rows[repeated], delta[repeated])
