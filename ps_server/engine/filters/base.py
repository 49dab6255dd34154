"""The hash-filter contract: batch admission of ids not yet in a table.

A filter answers, for each occurrence of an id that a table does not contain yet,
whether the occurrence must be skipped. :meth:`HashFilter.should_be_filtered` takes a
whole batch and behaves exactly as Monolith's per-id
``should_be_filtered(fid, count, threshold, table)`` called for each occurrence in
order. Thresholds come from the filter's own ``SlotOccurrenceThresholdConfig``
(:mod:`~ps_server.engine.filters.thresholds`); an occurrence whose slot threshold is
<= 0 is never filtered and never counted.

State for checkpoints is exchanged as :class:`FilterSplit` items (one per saved file);
the engine knows nothing of paths (``ps_server.checkpoint.filter_dump`` does the files).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.filters.thresholds import (
    MAX_SLOTS,
    ThresholdConfig,
    Thresholds,
    slot_thresholds,
    slots_v2,
)
from ps_server.engine.types import Ids, Mask, as_ids
from ps_server.errors import BadTensorError, ConfigError, ConfigMismatchError, DimMismatchError

__all__ = ["Counts", "FilterSplit", "HashFilter", "as_counts"]

Counts = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class FilterSplit:
    """The state of one split of a filter, as one checkpoint file holds it.

    :param meta: the split's ``HashFilterSplitMetaDump`` (with the filter-wide
        ``sliding_hash_filter_meta``, identical in every split).
    :param cells: ``uint16[total_size + 64]`` counting cells. From
        :meth:`HashFilter.export_splits` this is a read-only view of live storage, valid
        until the filter next changes.
    """

    meta: eht.HashFilterSplitMetaDump
    cells: npt.NDArray[np.uint16]


def as_counts(counts: Any, n: int) -> Counts:
    """Validate per-occurrence counts: ``n`` integers in ``[1, 2**32)``; ``None`` -> ones.

    :raises DimMismatchError: not 1-D of length ``n``.
    :raises BadTensorError: non-integers, or a count outside ``[1, 2**32)``.
    """
    if counts is None:
        return np.ones(n, dtype=np.uint32)
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DimMismatchError(f"counts must be 1-D with one count per id ({n}), got {arr.shape}")
    if arr.dtype == np.uint32:
        if n and int(arr.min()) < 1:
            raise BadTensorError("counts must be >= 1 (an occurrence counts at least once)")
        return arr
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    if arr.dtype.kind not in "iu":
        raise BadTensorError(f"counts must be integers, got {arr.dtype}")
    if int(arr.min()) < 1 or int(arr.max()) > 0xFFFFFFFF:
        raise BadTensorError("counts must be in [1, 2**32) (an occurrence counts at least once)")
    return arr.astype(np.uint32)


class HashFilter(abc.ABC):
    """Decides, batch at a time, which occurrences of not-yet-present ids to skip.

    :param thresholds: a ``SlotOccurrenceThresholdConfig``, its bytes, ``None``/``b""``
        (all 0), or an already built ``int64[32768]`` array.
    :raises ConfigError: invalid thresholds config.
    """

    def __init__(self, thresholds: ThresholdConfig | Thresholds = None) -> None:
        if isinstance(thresholds, np.ndarray):
            if thresholds.shape != (MAX_SLOTS,):
                raise ConfigError(
                    f"a thresholds array must have {MAX_SLOTS} entries, got {thresholds.shape}"
                )
            arr = thresholds.astype(np.int64)
        else:
            arr = slot_thresholds(thresholds)
        arr.flags.writeable = False
        self._thresholds = arr

    @property
    def thresholds(self) -> Thresholds:
        """Read-only ``int64[32768]`` occurrence threshold per v2 slot."""
        return self._thresholds

    def thresholds_of(self, ids: Ids) -> npt.NDArray[np.int64]:
        """The threshold of each id (``thresholds[slot_v2(id)]``)."""
        return self._thresholds[slots_v2(ids)]

    def should_be_filtered(self, ids: Any, counts: Any = None, *, with_table: bool) -> Mask:
        """Count a batch of occurrences in order; True where the occurrence is skipped.

        Equivalent to calling Monolith's ``should_be_filtered(ids[i], counts[i],
        threshold(slot_v2(ids[i])), table)`` for ``i = 0, 1, ...`` in sequence.

        :param ids: ``int64[n]`` ids (any int64-convertible 1-D array-like).
        :param counts: ``uint32[n]`` occurrences each call stands for (1 without dedup,
            the number of duplicates with dedup); ``None`` means all ones. Each >= 1.
        :param with_table: False models ``intercept_gradient`` (no table): the
            probabilistic filter then never filters; sliding and dummy ignore it.
        :returns: ``bool[n]``, True = filtered (skip this occurrence).
        :raises BadTensorError, DimMismatchError: invalid ids or counts; nothing is
            counted then.
        """
        arr = as_ids(ids)
        c = as_counts(counts, arr.shape[0])
        if arr.shape[0] == 0:
            return np.zeros(0, dtype=np.bool_)
        return self._filter(arr, c, self.thresholds_of(arr), with_table)

    @abc.abstractmethod
    def _filter(
        self, ids: Ids, counts: Counts, thresholds: npt.NDArray[np.int64], with_table: bool
    ) -> Mask:
        """Filter validated, non-empty input; ``thresholds`` is per occurrence."""

    @property
    def split_num(self) -> int:
        """Number of files a save writes (0: the filter saves nothing)."""
        return 0

    @property
    def cells_per_split(self) -> int:
        """Length of each split's ``cells`` array (0 when the filter keeps no state)."""
        return 0

    def export_splits(self) -> list[FilterSplit]:
        """The state to save, one item per file (``split_num`` items)."""
        return []

    def check_split_meta(
        self, index: int, meta: eht.HashFilterSplitMetaDump, source: str = ""
    ) -> None:
        """Validate one split's meta against this filter's configuration, changing nothing.

        :param index: which split it claims to be.
        :param source: where it came from (a file name), used in error messages.
        :raises ConfigMismatchError: the meta does not fit this filter.
        :raises CheckpointCorruptError: the meta holds impossible values.
        """
        raise ConfigMismatchError(
            f"{source or 'filter state'}: {type(self).__name__} keeps no state; "
            f"got split {index}"
        )

    def check_split(self, index: int, split: FilterSplit, source: str = "") -> None:
        """Validate a whole split (meta and cells), changing nothing.

        :raises ConfigMismatchError, CheckpointCorruptError: as :meth:`check_split_meta`,
            or cells of the wrong dtype/length.
        """
        self.check_split_meta(index, split.meta, source)

    def import_splits(self, splits: Sequence[FilterSplit], sources: Sequence[str] = ()) -> None:
        """Replace the state with ``splits`` (from :meth:`export_splits` or files).

        Everything is validated first; on error the filter is unchanged.

        :param sources: optional origin of each split (file names) for error messages.
        :raises ConfigMismatchError: wrong number of splits or a split that does not fit.
        :raises CheckpointCorruptError: splits that are inconsistent among themselves.
        """
        self.validate_splits(splits, sources)
        if splits:
            self._import(splits)

    def validate_splits(self, splits: Sequence[FilterSplit], sources: Sequence[str] = ()) -> None:
        """Every check of :meth:`import_splits`, without changing anything."""
        if len(splits) != self.split_num:
            raise ConfigMismatchError(
                f"{type(self).__name__} has {self.split_num} split(s); got {len(splits)}"
            )
        names = list(sources) + [""] * (len(splits) - len(sources))
        for i, split in enumerate(splits):
            self.check_split(i, split, names[i])
        self._check_consistent(splits, names)

    def _check_consistent(self, splits: Sequence[FilterSplit], sources: Sequence[str]) -> None:
        """Cross-split validation hook (after each split passed :meth:`check_split`)."""
        return None

    def _import(self, splits: Sequence[FilterSplit]) -> None:
        """Commit validated splits."""
        return None
