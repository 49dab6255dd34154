"""Monolith's probabilistic filter: admit a new id at random, more likely when frequent.

Consulted only when a table is given (``with_table=True``); ``intercept_gradient``
(no table) never filters. Nothing is stored: ``split_num`` is 0 and a save writes no
file. With ``r`` a uniform ``uint32`` draw per occurrence and ``t`` the slot threshold:

* unequal (default): admit iff ``r * t < 4294967295 * count`` (so P ~ min(1, count/t));
* equal: ``p = 1 - 0.05 ** (1 / t)`` in float32, admit iff
  ``r < 4294967295 * (1 - (1 - p) ** count)`` (95% after ``t`` occurrences).

A threshold <= 0 always admits (as Monolith for counts >= 1). The products are exact
in uint64 (Monolith's int64 arithmetic would overflow for thresholds or counts >= 2**31).
Monolith draws from a wall-clock-seeded xorshift; here a numpy generator, seedable.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ps_server.engine.filters.base import Counts, HashFilter
from ps_server.engine.filters.thresholds import ThresholdConfig, Thresholds
from ps_server.engine.types import Ids, Mask

__all__ = ["ProbabilisticFilter"]

_U32_MAX = 0xFFFFFFFF


class ProbabilisticFilter(HashFilter):
    """Random admission of missing ids, weighted by count and slot threshold.

    :param equal_probability: use the "95% after threshold occurrences" rule.
    :param thresholds: per-slot thresholds (see :class:`HashFilter`).
    :param seed: seed of the uniform uint32 source; ``None`` for OS entropy.
    """

    def __init__(
        self,
        equal_probability: bool = False,
        thresholds: ThresholdConfig | Thresholds = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(thresholds)
        self.equal_probability = bool(equal_probability)
        self._rng = np.random.default_rng(seed)

    def _filter(
        self, ids: Ids, counts: Counts, thresholds: npt.NDArray[np.int64], with_table: bool
    ) -> Mask:
        filtered = np.zeros(ids.shape[0], dtype=np.bool_)
        if not with_table:
            return filtered
        active = np.flatnonzero(thresholds > 0)
        if active.size == 0:
            return filtered
        r = self._rng.integers(0, _U32_MAX, size=active.size, dtype=np.uint64, endpoint=True)
        t = thresholds[active]
        c = counts[active].astype(np.uint64)
        if self.equal_probability:
            p = np.float32(1) - np.float32(0.05) ** (np.float32(1) / t.astype(np.float32))
            keep_prob = 1.0 - (np.float32(1) - p).astype(np.float64) ** c.astype(np.float64)
            admit = r.astype(np.float64) < float(_U32_MAX) * keep_prob
        else:
            admit = r * t.astype(np.uint64) < np.uint64(_U32_MAX) * c
        filtered[active] = ~admit
        return filtered
