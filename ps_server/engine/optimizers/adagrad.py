"""Adagrad (docs/semantics.md §5.1).

Per element, with ``g' = g + wd * w``::

    norm += g'^2
    w    -= (lr / sqrt(norm)) * g'

State ``norm`` starts at ``initial_accumulator_value``; the dump is
``SingleOptimizerDump.adagrad`` (field 1) with ``norm`` (field 1, repeated float).

Choice (docs/semantics.md §12): Monolith's AVX build moves ``w`` with the raw ``g``
instead of ``g'`` for every full block of 8 dims. We use ``g'`` everywhere, as the
scalar path does; both agree whenever ``weight_decay_factor`` is 0.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot, float_slot
from ps_server.engine.types import Floats


class AdagradOptimizer(Optimizer):
    """``norm += g'^2; w -= lr / sqrt(norm) * g'`` with ``g' = g + wd*w`` (float32).

    Slots: ``norm`` [dim] (dump field 1). Dump: ``adagrad`` (field 1).
    ``hessian_compression_times`` and ``warmup_steps`` are ignored.
    """

    dump_field: ClassVar[int | None] = 1

    def __init__(self, config: opt_pb.AdagradOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.initial_accumulator_value = np.float32(config.initial_accumulator_value)
        self.weight_decay = np.float32(config.weight_decay_factor)

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("norm", self.dim, 1),)

    def init_state(self, n: int) -> State:
        return {"norm": np.full((n, self.dim), self.initial_accumulator_value, np.float32)}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        norm = state["norm"]
        g = grads + self.weight_decay * params if self.weight_decay else grads
        step = g * g
        norm += step
        # A zero accumulator gives inf/NaN, as in Monolith; no warning for it.
        with np.errstate(divide="ignore", invalid="ignore"):
            np.sqrt(norm, out=step)
            np.divide(np.float32(lr), step, out=step)
        step *= g
        params -= step
