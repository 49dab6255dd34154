"""numpy arrays <-> ``monolith_ps.Tensor`` (raw little-endian bytes plus a shape)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protos import ps_service_pb2 as pb
from ps_client.errors import PsInternal

_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")


def encode_ids(ids: npt.NDArray[np.int64]) -> pb.Tensor:
    """``int64[n]`` as a Tensor of shape ``[n]``."""
    return pb.Tensor(data=ids.astype(_I64, copy=False).tobytes(), shape=[ids.shape[0]])


def encode_floats(values: npt.NDArray[np.float32]) -> pb.Tensor:
    """``float32`` of any shape as a Tensor of that shape (row-major)."""
    return pb.Tensor(data=values.astype(_F32, copy=False).tobytes(), shape=list(values.shape))


def decode_floats(tensor: pb.Tensor, count: int, what: str) -> npt.NDArray[np.float32]:
    """The ``float32[count]`` payload of ``tensor`` (flat, read-only view of the bytes).

    :raises PsInternal: the shard sent a different number of floats.
    """
    if len(tensor.data) != count * 4:
        raise PsInternal(
            f"{what}: expected {count} float32 values ({count * 4} bytes), "
            f"the shard sent {len(tensor.data)} bytes"
        )
    return np.frombuffer(tensor.data, dtype=_F32).astype(np.float32, copy=False)


def decode_rows(tensor: pb.Tensor, n: int, dim: int, what: str) -> npt.NDArray[np.float32]:
    """The ``float32[n, dim]`` payload of ``tensor``."""
    return decode_floats(tensor, n * dim, what).reshape(n, dim)
