"""Per-slot occurrence thresholds (``SlotOccurrenceThresholdConfig``) and fid slots.

The threshold of an id is ``thresholds[slot_v2(id)]`` with ``slot_v2(id) =
(uint64(id) >> 48) & 0x7FFF`` whatever the fid version (Monolith's rule). The array
has one entry per possible slot (32768) and starts at ``default_occurrence_threshold``
(proto default 0); each ``slot_occurrence_thresholds`` item overrides one slot, later
items winning. An empty config (``b""`` or ``None``) means every threshold is 0, i.e.
nothing is counted and nothing filtered.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from protos import embedding_hash_table_pb2 as eht
from ps_server.errors import ConfigError

__all__ = ["MAX_SLOTS", "ThresholdConfig", "Thresholds", "slot_thresholds", "slots_v2"]

#: Number of slots (15 bits): the length of every per-slot array.
MAX_SLOTS = 1 << 15

Thresholds = npt.NDArray[np.int64]
ThresholdConfig = eht.SlotOccurrenceThresholdConfig | bytes | None


def slots_v2(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Slot of each id by the v2 rule: ``(uint64(id) >> 48) & 0x7FFF`` (``-1`` -> 32767)."""
    u = ids.view(np.uint64) if ids.dtype == np.int64 else ids.astype(np.int64).view(np.uint64)
    return ((u >> np.uint64(48)) & np.uint64(0x7FFF)).astype(np.int64)


def slot_thresholds(config: ThresholdConfig) -> Thresholds:
    """The ``int64[32768]`` per-slot thresholds of a config or its serialized bytes.

    :param config: a ``SlotOccurrenceThresholdConfig``, its serialization, or ``None``
        / ``b""`` for all zeros.
    :raises ConfigError: unparsable bytes, a config of another type, or an override for
        a slot >= 32768.
    """
    if config is None or (isinstance(config, bytes | bytearray) and len(config) == 0):
        return np.zeros(MAX_SLOTS, dtype=np.int64)
    if isinstance(config, bytes | bytearray):
        msg = eht.SlotOccurrenceThresholdConfig()
        try:
            msg.ParseFromString(bytes(config))
        except DecodeError as e:
            raise ConfigError(f"SlotOccurrenceThresholdConfig bytes do not parse: {e}") from e
    elif isinstance(config, eht.SlotOccurrenceThresholdConfig):
        msg = config
    else:
        raise ConfigError(
            "filter config must be a SlotOccurrenceThresholdConfig or its serialized bytes, "
            f"got {type(config).__name__}"
        )
    arr = np.full(MAX_SLOTS, msg.default_occurrence_threshold, dtype=np.int64)
    for item in msg.slot_occurrence_thresholds:
        if item.slot >= MAX_SLOTS:
            raise ConfigError(
                f"slot_occurrence_thresholds names slot {item.slot}; slots must be < {MAX_SLOTS}"
            )
        arr[item.slot] = item.occurrence_threshold
    return arr
