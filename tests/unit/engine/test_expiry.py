"""Expiry (docs/semantics.md §6.3): the mask, in-memory eviction and its scheduler.

An entry expires iff ``clock - ts >= expire_days(slot_v2(id)) * 86400``.
"""

from __future__ import annotations

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import configs
from ps_server.engine.expiry import (
    EvictionScheduler,
    evict_expired,
    expire_seconds_by_slot,
    expired_mask,
)
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.errors import ConfigError, DimMismatchError

DAY = 86_400


def expire_config(default: int | None = None, **slots: int) -> eht.SlotExpireTimeConfig:
    cfg = eht.SlotExpireTimeConfig()
    if default is not None:
        cfg.default_expire_time = default
    for key, days in slots.items():
        cfg.slot_expire_times.add(slot=int(key.removeprefix("s")), expire_time=days)
    return cfg


def v2(slot: int, sig: int) -> int:
    """make_v2(slot, sig) as a signed int64."""
    u = (slot << 48) | (sig & ((1 << 48) - 1))
    return u - (1 << 64) if u >= 1 << 63 else u


def test_boundary_is_inclusive_one_day() -> None:
    clock = 1_000_000
    ids = [1, 2, 3, 4]
    # ages 86401, 86400, 86399, 0 seconds against 1 day = 86400 s
    ts = [clock - 86_401, clock - 86_400, clock - 86_399, clock]
    got = expired_mask(ids, ts, clock, expire_config(default=1))
    assert got.tolist() == [True, True, False, False]


def test_default_is_36500_days() -> None:
    cfg = eht.SlotExpireTimeConfig()
    assert cfg.default_expire_time == 36500
    clock = 36_500 * DAY + 10
    got = expired_mask([7, 7], [10, 11], clock, cfg)
    # ages 36500 days exactly (expired) and one second less (kept)
    assert got.tolist() == [True, False]


def test_zero_expire_drops_everything_even_at_the_clock() -> None:
    got = expired_mask([0, 5, -1], [0, 0, 0], 0, expire_config(default=0))
    assert got.tolist() == [True, True, True]


def test_per_slot_overrides_use_the_v2_slot() -> None:
    cfg = expire_config(default=10, s1=0, s2=1, s32767=2)
    secs = expire_seconds_by_slot(cfg)
    assert secs.shape == (32768,)
    assert (secs[1], secs[2], secs[3], secs[32767]) == (0, DAY, 10 * DAY, 2 * DAY)
    clock = 100
    ids = [v2(1, 5), v2(2, 5), v2(3, 5), -1]  # -1 is slot 32767
    ts = [100, 100, 100, 100]
    assert expired_mask(ids, ts, clock, cfg).tolist() == [True, False, False, False]
    # the precomputed array gives the same answer
    assert expired_mask(ids, ts, clock, secs).tolist() == [True, False, False, False]


def test_v1_ids_still_use_the_v2_slot_rule() -> None:
    # v1 fid with slot 3 in bits 54..63: its v2 slot is (3 << 54 >> 48) & 0x7FFF = 192.
    fid = 3 << 54
    cfg = expire_config(default=100, s192=0, s3=100)
    assert expired_mask([fid], [50], 50, cfg).tolist() == [True]


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="40000"):
        expire_seconds_by_slot(expire_config(s40000=1))
    with pytest.raises(DimMismatchError):
        expired_mask([1, 2], [0], 0, expire_config())


def test_evict_expired_removes_only_old_entries_and_keeps_the_rest_intact() -> None:
    cfg = configs.table_config(2, expire_days=1)
    table = EmbeddingHashTable(cfg)
    clock = 200_000
    table.assign([1, 2], [[1.0, 1.0], [2.0, 2.0]], req_time=clock - 86_401)
    table.assign([3], [[3.0, 3.0]], req_time=clock - 86_399)
    table.assign([4], [[4.0, 4.0]], req_time=clock)
    assert table.max_update_ts == clock
    assert evict_expired(table) == 2
    assert table.size() == 2
    np.testing.assert_array_equal(
        table.lookup([1, 2, 3, 4]), [[0, 0], [0, 0], [3, 3], [4, 4]]
    )
    assert evict_expired(table) == 0


def test_evict_expired_per_slot() -> None:
    cfg = configs.table_config(1)
    cfg.slot_expire_time_config.slot_expire_times.add(slot=1, expire_time=0)
    table = EmbeddingHashTable(cfg)
    table.assign([v2(1, 1), v2(1, 2), v2(2, 1)], [[1.0], [2.0], [3.0]], req_time=100)
    # slot 1 expires at age 0; slot 2 uses the default 36500 days
    assert evict_expired(table) == 2
    np.testing.assert_array_equal(table.lookup([v2(2, 1)]), [[3.0]])
    assert evict_expired(EmbeddingHashTable(configs.table_config(1))) == 0


def test_scheduler_first_tick_records_then_fires_each_period() -> None:
    s = EvictionScheduler(2)
    assert s.period_s == 7200
    assert s.tick(1000.0) is False  # first pass only records the time
    assert s.tick(1000.0 + 7199) is False
    assert s.tick(1000.0 + 7200) is True
    assert s.tick(1000.0 + 7200 + 10) is False  # period restarts at the firing tick
    assert s.tick(1000.0 + 14_400) is True


def test_scheduler_for_table() -> None:
    cfg = configs.table_config(1)
    assert EvictionScheduler.for_table(cfg) is None
    cfg.enable_feature_eviction = True
    s = EvictionScheduler.for_table(cfg)
    assert s is not None and s.period_s == 240 * 3600  # proto default 240 hours
    zero = EvictionScheduler(0)
    assert zero.tick(5.0) is False
    assert zero.tick(5.0) is True
