"""Array aliases and conversions shared by the engine.

Every engine operation takes whole batches: ``ids`` is ``int64[n]``, ``values`` and
``grads`` are ``float32[n, dim]``, ``rows`` are ``int64[n]`` positions in a table's
storage. The helpers here convert caller input and raise :mod:`ps_server.errors`
types with actionable messages before anything is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ps_server.errors import BadTensorError, DimMismatchError

Ids = npt.NDArray[np.int64]
Rows = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


def as_ids(ids: Any, what: str = "ids") -> Ids:
    """Convert ``ids`` to a 1-D int64 array or raise :class:`BadTensorError`."""
    try:
        arr = np.asarray(ids)
    except Exception as e:  # ragged lists and the like
        raise BadTensorError(f"{what} must be a 1-D array of int64 ids: {e}") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DimMismatchError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.int64:
        return arr
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint64 and bool((arr > np.iinfo(np.int64).max).any()):
            raise BadTensorError(f"{what} contain values above the int64 range")
        return arr.astype(np.int64)
    if arr.dtype.kind == "b":
        raise BadTensorError(f"{what} must be integers, got booleans")
    if arr.dtype.kind == "f":
        if not bool(np.isfinite(arr).all()) or not bool((arr == np.trunc(arr)).all()):
            raise BadTensorError(f"{what} must be whole numbers, got non-integral floats")
        if bool((np.abs(arr) >= 2.0**63).any()):
            raise BadTensorError(f"{what} contain values outside the int64 range")
        return arr.astype(np.int64)
    try:
        return arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadTensorError(f"{what} are not convertible to int64 ({arr.dtype}): {e}") from e


def as_rows_matrix(values: Any, n: int, dim: int, what: str = "values") -> Floats:
    """Convert ``values`` to ``float32[n, dim]`` or raise :class:`DimMismatchError`.

    A flat array of ``n * dim`` elements is accepted and reshaped (Monolith's ops
    accept flat gradient buffers too).
    """
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise BadTensorError(f"{what} must be float32-convertible: {e}") from e
    if arr.ndim == 2 and arr.shape == (n, dim):
        return arr
    if arr.ndim == 1 and arr.size == n * dim:
        return arr.reshape(n, dim)
    raise DimMismatchError(
        f"{what} must have shape [{n}, {dim}] (one row of dim {dim} per id), got {arr.shape}"
    )
