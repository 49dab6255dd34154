"""Plain stochastic gradient descent (docs/semantics.md §5.1).

``w -= lr * g`` per element, as one fused multiply-add (``w = fma(-lr, g, w)``, one
rounding: Monolith's ``-mfma`` build contracts it, see :mod:`ps_server.engine.fpmath`).
No state; the dump is an empty ``SingleOptimizerDump.sgd`` (field 2). Repeated
occurrences of one entry run as one chain of FMAs (:meth:`SgdOptimizer.apply_run`), so
they need no waves.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32, fma_chain
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
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
        params[...] = fma32(-np.float32(lr), grads, params)

    def _apply_rows(
        self,
        values: Floats,
        state: State,
        rows: Rows,
        grads: Floats,
        lr: float,
        global_step: int,
    ) -> None:
        """``values[rows] = fma(-lr, grads, values[rows])`` on distinct rows: the step's
        result is scattered as it comes out of :func:`fma32`, not first copied back
        into the gathered rows (one batch-sized pass less than the generic path)."""
        gathered = np.take(values, rows, axis=0)
        put_rows(values, rows, fma32(-np.float32(lr), grads, gathered))

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
        """``w_k = fma(-lr, g_k, w_{k-1})`` for every occurrence: one FMA chain per
        element (:func:`~ps_server.engine.fpmath.fma_chain`); a zero padding gradient
        leaves ``w`` unchanged."""
        params[...] = fma_chain(-np.float32(lr), grads, params)[-1]
