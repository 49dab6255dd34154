"""RMSprop, Monolith's second version (docs/semantics.md §5.1).

As :mod:`~ps_server.engine.optimizers.rmsprop` (float64 compute, float32 storage),
except that the accumulator is not damped on the new term and the step uses the
segment's learning rate::

    dx  = g + wd * w
    n   = mu * n + dx^2
    w  -= lr / (sqrt(n) + 1) * dx

``n`` starts at 0. The dump is ``SingleOptimizerDump.rmspropv2`` (field 12) with ``n``
(field 1).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.rmsprop import Doubles, RmspropOptimizer


class RmspropV2Optimizer(RmspropOptimizer):
    """RMSprop v2: ``n = mu*n + dx^2``, step ``lr / (sqrt(n) + 1)`` (float64 compute).

    Slots: ``n`` [dim] (dump field 1). Dump: ``rmspropv2`` (field 12).
    """

    dump_field: ClassVar[int | None] = 12

    def __init__(self, config: opt_pb.RmspropV2OptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)

    def _accumulate(self, n: Doubles, dx: Doubles) -> Doubles:
        return self.momentum * n + dx * dx

    def _step_size(self, lr: float) -> float:
        # The segment learning rate arrives as float32 in Monolith, then widens.
        return float(np.float32(lr))
