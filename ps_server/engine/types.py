"""Array aliases and conversions shared by the engine.

Every engine operation takes whole batches: ``ids`` is ``int64[n]``, ``values`` and
``grads`` are ``float32[n, dim]``, ``rows`` are ``int64[n]`` positions in a table's
storage. The helpers here convert caller input (with ``protos.wire``'s conversions,
shared with the client) and raise :mod:`ps_server.errors` types with actionable
messages before anything is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from protos import wire
from ps_server.errors import BadTensorError, DimMismatchError

Ids = npt.NDArray[np.int64]
Rows = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


_ERRORS = wire.Errors(value=BadTensorError, shape=DimMismatchError)


def as_ids(ids: Any, what: str = "ids") -> Ids:
    """Convert ``ids`` to a 1-D int64 array (``protos.wire.as_ids``; other dtypes such
    as object arrays of Python ints are converted too).

    :raises DimMismatchError: not 1-D.
    :raises BadTensorError: not convertible to int64, or outside its range.
    """
    return wire.as_ids(ids, what, _ERRORS, convert_other=True)


def as_rows_matrix(values: Any, n: int, dim: int, what: str = "values") -> Floats:
    """Convert ``values`` to ``float32[n, dim]`` (``protos.wire.as_rows``).

    A flat array of ``n * dim`` elements is accepted and reshaped (Monolith's ops
    accept flat gradient buffers too).

    :raises BadTensorError: not float32-convertible.
    :raises DimMismatchError: the wrong shape.
    """
    return wire.as_rows(values, n, dim, what, _ERRORS)
