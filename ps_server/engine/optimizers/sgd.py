"""Plain stochastic gradient descent (docs/semantics.md §5.1).

``w -= lr * g`` per element. No state; the dump is an empty
``SingleOptimizerDump.sgd`` (field 2). Repeated occurrences of one entry run as one
sequential float32 accumulate (:meth:`SgdOptimizer.apply_run`), so they need no waves.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    sequence_ends,
)
from ps_server.engine.types import Floats


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

    def has_run_form(self) -> bool:
        return True

    def apply_run(
        self,
        params: Floats,
        state: State,
        grads: Floats,
        ends: npt.NDArray[np.intp],
        lr: float,
        global_step: int,
    ) -> None:
        """``w_k = w_{k-1} - lr * g_k`` for every occurrence: the deltas are independent
        and ``np.subtract.accumulate`` runs the float32 subtractions strictly in order,
        so each occurrence is its own step as in Monolith."""
        seq = np.empty((grads.shape[0] + 1, *params.shape), dtype=np.float32)
        seq[0] = params
        np.multiply(np.float32(lr), grads, out=seq[1:])
        np.subtract.accumulate(seq, axis=0, out=seq)
        params[...] = sequence_ends(seq, ends)
