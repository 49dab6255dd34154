"""Monolith's probabilistic filter: admit a new id at random, more likely when frequent.

Consulted only when a table is given (``with_table=True``) and lacks the id (the table
only asks about missing ids); ``intercept_gradient`` (no table) never filters and
draws nothing. Nothing is stored: ``split_num`` is 0 and a save writes no file. Every
occurrence asked about takes one draw ``r`` (uniform ``uint32``) in order, whatever
its threshold ``t`` (as Monolith, so mixed-threshold batches keep the stream aligned):

* unequal (default): admit iff ``r * t < 4294967295 * count`` (so P ~ min(1, count/t));
* equal: ``p = 1 - powf(0.05f, 1.f / t)`` in float32, admit iff
  ``double(r) < 4294967295.0 * (1 - pow(double(1 - p), double(count)))`` (95% after
  ``t`` occurrences), the float/double mix of Monolith's compiled code.

A threshold <= 0 always admits (Monolith does for the unequal rule; its equal rule
would filter ``r == 4294967295`` at 0 and everything below 0, which we do not copy).
The unequal products are exact in uint64 (Monolith's int64 arithmetic would overflow
for counts >= 2**31).

Randomness is Monolith's own stream (:class:`~ps_server.engine.filters.xorshift.
XorShift128Plus`): ``seed`` is the value its ``srand(time(0))`` would get, so a filter
built with ``seed=T`` draws exactly what Monolith draws in a fresh thread at wall-clock
second ``T``. Without a seed the stream starts from an OS-entropy seed (unrepeatable,
like Monolith's clock seed). Monolith shares one generator per thread among all its
filters; we keep one per filter, so a filter's stream depends only on its own calls.
"""


from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ps_server.engine.filters.base import Counts, HashFilter
from ps_server.engine.filters.thresholds import ThresholdConfig, Thresholds
from ps_server.engine.filters.xorshift import XorShift128Plus
from ps_server.engine.types import Ids, Mask

__all__ = ["ProbabilisticFilter"]

_U32_MAX = 0xFFFFFFFF
_U32_MAX_F64 = float(_U32_MAX)


class ProbabilisticFilter(HashFilter):
    """Random admission of missing ids, weighted by count and slot threshold.

    :param equal_probability: use the "95% after threshold occurrences" rule.
    :param thresholds: per-slot thresholds (see :class:`HashFilter`).
    :param seed: Monolith's ``srand`` seed (its ``time(0)``), modulo 2**32: equal seeds
        give equal streams, the one Monolith draws at that second; ``None`` (default)
        seeds from OS entropy.
    """

    def __init__(
        self,
        equal_probability: bool = False,
        thresholds: ThresholdConfig | Thresholds = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(thresholds)
        self.equal_probability = bool(equal_probability)
        self._rng = XorShift128Plus(seed)

    @property
    def seed(self) -> int:
        """The ``srand`` seed the stream started from (drawn from OS entropy if not given)."""
        assert self._rng.seed is not None
        return self._rng.seed

    def _filter(
        self, ids: Ids, counts: Counts, thresholds: npt.NDArray[np.int64], with_table: bool
    ) -> Mask:
        n = ids.shape[0]
        if not with_table:
            return np.zeros(n, dtype=np.bool_)
        r = self._rng.rand32(n)
        active = thresholds > 0
        if self.equal_probability:
            admit = r.astype(np.float64) < _U32_MAX_F64 * (1.0 - _equal_base(thresholds) ** counts)
        else:
            t = np.where(active, thresholds, 0).astype(np.uint64)
            admit = r.astype(np.uint64) * t < np.uint64(_U32_MAX) * counts.astype(np.uint64)
        return ~(admit | ~active)


def _equal_base(thresholds: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """``double(1.f - p)`` with ``p = 1.f - powf(0.05f, 1.f / float(t))`` per threshold.

    ``powf`` is evaluated in double and rounded once to float32 (how glibc's ``powf``
    works, and independent of numpy's float32 ``power`` kernels). Thresholds <= 0 give
    1.0 (their answer is overridden anyway).
    """
    t = np.maximum(thresholds, 1).astype(np.float32)
    inv = (np.float32(1) / t).astype(np.float64)
    powf = np.power(np.float64(np.float32(0.05)), inv).astype(np.float32)
    p = np.float32(1) - powf
    return (np.float32(1) - p).astype(np.float64)
