"""ps_client._codec.take: the rows a shard gets, gathered with np.take."""

from __future__ import annotations

import numpy as np

from ps_client._codec import take


def test_take_gathers_whole_rows_of_2d_arrays() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)  # row k = [3k, 3k + 1, 3k + 2]
    got = take(rows, np.array([0, 2, 3], dtype=np.int64))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.tolist() == [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
    assert not np.shares_memory(got, rows)  # a copy: the caller may reuse its array
    assert take(rows, np.zeros(0, dtype=np.int64)).shape == (0, 3)


def test_take_of_ids_keeps_int64() -> None:
    ids = np.array([-(2**63), 5, 2**62], dtype=np.int64)
    got = take(ids, np.array([0, 2], dtype=np.int64))
    assert got.dtype == np.int64 and got.tolist() == [-(2**63), 2**62]
