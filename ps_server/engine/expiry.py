"""Feature expiry (docs/semantics.md §6.3): which entries are too old, on save and in memory.

An entry expires when ``clock - last_update_ts_sec >= expire_days(slot) * 86400``,
where ``clock`` is the table's ``max_update_ts`` (never the wall clock) and
``expire_days`` comes from the table config's ``SlotExpireTimeConfig``: the per-slot
override for the id's slot (v2 rule, whatever the fid version) or else
``default_expire_time`` (proto default 36500 days). An expire time of 0 therefore
expires every entry, even one written at the clock.

Saving uses :func:`expired_mask` to leave expired entries out of the files (the live
table is not changed). With ``enable_feature_eviction`` the server also deletes them
from memory: it calls :meth:`EvictionScheduler.tick` every few seconds and
:func:`evict_expired` when the tick says so.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.filters.thresholds import MAX_SLOTS, slots_v2
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.types import Mask, as_ids
from ps_server.errors import ConfigError, DimMismatchError

__all__ = [
    "SECONDS_PER_DAY",
    "EvictionScheduler",
    "evict_expired",
    "expire_seconds_by_slot",
    "expired_mask",
]

SECONDS_PER_DAY = 86_400
_EVICT_CHUNK = 1 << 20


def expire_seconds_by_slot(config: eht.SlotExpireTimeConfig) -> npt.NDArray[np.int64]:
    """``int64[32768]``: the expire time in seconds of every slot.

    Later overrides of the same slot win.

    :raises ConfigError: an override names a slot >= 32768.
    """
    out = np.full(MAX_SLOTS, int(config.default_expire_time) * SECONDS_PER_DAY, dtype=np.int64)
    for item in config.slot_expire_times:
        if item.slot >= MAX_SLOTS:
            raise ConfigError(
                f"slot_expire_time_config overrides slot {item.slot}, but slots are "
                f"0..{MAX_SLOTS - 1}"
            )
        out[item.slot] = int(item.expire_time) * SECONDS_PER_DAY
    return out


def expired_mask(
    ids: npt.ArrayLike,
    timestamps: npt.ArrayLike,
    clock: int,
    slot_expire_config: eht.SlotExpireTimeConfig | npt.NDArray[np.int64],
) -> Mask:
    """Which entries have expired at ``clock``.

    :param ids: ``int64[n]`` ids (their v2 slot picks the expire time).
    :param timestamps: ``[n]`` last update times in seconds (any integer dtype).
    :param clock: the table clock (``max_update_ts``) in seconds.
    :param slot_expire_config: the table's ``SlotExpireTimeConfig``, or the
        ``int64[32768]`` array of :func:`expire_seconds_by_slot` (reuse it across chunks).
    :returns: ``bool[n]``, True where ``clock - timestamp >= expire_seconds(slot)``.
    :raises DimMismatchError: ids and timestamps differ in length.
    :raises ConfigError: see :func:`expire_seconds_by_slot`.
    """
    ids_ = as_ids(ids)
    ts = np.asarray(timestamps).astype(np.int64, copy=False).reshape(-1)
    if ts.shape[0] != ids_.shape[0]:
        raise DimMismatchError(
            f"expired_mask needs one timestamp per id: {ids_.shape[0]} ids, {ts.shape[0]} "
            "timestamps"
        )
    if isinstance(slot_expire_config, eht.SlotExpireTimeConfig):
        seconds = expire_seconds_by_slot(slot_expire_config)
    else:
        seconds = slot_expire_config
    age = np.int64(clock) - ts
    expired: Mask = age >= seconds[slots_v2(ids_)]
    return expired


def evict_expired(table: EmbeddingHashTable) -> int:
    """Delete the table's expired entries from memory; return how many were deleted.

    The clock is the table's ``max_update_ts`` and the expire times its config's
    ``slot_expire_time_config``. The mask is built chunk by chunk (one byte per entry);
    the table compacts itself in place.
    """
    size = table.size()
    if size == 0:
        return 0
    seconds = expire_seconds_by_slot(table.config.slot_expire_time_config)
    clock = table.max_update_ts
    keep = np.empty(size, dtype=np.bool_)
    pos = 0
    for cols in table.iter_columns(_EVICT_CHUNK):
        n = cols.ids.shape[0]
        keep[pos : pos + n] = ~expired_mask(cols.ids, cols.timestamps, clock, seconds)
        pos += n
    return table.keep_rows(keep)


class EvictionScheduler:
    """When to run periodic eviction (docs/semantics.md §6.3, ``enable_feature_eviction``).

    Pure bookkeeping on wall-clock seconds given by the caller: the first
    :meth:`tick` records the time and returns False; a later tick returns True (and
    restarts the period) once ``every_n_hours`` hours have passed since the last
    recorded time. A period of zero or less fires on every tick after the first.

    :param every_n_hours: the table config's ``feature_evict_every_n_hours``.
    """

    def __init__(self, every_n_hours: float) -> None:
        self.period_s = max(0.0, float(every_n_hours) * 3600.0)
        self._last: float | None = None

    @classmethod
    def for_table(cls, config: eht.EmbeddingHashTableConfig) -> EvictionScheduler | None:
        """A scheduler for a table config, or None when ``enable_feature_eviction`` is off."""
        if not config.enable_feature_eviction:
            return None
        return cls(config.feature_evict_every_n_hours)

    def tick(self, now_wall_s: float) -> bool:
        """Whether to evict now (see the class docstring)."""
        if self._last is None:
            self._last = now_wall_s
            return False
        if now_wall_s - self._last >= self.period_s:
            self._last = now_wall_s
            return True
        return False
