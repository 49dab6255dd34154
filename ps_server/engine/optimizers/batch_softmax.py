"""Batch-softmax step-interval estimate (docs/semantics.md §5.1).

The entry's single value ``B`` tracks the smoothed number of global steps between
hits of the id; the gradient is ignored. Per entry, with ``A`` the last step seen::

    B = (1 - lr) * B + lr * float32(global_step - A)
    A = global_step

``A`` starts at 0. The dump is ``SingleOptimizerDump.batch_softmax`` (field 14) with
``global_step = A`` (field 1, int64). A lookup then gives ``B``; ``1 / max(B, 1)``
estimates the id's sampling probability per step.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, scalar_slot
from ps_server.engine.types import Floats
from ps_server.errors import ConfigError, InvalidArgumentError


class BatchSoftmaxOptimizer(Optimizer):
    """Exponential average of the step interval between hits (float32 value, int64 step).

    Slots: ``global_step`` int64 scalar (dump field 1). Dump: ``batch_softmax`` (field 14).

    :raises ConfigError: if ``dim`` is not 1.
    """

    dump_field: ClassVar[int | None] = 14

    def __init__(self, config: opt_pb.BatchSoftmaxOptimizerConfig, dim: int) -> None:
        if dim != 1:
            raise ConfigError(f"batch_softmax optimizer needs dim_size 1, got {dim}")
        super().__init__(config, dim)

    def slots(self) -> tuple[StateSlot, ...]:
        return (scalar_slot("global_step", 1, np.int64),)

    def init_state(self, n: int) -> State:
        return {"global_step": np.zeros((n, 1), np.int64)}

    def check_step(self, global_step: int) -> None:
        """:raises InvalidArgumentError: if ``global_step`` is negative."""
        if global_step < 0:
            raise InvalidArgumentError(
                f"batch_softmax needs a non-negative global_step, got {global_step}"
            )

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        """:raises InvalidArgumentError: if ``global_step`` is negative (nothing changes)."""
        if global_step < 0:
            raise InvalidArgumentError(
                f"batch_softmax needs a non-negative global_step, got {global_step}"
            )
        last = state["global_step"]
        alpha = np.float32(lr)
        interval = (np.int64(global_step) - last).astype(np.float32)
        params[...] = (np.float32(1) - alpha) * params + alpha * interval
        last[...] = global_step
