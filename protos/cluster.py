"""The rule a list of shard addresses must satisfy, read by ``PsClient`` and ``ps-admin``.

Every shard knows its identity: its index, the shard count and the id of its cluster
(``ShardInfo`` / ``StatsResponse``; the id is ``""`` until ``--cluster_id`` or a
``JoinCluster`` gives it one). A list of addresses is a cluster when address ``k``
reports index ``indexes[k]`` (``k`` itself for a whole cluster), every shard reports
the same count (the list's length for a whole cluster) and every non-empty id is the
same. :func:`identity_mismatch` says what is wrong, listing what each address said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ShardIdentity", "identity_mismatch"]


@dataclass(frozen=True)
class ShardIdentity:
    """What one address said it is: shard ``shard_index`` of ``num_shards`` of
    cluster ``cluster_id`` (``""`` = not named yet)."""

    shard_index: int
    num_shards: int
    cluster_id: str

    def __str__(self) -> str:
        cluster = f"cluster {self.cluster_id!r}" if self.cluster_id else "no cluster id yet"
        return f"shard {self.shard_index} of {self.num_shards}, {cluster}"


def identity_mismatch(
    addresses: Sequence[str],
    said: Sequence[ShardIdentity],
    indexes: Sequence[int] | None = None,
) -> str:
    """What keeps ``addresses`` from being the shards ``indexes`` of one cluster.

    :param said: each address's identity, in the order of ``addresses``.
    :param indexes: the shard index each address must have; None = the whole
        cluster in index order (``0, 1, ...``, and the count must be the list's
        length).
    :returns: ``""`` when they are; otherwise a message with one line per address
        (what it said and, where it differs, what was expected).
    """
    whole = indexes is None
    wanted = list(range(len(addresses))) if indexes is None else list(indexes)
    counts = sorted({s.num_shards for s in said})
    count = len(addresses) if whole else (counts[0] if len(counts) == 1 else None)
    clusters = sorted({s.cluster_id for s in said} - {""})
    lines = []
    wrong = False
    for k, (address, identity) in enumerate(zip(addresses, said, strict=True)):
        expected = []
        if identity.shard_index != wanted[k]:
            expected.append(f"shard {wanted[k]}")
        if count is not None and identity.num_shards != count:
            expected.append(f"{count} shards")
        if not whole and count is not None and not 0 <= wanted[k] < count:
            expected.append(f"an index below {count}")
        wrong |= bool(expected)
        note = f"; expected {', '.join(expected)}" if expected else ""
        lines.append(f"  address {k} {address}: {identity}{note}")
    problems = []
    if wrong:
        problems.append("addresses in the wrong order or of another cluster" if whole
                        else "addresses that are not the shards --shards names")
    if count is None:
        problems.append(f"shards that disagree on the shard count ({', '.join(map(str, counts))})")
    if len(clusters) > 1:
        problems.append(f"shards of {len(clusters)} clusters "
                        f"({', '.join(repr(c) for c in clusters)})")
    if not problems:
        return ""
    what = (f"every shard of one cluster, shard 0 first ({len(addresses)} addresses given)"
            if whole else "shards of one cluster")
    return (f"the addresses are not {what}: {'; '.join(problems)}. Each address said:\n"
            + "\n".join(lines))
