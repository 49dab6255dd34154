"""Monolith's ``hash_filter_ops`` functions over a monolith-ps cluster.

Names, positional order and defaults are Monolith's; see :mod:`ps_client.monolith` for
what changes everywhere (no graph, ``client=``). Per function:

* The ``create_*`` functions return a :class:`HashFilter` handle instead of a filter
  resource tensor. One handle stands for one filter *per shard*, all of one name
  (``MonolithHashFilter<name_suffix>``, whatever the type), and a table created with
  it sends each id to its owner shard's filter. The same name with other options is
  refused (``ValueError``); Monolith would silently reuse the first resource.
* ``create_hash_filters(ps_num, …)`` makes one such filter set and returns a list:
  with ``ps_num == 0`` one handle (a single-process Monolith job is a one-shard
  cluster); otherwise ``ps_num`` handles, where handle ``i`` is PS ``i``'s filter, i.e.
  shard ``i``'s — ``ps_num`` must then equal the cluster's shard count. Any of them
  may be given to ``hash_table_from_config``: the table uses every shard's filter.
  With ``enable_hash_filter=False`` the filters are dummies whatever ``filter_type``
  says, as in Monolith.
* ``save_hash_filter`` / ``restore_hash_filter`` use Monolith's file names
  ``<basename>-%05d-of-%05d``. A per-PS handle (from ``create_hash_filters(ps_num > 0)``)
  saves and restores that shard's filter only; any other handle does every shard: on a
  one-shard cluster under ``<basename>``, on ``N`` shards under ``<basename>_<i>`` for
  shard ``i``. Dummy and probabilistic filters write nothing; a restore checks every
  shard's files before any filter changes.
* ``intercept_gradient(filter, ids, grads)`` is the forward and the registered backward
  pass in one call: its third argument is the gradient reaching the embeddings, and it
  returns that gradient with the rows of not-yet-admitted ids zeroed, counting every
  occurrence once, in order, on its owner shard (also for a per-PS handle).

Not provided: ``HashFilterCheckpointSaverListener`` / ``HashFilterCheckpointRestorerListener``
(TensorFlow estimator hooks; use :meth:`ps_client.PsClient.save_checkpoint` /
:meth:`~ps_client.PsClient.restore_checkpoint`, which save and restore filters with the
tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import contract
from ps_client.client import HashFilters, PsClient
from ps_client.monolith import get_client

__all__ = [
    "HASH_FILTER_CAPACITY",
    "HASH_FILTER_SPLIT_NUM",
    "FilterType",
    "HashFilter",
    "create_dummy_hash_filter",
    "create_hash_filter",
    "create_hash_filters",
    "create_probabilistic_filter",
    "intercept_gradient",
    "restore_hash_filter",
    "save_hash_filter",
]

HASH_FILTER_CAPACITY: int = contract.DEFAULT_FILTER_CAPACITY
HASH_FILTER_SPLIT_NUM: int = contract.DEFAULT_FILTER_SPLIT_NUM


class FilterType:
    """The ``filter_type`` values."""

    SLIDING_HASH_FILTER = "sliding_hash_filter"
    PROBABILISTIC_FILTER = "probabilistic_filter"
    NO_FILTER = "no_filter"


@dataclass(frozen=True)
class HashFilter:
    """A handle on a filter set: every shard's filter (``shard is None``) or PS
    ``shard``'s filter of it (from ``create_hash_filters(ps_num > 0)``).

    :ivar filters: the :class:`ps_client.HashFilters` it belongs to.
    """

    filters: HashFilters
    client: PsClient
    shard: int | None = None

    @property
    def name(self) -> str:
        return self.filters.name

    @property
    def enabled(self) -> bool:
        return self.filters.enabled


def _make(client: PsClient | None, enable: bool, config: Any, **options: Any) -> HashFilter:
    c = get_client(client)
    return HashFilter(c.create_hash_filters(enable, config, **options), c)


def create_hash_filter(
    capacity: int, split_num: int, config: bytes = b"", name_suffix: str = "", *,
    client: PsClient | None = None,
) -> HashFilter:
    """A sliding hash filter (``config``: ``SlotOccurrenceThresholdConfig`` or its bytes)."""
    return _make(client, True, config, capacity=capacity, split_num=split_num,
                 name_suffix=name_suffix)


def create_probabilistic_filter(
    equal_probability: bool, config: bytes = b"", name_suffix: str = "", *,
    client: PsClient | None = None,
) -> HashFilter:
    """A probabilistic filter (admits for tables only; saves no file)."""
    return _make(client, True, config, filter_type=FilterType.PROBABILISTIC_FILTER,
                 equal_probability=equal_probability, name_suffix=name_suffix)


def create_dummy_hash_filter(
    name_suffix: str = "0", *, client: PsClient | None = None
) -> HashFilter:
    """A filter that admits everything and saves nothing."""
    return _make(client, False, b"", name_suffix=name_suffix)


def create_hash_filters(
    ps_num: int,
    enable_hash_filter: bool,
    config: bytes = b"",
    filter_capacity: int = HASH_FILTER_CAPACITY,
    filter_split_num: int = HASH_FILTER_SPLIT_NUM,
    filter_equal_probability: bool = False,
    filter_type: str = FilterType.SLIDING_HASH_FILTER,
    *,
    client: PsClient | None = None,
) -> list[HashFilter]:
    """One filter set named ``MonolithHashFilter``; one handle, or one per PS.

    :raises ValueError: ``ps_num`` neither 0 nor the shard count; an unknown
        ``filter_type`` with ``enable_hash_filter``.
    """
    c = get_client(client)
    if ps_num < 0 or (ps_num and ps_num != c.num_shards):
        raise ValueError(
            f"ps_num={ps_num}: the cluster has {c.num_shards} shards (one per PS); "
            "pass that number, or 0 for one handle on all of them"
        )
    enable = enable_hash_filter is True
    if enable and filter_type not in contract.FILTER_TYPES:
        raise ValueError(
            f"Invalid filter type {filter_type!r}: expected one of {contract.FILTER_TYPES}"
        )
    filters = c.create_hash_filters(
        enable, config, capacity=filter_capacity, split_num=filter_split_num,
        equal_probability=filter_equal_probability,
        filter_type=filter_type if enable else FilterType.SLIDING_HASH_FILTER,
    )
    if ps_num == 0:
        return [HashFilter(filters, c)]
    return [HashFilter(filters, c, i) for i in range(ps_num)]


def _basenames(hash_filter: HashFilter, basename: str) -> list[str | None]:
    n = hash_filter.client.num_shards
    if hash_filter.shard is not None:
        return [basename if i == hash_filter.shard else None for i in range(n)]
    if n == 1:
        return [basename]
    return [f"{basename}_{i}" for i in range(n)]


def _file_op(
    hash_filter: HashFilter, method: str, basename: str, validate_only: bool = False
) -> None:
    """One filter's files per shard under a caller-chosen basename."""
    basenames = _basenames(hash_filter, str(basename))
    if method == "SaveHashFilter":
        hash_filter.filters.save_files(basenames)
    else:
        hash_filter.filters.restore_files(basenames)


def save_hash_filter(
    hash_filter: HashFilter, hash_filter_basename: str, enable_hash_filter: bool = False
) -> None:
    """Write the filter's split files (nothing unless ``enable_hash_filter`` is True)."""
    if enable_hash_filter is True:
        _file_op(hash_filter, "SaveHashFilter", hash_filter_basename)


def restore_hash_filter(
    hash_filter: HashFilter, hash_filter_base_name: str, enable_hash_filter: bool = False
) -> None:
    """Load the filter's split files (nothing unless ``enable_hash_filter`` is True).

    :raises ps_client.PsNotFound: (``KeyError``) missing files; no filter changed.
    """
    if enable_hash_filter is True:
        _file_op(hash_filter, "RestoreHashFilter", hash_filter_base_name)


def intercept_gradient(
    filter_tensor: HashFilter, ids: Any, grads: Any
) -> npt.NDArray[np.float32]:
    """Count ``ids`` and return ``grads`` (``[len(ids), …]``, the gradient reaching the
    embeddings) with the rows of ids not admitted yet zeroed."""
    return filter_tensor.filters.intercept_gradient(ids, grads)
