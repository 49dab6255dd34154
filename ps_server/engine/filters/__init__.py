"""Frequency hash filters: which occurrences of new ids a table must skip.

* :class:`SlidingHashFilter` — Monolith's counting filter (``"sliding_hash_filter"``).
* :class:`ProbabilisticFilter` — random admission (``"probabilistic_filter"``).
* :class:`DummyHashFilter` — admits everything (``"no_filter"`` or filtering disabled).

All share :class:`HashFilter`: ``should_be_filtered(ids, counts, *, with_table)``,
``split_num``, ``export_splits()`` / ``import_splits(...)``.
"""

from __future__ import annotations

from protos import contract
from ps_server.engine.filters.base import FilterSplit, HashFilter, as_counts
from ps_server.engine.filters.dummy import DummyHashFilter
from ps_server.engine.filters.probabilistic import ProbabilisticFilter
from ps_server.engine.filters.sliding import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT_NUM,
    SlidingHashFilter,
    mix64,
    signatures,
)
from ps_server.engine.filters.thresholds import (
    MAX_SLOTS,
    ThresholdConfig,
    Thresholds,
    slot_thresholds,
    slots_v2,
)
from ps_server.errors import ConfigError

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SPLIT_NUM",
    "FILTER_TYPES",
    "MAX_SLOTS",
    "DummyHashFilter",
    "FilterSplit",
    "HashFilter",
    "ProbabilisticFilter",
    "SlidingHashFilter",
    "ThresholdConfig",
    "Thresholds",
    "as_counts",
    "filter_from_options",
    "mix64",
    "signatures",
    "slot_thresholds",
    "slots_v2",
]

#: Accepted ``filter_type`` names (Monolith's ``FilterType`` values, lower case).
FILTER_TYPES = contract.FILTER_TYPES


def filter_from_options(
    filter_type: str = "sliding_hash_filter",
    *,
    enable_hash_filter: bool = True,
    config: ThresholdConfig | Thresholds = None,
    capacity: int = DEFAULT_CAPACITY,
    split_num: int = DEFAULT_SPLIT_NUM,
    equal_probability: bool = False,
    seed: int | None = None,
) -> HashFilter:
    """Build one shard's filter from the client's ``create_hash_filters`` options.

    :param filter_type: one of :data:`FILTER_TYPES`.
    :param enable_hash_filter: False gives a :class:`DummyHashFilter` whatever the type
        (its config is not even parsed, as in Monolith).
    :param config: ``SlotOccurrenceThresholdConfig``, its bytes, or ``None``/``b""``.
    :param capacity: sliding filter capacity (raised to 300 if smaller).
    :param split_num: sliding filter splits (>= 5).
    :param equal_probability: probabilistic filter rule.
    :param seed: probabilistic filter seed, the value Monolith's ``srand(time(0))``
        would get (same seed, same draws as Monolith); ``None``: from OS entropy.
    :raises ConfigError: unknown ``filter_type`` (also a ``ValueError``), bad config,
        ``split_num < 5``, capacity too small.
    """
    if filter_type not in FILTER_TYPES:
        raise ConfigError(
            f"unknown filter_type {filter_type!r}; expected one of {', '.join(FILTER_TYPES)}"
        )
    if not enable_hash_filter or filter_type == "no_filter":
        return DummyHashFilter()
    if filter_type == "probabilistic_filter":
        return ProbabilisticFilter(equal_probability, config, seed)
    return SlidingHashFilter(capacity, split_num, config)
