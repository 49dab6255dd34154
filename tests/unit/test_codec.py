"""ps_server.codec: Tensor bytes ⇄ numpy, with byte-length and shape checks."""

from __future__ import annotations

import numpy as np
import pytest

from protos import ps_service_pb2 as pb
from ps_server import codec
from ps_server.errors import BadTensorError, DimMismatchError


def test_ids_round_trip_little_endian() -> None:
    t = codec.encode_ids([1, -2, 2**62])
    assert list(t.shape) == [3]
    # Little-endian int64 whatever the host: -2 is fe ff ff ff ff ff ff ff.
    assert t.data[8:16] == bytes.fromhex("feffffffffffffff")
    ids = codec.decode_ids(t)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [1, -2, 2**62])
    assert not ids.flags.writeable  # a view of the message bytes, not a copy


def test_floats_round_trip_keeps_shape() -> None:
    rows = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    t = codec.encode_floats(rows)
    assert list(t.shape) == [2, 2]
    assert t.data[:4] == np.float32(1.5).tobytes()  # 00 00 c0 3f
    got = codec.decode_floats(t, rows=2, dim=2)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows)


def test_unset_tensor_is_empty() -> None:
    assert codec.decode_ids(pb.Tensor()).shape == (0,)
    assert codec.decode_floats(pb.Tensor()).shape == (0,)


def test_byte_length_must_match_shape() -> None:
    with pytest.raises(BadTensorError, match=r"ids: 20 bytes is not 3 x int64 \(24 bytes"):
        codec.decode_ids(pb.Tensor(data=b"\0" * 20, shape=[3]))
    with pytest.raises(BadTensorError, match=r"grads: 12 bytes is not 2 x 2 x float32"):
        codec.decode_floats(pb.Tensor(data=b"\0" * 12, shape=[2, 2]), "grads")


def test_shape_errors() -> None:
    with pytest.raises(BadTensorError, match="no shape"):
        codec.decode_ids(pb.Tensor(data=b"\0" * 8))
    with pytest.raises(BadTensorError, match="1-D"):
        codec.decode_ids(pb.Tensor(data=b"\0" * 16, shape=[1, 2]))
    with pytest.raises(BadTensorError, match="negative"):
        codec.decode_ids(pb.Tensor(shape=[-1]))
    with pytest.raises(BadTensorError, match=r"\[n, dim\]"):
        codec.decode_floats(pb.Tensor(data=b"", shape=[0, 1, 1]))


def test_rows_and_dim_checks() -> None:
    t = codec.encode_floats(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(DimMismatchError, match="3 rows for 4 ids"):
        codec.decode_floats(t, rows=4)
    with pytest.raises(DimMismatchError, match="expected dim 5"):
        codec.decode_floats(t, dim=5)
    flat = codec.encode_floats(np.zeros(6, dtype=np.float32))
    assert codec.decode_floats(flat, rows=3).shape == (6,)  # flat n * dim is accepted
    with pytest.raises(DimMismatchError, match="one row per id"):
        codec.decode_floats(flat, rows=4)
