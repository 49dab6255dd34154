"""numpy arrays <-> ``monolith_ps.Tensor`` (raw little-endian bytes plus a shape).

Tensors are written *into* the request's own sub-message (``with_tensors``): passing
a sub-message to a constructor (``Request(ids=Tensor(...))``) makes upb copy it
through a merge, which costs milliseconds per megabyte. A decoded answer's
``data`` is read once: every read of a ``bytes`` field copies it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from protos import ps_service_pb2 as pb
from ps_client.errors import PsInternal

M = TypeVar("M")

_WIRE: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.int64): np.dtype("<i8"),
    np.dtype(np.float32): np.dtype("<f4"),
}
_F32 = np.dtype("<f4")


def with_tensors(msg: M, **tensors: npt.NDArray[Any]) -> M:
    """Fill ``msg``'s Tensor fields named by the keywords; returns ``msg``.

    Arrays must be ``int64`` (ids) or ``float32`` (values, grads); shape is kept.
    """
    for field, arr in tensors.items():
        tensor: pb.Tensor = getattr(msg, field)
        tensor.data = arr.astype(_WIRE[arr.dtype], copy=False).tobytes()
        tensor.shape[:] = arr.shape
    return msg


def decode_floats(tensor: pb.Tensor, count: int, what: str) -> npt.NDArray[np.float32]:
    """The ``float32[count]`` payload of ``tensor`` (flat, read-only view of the bytes).

    :raises PsInternal: the shard sent a different number of floats.
    """
    data = tensor.data
    if len(data) != count * 4:
        raise PsInternal(
            f"{what}: expected {count} float32 values ({count * 4} bytes), "
            f"the shard sent {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=_F32).astype(np.float32, copy=False)


def decode_rows(tensor: pb.Tensor, n: int, dim: int, what: str) -> npt.NDArray[np.float32]:
    """The ``float32[n, dim]`` payload of ``tensor``."""
    return decode_floats(tensor, n * dim, what).reshape(n, dim)
