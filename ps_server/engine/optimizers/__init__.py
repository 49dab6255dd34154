"""Optimizers of table segments (docs/semantics.md §5.1) and the factory that builds them.

:func:`optimizer_from_config` turns an ``OptimizerConfig`` into an :class:`Optimizer`
for a segment of ``dim`` columns; the contract lives in :mod:`.base`.
"""

from __future__ import annotations

from typing import Any

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.optimizers.adadelta import AdadeltaOptimizer
from ps_server.engine.optimizers.adagrad import AdagradOptimizer
from ps_server.engine.optimizers.adam import AdamOptimizer
from ps_server.engine.optimizers.amsgrad import AmsgradOptimizer
from ps_server.engine.optimizers.base import Optimizer, State, StateSlot
from ps_server.engine.optimizers.batch_softmax import BatchSoftmaxOptimizer
from ps_server.engine.optimizers.ftrl import FtrlOptimizer
from ps_server.engine.optimizers.group_adagrad import GroupAdagradOptimizer
from ps_server.engine.optimizers.momentum import MomentumOptimizer
from ps_server.engine.optimizers.moving_average import MovingAverageOptimizer
from ps_server.engine.optimizers.rmsprop import RmspropOptimizer
from ps_server.engine.optimizers.rmspropv2 import RmspropV2Optimizer
from ps_server.engine.optimizers.sgd import SgdOptimizer
from ps_server.engine.optimizers.stochastic_rounding import StochasticRoundingFloat16
from ps_server.errors import ConfigError

__all__ = [
    "AdadeltaOptimizer",
    "AdagradOptimizer",
    "AdamOptimizer",
    "AmsgradOptimizer",
    "BatchSoftmaxOptimizer",
    "FtrlOptimizer",
    "GroupAdagradOptimizer",
    "MomentumOptimizer",
    "MovingAverageOptimizer",
    "Optimizer",
    "RmspropOptimizer",
    "RmspropV2Optimizer",
    "SgdOptimizer",
    "State",
    "StateSlot",
    "StochasticRoundingFloat16",
    "optimizer_from_config",
]

#: ``OptimizerConfig.type`` member -> class built for it.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adagrad": AdagradOptimizer,
    "sgd": SgdOptimizer,
    "ftrl": FtrlOptimizer,
    "adadelta": AdadeltaOptimizer,
    "adam": AdamOptimizer,
    "amsgrad": AmsgradOptimizer,
    "momentum": MomentumOptimizer,
    "moving_average": MovingAverageOptimizer,
    "rmsprop": RmspropOptimizer,
    "rmspropv2": RmspropV2Optimizer,
    "batch_softmax": BatchSoftmaxOptimizer,
    "group_adagrad": GroupAdagradOptimizer,
}

#: Members whose configs exist but that Monolith (at commit 135c491) cannot build.
NOT_IMPLEMENTED = ("dynamic_wd_adagrad", "group_ftrl", "dc")


def optimizer_from_config(
    config: opt_pb.OptimizerConfig, dim: int, *, monolith_quirks: bool = False
) -> Optimizer:
    """Build the optimizer of one segment.

    :param config: the segment's ``OptimizerConfig``; it is not modified.
    :param dim: the segment's width; it replaces the sub-config's ``dim_size`` (the
        optimizer keeps a copy of the sub-config with ``dim_size = dim``).
    :param monolith_quirks: reproduce Monolith's C++ where we deliberately differ
        (docs/semantics.md §12); among optimizers only Group AdaGrad's ``0/0`` depends
        on it (stochastic rounding and Adam's restore are the table's, see
        :class:`~ps_server.engine.entry_layout.EntryLayout`).
    :returns: the optimizer, wrapped in :class:`StochasticRoundingFloat16` when
        ``config.stochastic_rounding_float16`` is set.
    :raises ConfigError: no ``type`` set, a type Monolith does not implement
        (``dynamic_wd_adagrad``, ``group_ftrl``, ``dc``), ``dim < 1``, or a
        type-specific problem (``batch_softmax`` needs ``dim`` 1).
    """
    which = config.WhichOneof("type")
    if which is None:
        raise ConfigError("optimizer config has no type set; set one of: " + ", ".join(OPTIMIZERS))
    if which in NOT_IMPLEMENTED:
        raise ConfigError(
            f"optimizer {which!r} is not implemented (Monolith cannot build it either); "
            "use one of: " + ", ".join(OPTIMIZERS)
        )
    if dim < 1:
        raise ConfigError(f"optimizer {which!r} needs a positive dim_size, got {dim}")
    sub: Any = type(getattr(config, which))()
    sub.CopyFrom(getattr(config, which))
    sub.dim_size = dim
    optimizer = (
        GroupAdagradOptimizer(sub, dim, zero_norm_nan=True)
        if which == "group_adagrad" and monolith_quirks
        else OPTIMIZERS[which](sub, dim)
    )
    if config.stochastic_rounding_float16:
        optimizer = StochasticRoundingFloat16(optimizer)
    return optimizer
