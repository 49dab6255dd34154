"""The client's cluster check: are the addresses exactly one cluster's shards, in order?

:func:`connect` runs when a client connects (``PsClient`` at construction,
``AsyncPsClient`` before its first operation or at ``await client.connect()``):

1. ``GetShardInfo`` on every address; address ``i`` must report shard index ``i``,
   every shard a count equal to the number of addresses, and every shard that has a
   cluster id the same one (:func:`protos.cluster.identity_mismatch`). Otherwise
   :class:`~ps_client.errors.PsFailedPrecondition` lists what each address said:
   reading or writing through such a list would read zeros for existing ids and write
   rows to shards that do not own them.
2. Shards without a cluster id (a fresh cluster, or a shard restarted without
   ``--cluster_id``) are given one with ``JoinCluster``: the id the others have, or a
   new random one when none has. Shard 0 is asked first, so of two clients naming a
   fresh cluster at once one wins there; the other is refused, reads the identities
   again (once) and adopts the winner's id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from protos import ps_service_pb2 as pb
from protos.cluster import ShardIdentity, identity_mismatch
from ps_client.errors import PsFailedPrecondition
from ps_client.transport import Transport

__all__ = ["connect"]


async def _identities(transport: Transport) -> list[ShardIdentity]:
    infos: Sequence[pb.ShardInfo] = await transport.each("GetShardInfo", pb.ShardInfoRequest())
    return [ShardIdentity(i.shard_index, i.num_shards, i.cluster_id) for i in infos]


def _check(addresses: Sequence[str], said: Sequence[ShardIdentity]) -> str:
    """The common cluster id ("" = none yet); raises when ``said`` is no cluster."""
    problem = identity_mismatch(addresses, said)
    if problem:
        raise PsFailedPrecondition(
            f"{problem}\nlist every shard of one cluster in index order, or pass "
            "check_cluster=False to skip this check"
        )
    return next((s.cluster_id for s in said if s.cluster_id), "")


async def _join(transport: Transport, shards: Sequence[int], cluster_id: str) -> None:
    n = transport.num_shards
    requests: list[pb.JoinClusterRequest | None] = [None] * n
    for s in shards:
        requests[s] = pb.JoinClusterRequest(cluster_id=cluster_id, shard_index=s, num_shards=n)
    if 0 in shards:  # shard 0 decides the id of a fresh cluster
        await transport.call(0, "JoinCluster", requests[0])
        requests[0] = None
    if any(r is not None for r in requests):
        await transport.each("JoinCluster", requests)


async def connect(transport: Transport) -> str:
    """Check that the transport's addresses are one cluster's shards in index order and
    give the shards that have none the cluster's id.

    :returns: the cluster id.
    :raises PsFailedPrecondition: the addresses are not that (the message lists what
        each address said and what was expected), or a shard refused its id twice.
    :raises PsError: a shard could not be asked (e.g. ``PsUnavailable``).
    """
    for attempt in (1, 2):
        said = await _identities(transport)
        cluster_id = _check(transport.addresses, said)
        blank = [s for s, identity in enumerate(said) if not identity.cluster_id]
        if not blank:
            return cluster_id
        cluster_id = cluster_id or uuid.uuid4().hex
        try:
            await _join(transport, blank, cluster_id)
        except PsFailedPrecondition:
            if attempt == 2:
                raise
            continue  # another client named the cluster meanwhile: adopt its id
        return cluster_id
    raise AssertionError("unreachable")
