"""The rule a list of shard addresses must satisfy (protos/cluster.py), without servers."""

from __future__ import annotations

from protos.cluster import ShardIdentity, identity_mismatch

A = ["h0:1", "h1:1", "h2:1"]


def ids(*said: tuple[int, int, str]) -> list[ShardIdentity]:
    return [ShardIdentity(*s) for s in said]


def test_a_whole_cluster_in_order_passes_blank_ids_included() -> None:
    assert identity_mismatch(A, ids((0, 3, "c"), (1, 3, ""), (2, 3, "c"))) == ""


def test_order_count_and_cluster_are_each_named() -> None:
    swapped = identity_mismatch(A[:2], ids((1, 2, "c"), (0, 2, "c")))
    assert "address 0 h0:1: shard 1 of 2, cluster 'c'; expected shard 0" in swapped
    subset = identity_mismatch(A[:2], ids((0, 3, ""), (1, 3, "")))
    assert "address 1 h1:1: shard 1 of 3, no cluster id yet; expected 2 shards" in subset
    mixed = identity_mismatch(A[:2], ids((0, 2, "a"), (1, 2, "b")))
    assert "shards of 2 clusters ('a', 'b')" in mixed


def test_part_of_a_cluster() -> None:
    assert identity_mismatch(A[:1], ids((2, 3, "c")), [2]) == ""
    assert "expected shard 1" in identity_mismatch(A[:1], ids((2, 3, "c")), [1])
    disagree = identity_mismatch(A[:2], ids((0, 3, ""), (1, 2, "")), [0, 1])
    assert "disagree on the shard count (2, 3)" in disagree
    beyond = identity_mismatch(A[:1], ids((0, 3, "")), [5])
    assert "an index below 3" in beyond
