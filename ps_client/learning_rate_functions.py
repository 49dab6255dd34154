"""Learning-rate schedules for hash-table segments (docs/semantics.md §9, §4.4).

A table gets one learning rate per segment. Each may be a number, a zero-argument
callable (``lambda: 0.1``) or a callable of the global step such as
:class:`PolynomialDecay`; :func:`evaluate_learning_rates` turns such a list into the
``float32[segments]`` vector the shards use for one ``apply_gradients``.

``str()`` of a :class:`LearningRateFunction` lists its parameters in a fixed format;
the client uses it (with the table config) to decide whether two table definitions
are the same, so it must stay stable.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ps_client.errors import PsInvalidArgument

LearningRate = float | Callable[[], float] | Callable[[int], float]


class LearningRateFunction(abc.ABC):
    """A learning rate that depends on the global step.

    Subclasses keep their constructor parameters, and only those, as instance
    attributes: :meth:`__str__` lists every attribute.
    """

    @abc.abstractmethod
    def __call__(self, global_step: int = 0) -> float:
        """The learning rate at ``global_step``."""

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in sorted(vars(self).items()))
        return f'LearningRateFunction("{type(self).__name__}",Params:{params})'


class PolynomialDecay(LearningRateFunction):
    """Polynomial decay from ``initial_learning_rate`` to ``end_learning_rate``.

    With ``s`` the global step, all in float32:

    * not ``cycle``: ``s' = min(s, decay_steps)``, ``D = decay_steps``;
    * ``cycle``: ``s' = s``, ``D = decay_steps * max(1, ceil(s / decay_steps))``
      (``1`` when ``s == 0``), so the schedule restarts every ``decay_steps``;
    * ``lr = (initial - end) * (1 - s'/D) ** power + end``.

    Call it with the global step; called with no argument it evaluates step 0 (the
    initial learning rate), since there is no implicit global step outside a trainer.

    :param initial_learning_rate: rate at step 0.
    :param decay_steps: steps to reach ``end_learning_rate``; must be > 0.
    :param end_learning_rate: rate from ``decay_steps`` on (without ``cycle``).
    :param power: exponent of the decay; 1.0 is linear.
    :param cycle: restart the decay after each ``decay_steps``.
    :param name: optional label, shown by ``str()`` only.
    :raises ValueError: ``decay_steps`` is not positive.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str | None = None,
    ) -> None:
        if not decay_steps > 0:
            raise ValueError(f"PolynomialDecay decay_steps must be > 0, got {decay_steps}")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name

    def __call__(self, global_step: int = 0) -> float:
        f32 = np.float32
        s = f32(global_step)
        decay = f32(self.decay_steps)
        if self.cycle:
            multiplier = f32(1) if s == 0 else np.ceil(s / decay)
            decay = decay * multiplier
        else:
            s = min(s, decay)
        initial = f32(self.initial_learning_rate)
        end = f32(self.end_learning_rate)
        with np.errstate(all="ignore"):  # a negative cycling step divides by zero, as TF
            lr = (initial - end) * (f32(1) - s / decay) ** f32(self.power) + end
        return float(lr)


def evaluate_learning_rates(
    fns: Sequence[LearningRate], global_step: int
) -> npt.NDArray[np.float32]:
    """Evaluate one learning rate per segment at ``global_step``.

    Each item is a real number (used as is), a callable that accepts one positional
    argument (called with ``global_step``; this covers :class:`PolynomialDecay` and
    ``lambda step: ...``), or a callable of no argument (called with none).

    :returns: ``float32[len(fns)]``.
    :raises TypeError: an item is neither a number nor such a callable, or a callable
        returns something that is not a real number.
    :raises PsInvalidArgument: a rate beyond float32's range (NaN and infinity pass: the
        shards refuse them unless started with ``--allow_non_finite``).
    """
    out = np.empty(len(fns), dtype=np.float32)
    for i, fn in enumerate(fns):
        value = _evaluate_one(fn, global_step) if callable(fn) else fn
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"learning rate #{i} must be a number or a callable returning one, got {value!r}"
            )
        with np.errstate(over="ignore"):
            out[i] = value
        if np.isinf(out[i]) and math.isfinite(value):
            raise PsInvalidArgument(
                f"learning rate #{i} is {value!r} at global_step {global_step}, beyond "
                "float32's range: it would reach the shards as infinity"
            )
    return out


def _evaluate_one(fn: Callable[..., Any], global_step: int) -> Any:
    if isinstance(fn, LearningRateFunction):
        return fn(global_step)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: treat as fn()
        return fn()
    try:
        sig.bind(global_step)
    except TypeError:
        try:
            sig.bind()
        except TypeError:
            raise TypeError(
                f"learning-rate callable {fn!r} must take no argument or the global step"
            ) from None
        return fn()
    return fn(global_step)
