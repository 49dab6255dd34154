"""The filter used when filtering is disabled: admits everything, stores nothing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ps_server.engine.filters.base import Counts, HashFilter
from ps_server.engine.types import Ids, Mask

__all__ = ["DummyHashFilter"]


class DummyHashFilter(HashFilter):
    """Never filters; ``split_num`` 0, so save writes nothing and restore is a no-op."""

    def _filter(
        self, ids: Ids, counts: Counts, thresholds: npt.NDArray[np.int64], with_table: bool
    ) -> Mask:
        return np.zeros(ids.shape[0], dtype=np.bool_)
