"""Facts of the service contract that client and server both read, declared once.

* Each RPC's retry class comes from ``ps_service.proto`` (protobuf's standard
  ``idempotency_level`` method option): ``NO_SIDE_EFFECTS`` methods are reads,
  ``IDEMPOTENT`` methods are writes that carry a ``RequestTag`` and are applied at most
  once per tag (``JoinCluster`` carries none: repeating it changes nothing). The sets
  below are computed from the descriptors, so adding an RPC means writing its option in
  the proto and nothing else.
* :data:`BULK_RPCS` are the methods whose requests carry ``Tensor`` fields (their
  payloads are read as views of the received bytes, never copied into a message).
* Hash-filter types and defaults, and the gRPC message limit, used by both ends.
"""

from __future__ import annotations

from typing import Final

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from protos import ps_service_pb2 as ps_pb2

__all__ = [
    "ADMIN_SERVICE",
    "BULK_RPCS",
    "CHECKPOINT_RPCS",
    "DATA_SERVICE",
    "DEFAULT_FILTER_CAPACITY",
    "DEFAULT_FILTER_SPLIT_NUM",
    "DEFAULT_FILTER_TYPE",
    "FILTER_TYPES",
    "MAX_MESSAGE_BYTES",
    "READ_ONLY_RPCS",
    "TAGGED_RPCS",
    "rpcs_with_idempotency",
]

#: The data plane (trainers) and the ops plane (``ps-admin``).
DATA_SERVICE: Final[ServiceDescriptor] = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
ADMIN_SERVICE: Final[ServiceDescriptor] = ps_pb2.DESCRIPTOR.services_by_name[
    "ParameterServerAdmin"
]


def _level(method: MethodDescriptor) -> int:
    return int(method.GetOptions().idempotency_level)


def rpcs_with_idempotency(service: ServiceDescriptor, level: str) -> frozenset[str]:
    """Names of ``service``'s methods declared with ``idempotency_level = level``."""
    from google.protobuf import descriptor_pb2

    wanted = descriptor_pb2.MethodOptions.IdempotencyLevel.Value(level)
    return frozenset(m.name for m in service.methods if _level(m) == wanted)


#: Data-plane RPCs that change nothing: retried on ``UNAVAILABLE``.
READ_ONLY_RPCS: Final = rpcs_with_idempotency(DATA_SERVICE, "NO_SIDE_EFFECTS")
#: Data-plane writes carrying a ``RequestTag``: applied at most once per tag, so they
#: are retried with the same tag (on ``UNAVAILABLE`` and on an attempt's deadline).
#: ``JoinCluster`` is one of them without a tag: a repeat of it changes nothing.
TAGGED_RPCS: Final = rpcs_with_idempotency(DATA_SERVICE, "IDEMPOTENT")


#: Admin-plane RPCs of whole checkpoints: a trainer's data-plane token may call them
#: too (``PsClient.save_checkpoint`` / ``restore_checkpoint``); the other admin RPCs
#: (evict, stats, drain) need the admin token.
CHECKPOINT_RPCS: Final = frozenset(
    m.name for m in ADMIN_SERVICE.methods if m.name.endswith("Checkpoint")
)

#: Data-plane RPCs whose request messages have ``Tensor`` fields.
BULK_RPCS: Final = frozenset(
    m.name for m in DATA_SERVICE.methods
    if any(f.message_type is not None and f.message_type.name == "Tensor"
           for f in m.input_type.fields)
)

#: Hash-filter kinds (``CreateHashFilterRequest.filter_type``).
FILTER_TYPES: Final = ("sliding_hash_filter", "probabilistic_filter", "no_filter")
#: The kind used when a request leaves ``filter_type`` empty.
DEFAULT_FILTER_TYPE: Final = "sliding_hash_filter"
#: Sliding filter capacity (elements) when a request leaves it 0 (Monolith's default).
DEFAULT_FILTER_CAPACITY: Final = 300_000_000
#: Sliding filter split count when a request leaves it 0 (Monolith's default).
DEFAULT_FILTER_SPLIT_NUM: Final = 7
#: Largest gRPC message either end sends or accepts by default (the server's
#: ``--max_message_bytes`` overrides it per shard; clients take ``max_message_bytes=``).
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
