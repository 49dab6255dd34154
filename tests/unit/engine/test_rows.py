"""put_rows: the same result as fancy assignment, by whole rows where it can."""

from __future__ import annotations

import numpy as np

from protos.wire import row_items
from ps_server.engine.rows import put_rows


def test_matches_fancy_assignment_on_contiguous_rows() -> None:
    rng = np.random.default_rng(3)
    dst = rng.standard_normal((50, 4)).astype(np.float32)
    want = dst.copy()
    rows = np.array([7, 0, 49, 12], dtype=np.int64)
    src = rng.standard_normal((4, 4)).astype(np.float32)
    want[rows] = src
    assert row_items(dst) is not None
    put_rows(dst, rows, src)
    np.testing.assert_array_equal(dst, want)


def test_last_occurrence_lands_and_other_rows_stay() -> None:
    dst = np.zeros((5, 2), dtype=np.float32)
    put_rows(dst, np.array([3, 1, 3], dtype=np.int64),
             np.array([[1, 1], [2, 2], [3, 3]], dtype=np.float32))
    assert dst.tolist() == [[0, 0], [2, 2], [0, 0], [3, 3], [0, 0]]


def test_converts_dtype_and_flat_rows() -> None:
    dst = np.zeros((3, 2), dtype=np.int64)
    put_rows(dst, np.array([2], dtype=np.int64), np.array([5.0, 6.0]))  # flat [1 * 2]
    assert dst.tolist() == [[0, 0], [0, 0], [5, 6]]


def test_strided_and_1d_and_empty_take_the_general_path() -> None:
    table = np.zeros((4, 6), dtype=np.float32)
    segment = table[:, 2:5]  # one segment's columns: not contiguous
    assert row_items(segment) is None
    put_rows(segment, np.array([1], dtype=np.int64), np.array([[1, 2, 3]], dtype=np.float32))
    assert table[1].tolist() == [0, 0, 1, 2, 3, 0] and table.sum() == 6
    flat = np.zeros(4, dtype=np.uint32)
    assert row_items(flat) is None
    put_rows(flat, np.array([0, 3], dtype=np.int64), np.array([9, 8], dtype=np.uint32))
    assert flat.tolist() == [9, 0, 0, 8]
    put_rows(table, np.zeros(0, dtype=np.int64), np.zeros((0, 6), dtype=np.float32))
    assert table.sum() == 6
    assert row_items(np.zeros((3, 0), dtype=np.float32)) is None


def test_three_dimensional_rows() -> None:
    dst = np.zeros((3, 2, 2), dtype=np.float32)
    put_rows(dst, np.array([1], dtype=np.int64), np.ones((1, 2, 2), dtype=np.float32))
    assert dst[1].tolist() == [[1, 1], [1, 1]] and dst.sum() == 4
