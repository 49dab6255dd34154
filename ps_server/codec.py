"""Bulk arrays on the wire: ``Tensor`` messages ⇄ numpy arrays.

A ``Tensor`` (``protos/ps_service.proto``) is raw little-endian bytes plus an
explicit shape: ids are ``int64`` of shape ``[n]``, values and gradients ``float32``
of shape ``[n, dim]`` (a flat ``[n * dim]`` is accepted where rows are expected,
as the engine does). Decoding is ``np.frombuffer`` over the message's bytes: no
copy, no Python list, and the result is read-only. Every mismatch between bytes
and shape raises :class:`~ps_server.errors.BadTensorError` naming the field, so a
malformed request never reaches the engine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from protos import ps_service_pb2 as ps_pb2
from ps_server.engine.types import Floats, Ids
from ps_server.errors import BadTensorError, DimMismatchError

__all__ = [
    "FLOAT32",
    "INT64",
    "decode_floats",
    "decode_ids",
    "encode_floats",
    "encode_ids",
]

#: Wire dtypes: little-endian whatever the host.
INT64 = np.dtype("<i8")
FLOAT32 = np.dtype("<f4")


def _shape_of(tensor: ps_pb2.Tensor, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise BadTensorError(f"{what}: shape {list(shape)} has a negative dimension")
    if not shape and tensor.data:
        raise BadTensorError(
            f"{what}: {len(tensor.data)} bytes of data but no shape (set Tensor.shape)"
        )
    return shape


def _frombuffer(tensor: ps_pb2.Tensor, shape: tuple[int, ...], dtype: np.dtype[Any],
                what: str) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    data = tensor.data
    want = count * dtype.itemsize
    if len(data) != want:
        dims = " x ".join(str(d) for d in shape) or "0"
        raise BadTensorError(
            f"{what}: {len(data)} bytes is not {dims} x {dtype.name} ({want} bytes expected; "
            f"data must be raw little-endian {dtype.name})"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def decode_ids(tensor: ps_pb2.Tensor, what: str = "ids") -> Ids:
    """``int64[n]`` from a Tensor of shape ``[n]`` (an unset Tensor is ``[0]``).

    :raises BadTensorError: shape not 1-D, or byte length != ``8 * n``.
    """
    shape = _shape_of(tensor, what)
    if not shape:
        return np.zeros(0, dtype=np.int64)
    if len(shape) != 1:
        raise BadTensorError(f"{what}: shape must be [n] (1-D int64), got {list(shape)}")
    return _frombuffer(tensor, shape, INT64, what)


def decode_floats(
    tensor: ps_pb2.Tensor,
    what: str = "values",
    *,
    rows: int | None = None,
    dim: int | None = None,
) -> Floats:
    """``float32`` array of the Tensor's shape (1-D or 2-D; unset Tensor → ``[0]``).

    :param rows: when given, a 2-D tensor must have this many rows and a 1-D one a
        multiple of it (checked before the engine sees the array).
    :param dim: when given, a 2-D tensor must have this many columns.
    :raises BadTensorError: more than 2 dimensions, or byte length != ``4 x elements``.
    :raises DimMismatchError: ``rows`` / ``dim`` do not match.
    """
    shape = _shape_of(tensor, what)
    if not shape:
        shape = (0,)
    if len(shape) > 2:
        raise BadTensorError(
            f"{what}: shape must be [n, dim] or flat [n * dim], got {list(shape)}"
        )
    arr = _frombuffer(tensor, shape, FLOAT32, what)
    if rows is not None:
        if len(shape) == 2 and shape[0] != rows:
            raise DimMismatchError(
                f"{what}: {shape[0]} rows for {rows} ids (shape {list(shape)}); "
                "send one row per id"
            )
        if len(shape) == 1 and (shape[0] % rows if rows else shape[0]):
            raise DimMismatchError(
                f"{what}: {shape[0]} floats cannot be split into one row per id ({rows} ids)"
            )
    if dim is not None and len(shape) == 2 and shape[1] != dim:
        raise DimMismatchError(f"{what}: rows have {shape[1]} floats, expected dim {dim}")
    return arr


def encode_ids(ids: Any) -> ps_pb2.Tensor:
    """Tensor of shape ``[n]`` holding ``ids`` as little-endian int64."""
    arr = np.ascontiguousarray(ids, dtype=INT64).reshape(-1)
    return ps_pb2.Tensor(data=arr.tobytes(), shape=[arr.shape[0]])


def encode_floats(values: Any) -> ps_pb2.Tensor:
    """Tensor of ``values``' shape holding little-endian float32 (row-major)."""
    arr = np.ascontiguousarray(values, dtype=FLOAT32)
    return ps_pb2.Tensor(data=arr.tobytes(), shape=list(arr.shape))
