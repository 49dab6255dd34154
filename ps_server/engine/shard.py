"""One shard's state: named embedding tables and named hash filters.

:class:`Shard` is the engine's face to the runtime: the service reaches tables and
filters only through its methods (create, lookup, assign, apply_gradients, fused ops,
intercept_gradient, eviction, :meth:`Shard.describe`). Every method takes and returns
numpy arrays, validates everything before changing anything, and raises
:mod:`ps_server.errors` types. It holds no locks: callers serialize access per table
(the runtime runs engine work on its executor, one call at a time per table).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.expiry import evict_expired
from ps_server.engine.filters import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT_NUM,
    FILTER_TYPES,
    HashFilter,
    SlidingHashFilter,
    filter_from_options,
)
from ps_server.engine.hash_table import EmbeddingHashTable, EntrySelection
from ps_server.engine.names import FILTER_FILE_STEM, reserved_table_stem, stem_collision
from ps_server.engine.types import Floats, Ids, as_ids, as_rows_matrix
from ps_server.errors import (
    AlreadyExistsError,
    BadTensorError,
    ConfigError,
    DimMismatchError,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingEntryError,
    UnknownFilterError,
    UnknownTableError,
)

#: Largest sliding filter capacity (elements); beyond it the cells could not even be
#: addressed, let alone allocated.
MAX_FILTER_CAPACITY = 1 << 40
#: Most files one save of a table (``saver_parallel``) or of a sliding filter
#: (``split_num``) may write: a request cannot make the shard write millions of files.
MAX_FILES_PER_SAVE = 1024
#: Longest table or filter name (UTF-8 bytes): it is part of checkpoint file names.
MAX_NAME_BYTES = 200


@dataclass(frozen=True)
class FilterOptions:
    """How a hash filter was created (compared when it is created again).

    :param enable_hash_filter: False gives a dummy filter whatever the type.
    :param filter_type: one of :data:`FILTER_TYPES`.
    :param occurrence_threshold_config: serialized ``SlotOccurrenceThresholdConfig``.
    :param capacity: sliding filter capacity.
    :param split_num: sliding filter split count.
    :param equal_probability: probabilistic filter mode.
    """

    enable_hash_filter: bool = True
    filter_type: str = "sliding_hash_filter"
    occurrence_threshold_config: bytes = b""
    capacity: int = DEFAULT_CAPACITY
    split_num: int = DEFAULT_SPLIT_NUM
    equal_probability: bool = False

    def build(self) -> HashFilter:
        """The filter these options describe.

        :raises ConfigError: unknown type; a sliding filter with a capacity over
            :data:`MAX_FILTER_CAPACITY` or more than :data:`MAX_FILES_PER_SAVE` splits.
        """
        if self.filter_type not in FILTER_TYPES:
            raise ConfigError(
                f"unknown filter_type {self.filter_type!r}; use one of {', '.join(FILTER_TYPES)}"
            )
        sliding = self.enable_hash_filter and self.filter_type == "sliding_hash_filter"
        if sliding and self.capacity > MAX_FILTER_CAPACITY:
            raise ConfigError(
                f"sliding hash filter capacity must be <= {MAX_FILTER_CAPACITY}, got "
                f"{self.capacity}; spread the ids over more shards"
            )
        if sliding and self.split_num > MAX_FILES_PER_SAVE:
            raise ConfigError(
                f"sliding hash filter split_num must be <= {MAX_FILES_PER_SAVE} (one file per "
                f"split on save), got {self.split_num}"
            )
        return filter_from_options(
            self.filter_type,
            enable_hash_filter=self.enable_hash_filter,
            config=self.occurrence_threshold_config,
            capacity=self.capacity,
            split_num=self.split_num,
            equal_probability=self.equal_probability,
        )


@dataclass(frozen=True)
class ShardLimits:
    """Most entries, and entry bytes, one shard may hold over all its tables (0 = no limit).

    A write (assign, assign_add, apply_gradients, fused_optimize) whose new ids would
    take the shard past a limit is refused with :class:`ResourceExhaustedError` before
    it changes anything; every distinct id without an entry counts, even one the hash
    filter would hold back. Restores are not limited. Bytes are entry payload
    (:attr:`EmbeddingHashTable.entry_bytes` per entry: values, optimizer state,
    timestamp, id); storage grows by doubling and the id index adds its slots, so the
    process holds more than that.
    """

    max_entries_per_shard: int = 0
    max_bytes_per_shard: int = 0

    def __post_init__(self) -> None:
        if self.max_entries_per_shard < 0 or self.max_bytes_per_shard < 0:
            raise ConfigError(
                "max_entries_per_shard and max_bytes_per_shard must be >= 0 (0 = no limit), "
                f"got {self.max_entries_per_shard} and {self.max_bytes_per_shard}"
            )

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return bool(self.max_entries_per_shard or self.max_bytes_per_shard)


@dataclass
class TableSlot:
    """A table and how it was declared."""

    table: EmbeddingHashTable
    config_bytes: bytes
    hash_filter: str = ""
    extra_restore_names: tuple[str, ...] = ()
    saver_parallel: int = -1


@dataclass
class FilterSlot:
    """A hash filter and its options."""

    hash_filter: HashFilter
    options: FilterOptions


@dataclass(frozen=True)
class TableDescription:
    """One table as :meth:`Shard.describe` reports it."""

    name: str
    dim: int
    num_segments: int
    size: int
    #: Storage the table holds (bytes).
    memory_bytes: int
    #: Its serialized ``EmbeddingHashTableConfig`` (deterministic bytes).
    config_bytes: bytes
    hash_filter: str
    extra_restore_names: tuple[str, ...]
    saver_parallel: int
    #: The table clock (largest ``req_time`` seen).
    max_update_ts: int
    #: Whether its config schedules periodic eviction.
    feature_eviction: bool


@dataclass(frozen=True)
class FilterDescription:
    """One hash filter as :meth:`Shard.describe` reports it (fill, failures and
    capacity are 0 for filters that do not count into cells)."""

    name: str
    filter_type: str
    enabled: bool
    split_num: int
    fill_ratio: float
    failure_count: int
    capacity: int


@dataclass(frozen=True)
class ShardDescription:
    """Everything :meth:`Shard.describe` reports."""

    shard_index: int
    num_shards: int
    tables: list[TableDescription]
    filters: list[FilterDescription]

    @property
    def entries(self) -> int:
        """Entries over all tables."""
        return sum(t.size for t in self.tables)

    @property
    def memory_bytes(self) -> int:
        """Storage over all tables (bytes)."""
        return sum(t.memory_bytes for t in self.tables)


@dataclass
class Shard:
    """Tables and filters of shard ``shard_index`` of ``num_shards``.

    ``limits`` apply to the tables created through :meth:`create_table`.

    Writes (:meth:`assign`, :meth:`assign_add`, :meth:`apply_gradients`,
    :meth:`fused_optimize`) holding a NaN or an infinity in their values, gradients or
    learning rates are refused with :class:`InvalidArgumentError` naming the first bad
    row, before anything changes: one NaN would make a row and its optimizer state NaN
    for good. ``allow_non_finite`` (the server's ``allow_non_finite`` option) accepts
    them. A negative ``global_step`` is refused too (checkpoints cannot carry it).
    """

    shard_index: int = 0
    num_shards: int = 1
    tables: dict[str, TableSlot] = field(default_factory=dict)
    filters: dict[str, FilterSlot] = field(default_factory=dict)
    limits: ShardLimits = field(default_factory=ShardLimits)
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"shard_index must be in [0, num_shards): got {self.shard_index} of "
                f"{self.num_shards}"
            )

    # ---------------------------------------------------------------- creation

    def create_hash_filter(self, name: str, options: FilterOptions) -> bool:
        """Create filter ``name``; True if created, False if it exists with equal options.

        :raises AlreadyExistsError: it exists with different options.
        :raises ConfigError: invalid options.
        """
        _check_name(name, "hash filter")
        _check_stem(name, "hash filter", self.filters)
        existing = self.filters.get(name)
        if existing is not None:
            if existing.options != options:
                raise AlreadyExistsError(
                    f"hash filter {name!r} exists with different options "
                    f"({existing.options}); requested {options}"
                )
            return False
        self.filters[name] = FilterSlot(options.build(), options)
        return True

    def create_table(
        self,
        name: str,
        config: eht.EmbeddingHashTableConfig | bytes,
        *,
        hash_filter: str = "",
        extra_restore_names: Sequence[str] = (),
        saver_parallel: int = -1,
        allow_existing: bool = False,
        monolith_quirks: bool = False,
    ) -> bool:
        """Create table ``name``; True if created.

        :param allow_existing: an existing table with the same config (and the same
            ``monolith_quirks``) is not an error (returns False); without it any
            existing name is ``AlreadyExistsError``.
        :param monolith_quirks: the table reproduces Monolith's C++ where we
            deliberately differ (docs/semantics.md §12; see
            :class:`~ps_server.engine.hash_table.EmbeddingHashTable`).
        :param saver_parallel: files per save (< 0: automatic); at most
            :data:`MAX_FILES_PER_SAVE`.
        :raises AlreadyExistsError: also when another table's name has the same file
            stem (:mod:`ps_server.engine.names`).
        :raises InvalidArgumentError: the name's file stem is a hash filter's.
        :raises ConfigError, UnknownFilterError.
        """
        _check_name(name, "table")
        if reserved_table_stem(name):
            raise InvalidArgumentError(
                f"table name {name!r} is reserved: its checkpoint files would be named like "
                f"hash-filter files ({FILTER_FILE_STEM!r}, {FILTER_FILE_STEM + '_*'!r})"
            )
        _check_stem(name, "table", self.tables)
        if saver_parallel > MAX_FILES_PER_SAVE:
            raise ConfigError(
                f"table {name!r}: saver_parallel (files per save) must be <= "
                f"{MAX_FILES_PER_SAVE}, got {saver_parallel}"
            )
        if isinstance(config, bytes | bytearray):
            try:
                msg = eht.EmbeddingHashTableConfig.FromString(bytes(config))
            except Exception as e:
                raise ConfigError(
                    f"table {name!r}: config is not a serialized EmbeddingHashTableConfig: {e}"
                ) from e
        else:
            msg = config
        config_bytes = msg.SerializeToString(deterministic=True)
        existing = self.tables.get(name)
        if existing is not None:
            same_quirks = existing.table.monolith_quirks == bool(monolith_quirks)
            if allow_existing and existing.config_bytes == config_bytes and same_quirks:
                return False
            raise AlreadyExistsError(
                f"table {name!r} exists already"
                + ("" if not allow_existing
                   else " with a different config" if existing.config_bytes != config_bytes
                   else f" with monolith_quirks={existing.table.monolith_quirks}")
            )
        flt = self.hash_filter(hash_filter).hash_filter if hash_filter else None
        guard = self.check_capacity if self.limits.enabled else None
        table = EmbeddingHashTable(msg, hash_filter=flt, name=name, capacity_guard=guard,
                                   monolith_quirks=bool(monolith_quirks))
        self.tables[name] = TableSlot(
            table, config_bytes, hash_filter, tuple(extra_restore_names), saver_parallel
        )
        return True

    def set_limits(self, limits: ShardLimits) -> None:
        """Apply ``limits`` from now on, to existing tables too."""
        self.limits = limits
        guard = self.check_capacity if limits.enabled else None
        for slot in self.tables.values():
            slot.table.capacity_guard = guard

    def check_capacity(self, table: str, new_entries: int, new_bytes: int) -> None:
        """Refuse a write to ``table`` that would add ``new_entries`` entries of
        ``new_bytes`` payload bytes if the shard would then be past its ``limits``
        (the :data:`~ps_server.engine.hash_table.CapacityGuard` of its tables).

        :raises ResourceExhaustedError: naming the limit and the count it would reach.
        """
        self._check_limits(f"table {table!r}", new_entries, new_bytes)

    def _check_limits(self, what: str, new_entries: int, new_bytes: int) -> None:
        limits = self.limits
        advice = ("; nothing was changed. Evict entries, spread the ids over more shards or "
                  "raise the limit")
        if limits.max_entries_per_shard:
            held = sum(s.table.size() for s in list(self.tables.values()))
            if held + new_entries > limits.max_entries_per_shard:
                raise ResourceExhaustedError(
                    f"{what}: {new_entries:,} new ids would make shard {self.shard_index} "
                    f"hold {held + new_entries:,} entries, above "
                    f"max_entries_per_shard={limits.max_entries_per_shard:,}{advice}"
                )
        if limits.max_bytes_per_shard:
            held = sum(s.table.size() * s.table.entry_bytes for s in list(self.tables.values()))
            if held + new_bytes > limits.max_bytes_per_shard:
                raise ResourceExhaustedError(
                    f"{what}: {new_entries:,} new ids ({new_bytes:,} bytes) would make shard "
                    f"{self.shard_index} hold {held + new_bytes:,} bytes of entries, above "
                    f"max_bytes_per_shard={limits.max_bytes_per_shard:,}{advice}"
                )

    def table(self, name: str) -> EmbeddingHashTable:
        """The table ``name``; :class:`UnknownTableError` if absent."""
        return self.table_slot(name).table

    def table_slot(self, name: str) -> TableSlot:
        """The table ``name`` with its declaration."""
        slot = self.tables.get(name)
        if slot is None:
            # The missing name only: listing every table would hand any caller the
            # shard's whole catalogue (ListTables answers that, under its own token).
            raise UnknownTableError(f"no table named {name!r} on shard {self.shard_index}")
        return slot

    def hash_filter(self, name: str) -> FilterSlot:
        """The filter ``name``; :class:`UnknownFilterError` if absent."""
        slot = self.filters.get(name)
        if slot is None:
            raise UnknownFilterError(
                f"no hash filter named {name!r} on shard {self.shard_index}"
            )
        return slot

    # ---------------------------------------------------------------- one table

    def dim(self, table: str) -> int:
        """Embedding dimension of ``table`` (the width of its lookup rows)."""
        return self.table(table).dim

    def lookup(self, table: str, ids: Any, out: Floats | None = None) -> Floats:
        """``[len(ids), dim]`` embeddings of ``table`` (zeros for missing ids), written
        into ``out`` when given (see :meth:`EmbeddingHashTable.lookup`)."""
        return self.table(table).lookup(ids, out=out)

    def select_entries(self, table: str, ids: Any) -> EntrySelection:
        """The entries of ``ids`` in ``table`` for ``lookup_entry`` (see
        :meth:`EmbeddingHashTable.select_entries`)."""
        return self.table(table).select_entries(ids)

    def assign(self, table: str, ids: Any, values: Any, req_time: int = 0) -> None:
        """Set the embeddings of ``ids`` in ``table`` (see :meth:`EmbeddingHashTable.assign`)."""
        t = self.table(table)
        ids_, vals = self._checked_rows(table, t, ids, values, "values")
        t.assign(ids_, vals, req_time)

    def assign_add(self, table: str, ids: Any, values: Any, req_time: int = 0) -> None:
        """Add ``values`` to the embeddings of ``ids`` in ``table``."""
        t = self.table(table)
        ids_, vals = self._checked_rows(table, t, ids, values, "values")
        t.assign_add(ids_, vals, req_time)

    def _checked_rows(
        self, name: str, table: EmbeddingHashTable, ids: Any, rows: Any, what: str
    ) -> tuple[Ids, Floats]:
        """``ids`` and ``rows`` converted as the table would (same errors), with rows
        holding a NaN or an infinity refused unless ``allow_non_finite``."""
        ids_ = as_ids(ids)
        arr = as_rows_matrix(rows, ids_.shape[0], table.dim, what)
        if not self.allow_non_finite:
            _refuse_non_finite_rows(f"table {name!r}", what, arr, ids_)
        return ids_, arr

    def _check_learning_rates(self, subject: str, learning_rates: Any) -> Any:
        """``learning_rates`` as float32 (unchanged if they do not convert: the table
        says why), a NaN or infinite one refused unless ``allow_non_finite``."""
        try:
            lrs = np.asarray(learning_rates, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            return learning_rates
        if not self.allow_non_finite and not np.isfinite(lrs).all():
            i = int(np.argmin(np.isfinite(lrs)))
            raise BadTensorError(
                f"{subject}: learning rate #{i} is {lrs[i]}, not a finite number; nothing "
                f"was changed{_NON_FINITE_ADVICE}"
            )
        return lrs

    def apply_gradients(
        self,
        table: str,
        ids: Any,
        grads: Any,
        learning_rates: Any,
        global_step: int,
        *,
        enable_dedup: bool = False,
        req_time: int = 0,
    ) -> None:
        """One optimizer step of ``table`` per occurrence of each id (or per distinct id
        with ``enable_dedup``), see :meth:`EmbeddingHashTable.apply_gradients`."""
        t = self.table(table)
        if not t.layout.serving:  # (a SERVING table refuses the call as it is)
            ids, grads = self._checked_rows(table, t, ids, grads, "grads")
            learning_rates = self._check_learning_rates(f"table {table!r}", learning_rates)
            _check_global_step(global_step)
        t.apply_gradients(
            ids, grads, learning_rates, global_step, enable_dedup=enable_dedup,
            req_time=req_time,
        )

    def size(self, table: str) -> int:
        """Entries held by ``table``."""
        return self.table(table).size()

    def entries_page(
        self, table: str, shard_idx: int, num_shards: int, limit: int, offset: int
    ) -> tuple[int, EntrySelection]:
        """A page of ``table``'s entries for ``save_as_tensor`` (see
        :meth:`EmbeddingHashTable.entries_page`)."""
        return self.table(table).entries_page(shard_idx, num_shards, limit, offset)

    def evict_expired(self, table: str) -> tuple[int, int]:
        """Delete ``table``'s expired entries now: ``(deleted, entries left)``."""
        t = self.table(table)
        evicted = evict_expired(t)
        return evicted, t.size()

    # ---------------------------------------------------------------- description

    def describe(self) -> ShardDescription:
        """What the shard holds, table by table and filter by filter, sorted by name.

        Reads sizes without locks: a snapshot that may race concurrent writes (safe:
        each figure is one read). GetShardInfo, the admin Stats and the metrics all
        report from it.
        """
        tables = [
            TableDescription(
                name=name,
                dim=slot.table.dim,
                num_segments=slot.table.num_segments,
                size=slot.table.size(),
                memory_bytes=slot.table.nbytes(),
                config_bytes=slot.config_bytes,
                hash_filter=slot.hash_filter,
                extra_restore_names=slot.extra_restore_names,
                saver_parallel=slot.saver_parallel,
                max_update_ts=slot.table.max_update_ts,
                feature_eviction=slot.table.config.enable_feature_eviction,
            )
            for name, slot in sorted(list(self.tables.items()))
        ]
        filters = []
        for name, fslot in sorted(list(self.filters.items())):
            flt = fslot.hash_filter
            fill, failures, capacity = 0.0, 0, 0
            if isinstance(flt, SlidingHashFilter):
                # Only a sliding filter counts into cells: its elements over its
                # capacity is Monolith's fill rate.
                fill = float(flt.num_elements.sum()) / flt.capacity
                failures, capacity = int(flt.failure_count), int(flt.capacity)
            filters.append(FilterDescription(
                name=name,
                filter_type=fslot.options.filter_type,
                enabled=fslot.options.enable_hash_filter,
                split_num=flt.split_num,
                fill_ratio=fill,
                failure_count=failures,
                capacity=capacity,
            ))
        return ShardDescription(self.shard_index, self.num_shards, tables, filters)

    # ---------------------------------------------------------------- fused ops

    def fused_lookup_size(
        self, table_names: Sequence[str], blocks: Sequence[tuple[int, int]], num_ids: int
    ) -> int:
        """Floats :meth:`fused_lookup` answers for these blocks of ``num_ids`` ids.

        :raises UnknownTableError, InvalidArgumentError, DimMismatchError: as
            :meth:`fused_lookup` would.
        """
        tables = [self.table(n) for n in table_names]
        _block_bounds(blocks, len(tables), num_ids)
        return sum(n * tables[t].dim for t, n in blocks)

    def fused_lookup(
        self, table_names: Sequence[str], blocks: Sequence[tuple[int, int]], ids: Any,
        out: Floats | None = None,
    ) -> Floats:
        """Look up each block ``(table_index, num_ids)`` of ``ids`` in order.

        :param out: a contiguous ``float32`` of :meth:`fused_lookup_size` floats to
            write the answer into (and return).
        :returns: ``float32`` of every block's ``[num_ids, dim_t]`` rows flattened, in
            block order.
        """
        ids_ = as_ids(ids)
        tables = [self.table(n) for n in table_names]
        bounds = _block_bounds(blocks, len(tables), ids_.shape[0])
        if out is None:
            out = np.empty(sum(n * tables[t].dim for t, n in blocks), dtype=np.float32)
        pos = 0
        for (t, n), (lo, hi) in zip(blocks, bounds, strict=True):
            dim = tables[t].dim
            tables[t].lookup(ids_[lo:hi], out=out[pos : pos + n * dim].reshape(n, dim))
            pos += n * dim
        return out

    def fused_optimize(
        self,
        table_names: Sequence[str],
        blocks: Sequence[tuple[int, int]],
        ids: Any,
        grads: Any,
        learning_rates: Any,
        global_step: int,
        *,
        enable_grad_accumulation: bool = False,
        req_time: int = 0,
    ) -> None:
        """Apply gradients block by block; everything is validated before the first block.

        :param grads: ``float32`` of every block's ``[num_ids, dim_t]`` grads flattened.
        :param learning_rates: concatenation of each table's per-segment rates.
        """
        ids_ = as_ids(ids)
        tables = [self.table(n) for n in table_names]
        bounds = _block_bounds(blocks, len(tables), ids_.shape[0])
        flat = np.asarray(grads, dtype=np.float32).reshape(-1)
        want = sum((hi - lo) * tables[t].dim for (t, _), (lo, hi) in zip(blocks, bounds,
                                                                           strict=True))
        if flat.shape[0] != want:
            raise DimMismatchError(
                f"fused grads must hold {want} floats (sum of num_ids x dim per block), "
                f"got {flat.shape[0]}"
            )
        lrs = np.asarray(learning_rates, dtype=np.float32).reshape(-1)
        segs = [t.num_segments for t in tables]
        if lrs.shape[0] != sum(segs):
            raise DimMismatchError(
                f"fused learning rates must hold {sum(segs)} values (one per segment of "
                f"each table), got {lrs.shape[0]}"
            )
        if req_time < 0:
            raise InvalidArgumentError(f"req_time must be >= 0, got {req_time}")
        for t in sorted({t for t, _ in blocks}):
            # Checked here, not by the block's apply_gradients: earlier blocks would
            # already have been applied.
            if tables[t].layout.serving:
                raise ServingEntryError(
                    f"table {table_names[t]!r} (fused table index {t}) has SERVING entries; "
                    "fused_optimize needs TRAINING entries"
                )
        _check_global_step(global_step)
        if not self.allow_non_finite:
            names = ", ".join(repr(n) for n in table_names)
            self._check_learning_rates(f"fused_optimize on tables {names}", lrs)
            _refuse_non_finite_fused(tables, table_names, blocks, bounds, ids_, flat)
        for t in sorted({t for t, _ in blocks}):
            for seg in tables[t].layout.segments:
                if seg.optimizer is not None:
                    seg.optimizer.check_step(int(global_step))
        if not enable_grad_accumulation:
            # Each block is one apply_gradients: its repeat limit, before the first block.
            for (t, _), (lo, hi) in zip(blocks, bounds, strict=True):
                tables[t].check_repeats(ids_[lo:hi])
        if self.limits.enabled:
            # All blocks together, before the first is applied.
            self._check_fused_limits(table_names, tables, blocks, bounds, ids_)
        lr_start = np.concatenate([[0], np.cumsum(segs)]).astype(int)
        pos = 0
        for (t, _), (lo, hi) in zip(blocks, bounds, strict=True):
            n = (hi - lo) * tables[t].dim
            tables[t].apply_gradients(
                ids_[lo:hi],
                flat[pos : pos + n].reshape(hi - lo, tables[t].dim),
                lrs[lr_start[t] : lr_start[t + 1]],
                global_step,
                enable_dedup=enable_grad_accumulation,
                req_time=req_time,
            )
            pos += n

    def _check_fused_limits(
        self,
        table_names: Sequence[str],
        tables: Sequence[EmbeddingHashTable],
        blocks: Sequence[tuple[int, int]],
        bounds: Sequence[tuple[int, int]],
        ids: Any,
    ) -> None:
        new_entries = new_bytes = 0
        for t in sorted({t for t, _ in blocks}):
            parts = [ids[lo:hi] for (b, _), (lo, hi) in zip(blocks, bounds, strict=True)
                     if b == t]
            n = tables[t].count_new(np.concatenate(parts))
            new_entries += n
            new_bytes += n * tables[t].entry_bytes
        if new_entries:
            names = ", ".join(repr(table_names[t]) for t in sorted({t for t, _ in blocks}))
            self._check_limits(f"fused_optimize on tables {names}", new_entries, new_bytes)

    def intercept_gradient(self, filter_name: str, ids: Any, grads: Any) -> Floats:
        """Count each id in the filter (count 1, in order) and zero the grad rows of
        ids not admitted yet (Monolith's forward + backward pair, docs/semantics.md §3.6).

        :param grads: ``[len(ids), m]`` (or flat, viewed as such).
        """
        flt = self.hash_filter(filter_name).hash_filter
        ids_ = as_ids(ids)
        g = np.array(grads, dtype=np.float32)
        n = ids_.shape[0]
        if n == 0:
            return g.reshape(0, 0) if g.size == 0 else _bad_grads(g.shape, n)
        if g.size % n:
            _bad_grads(g.shape, n)
        g = g.reshape(n, g.size // n)
        filtered = flt.should_be_filtered(ids_, None, with_table=False)
        g[filtered] = 0
        return g


_NON_FINITE_ADVICE = (
    ". A NaN or an infinity would make the row and its optimizer state NaN for good; "
    "the shard accepts them only when started with --allow_non_finite"
)


def _refuse_non_finite_rows(subject: str, what: str, rows: Floats, ids: Ids) -> None:
    """:raises BadTensorError: a row of ``rows`` holds a NaN or an infinity, naming
    the first such row, its id and the bad value."""
    # One vectorized pass (numpy's isfinite is SIMD: faster than a summing shortcut,
    # 0.25 ms for 65,536 x 32); rows are looked at only when something is wrong.
    finite = np.isfinite(rows)
    if finite.all():
        return
    bad = ~finite.all(axis=1)
    row = int(np.argmax(bad))
    col = int(np.argmin(finite[row]))
    raise BadTensorError(
        f"{subject}: {what} row {row} (id {int(ids[row])}) holds {rows[row, col]} at column "
        f"{col}, not a finite number ({int(bad.sum())} of {rows.shape[0]} rows hold NaN or "
        f"infinity); nothing was changed{_NON_FINITE_ADVICE}"
    )


def _refuse_non_finite_fused(
    tables: Sequence[EmbeddingHashTable],
    table_names: Sequence[str],
    blocks: Sequence[tuple[int, int]],
    bounds: Sequence[tuple[int, int]],
    ids: Ids,
    flat: Floats,
) -> None:
    """:raises BadTensorError: the fused grads hold a NaN or an infinity, naming the
    first bad row: its block, table, id and position in the request's ids."""
    finite = np.isfinite(flat)
    if finite.all():
        return
    first = int(np.argmin(finite))
    pos = 0
    for i, ((t, _), (lo, hi)) in enumerate(zip(blocks, bounds, strict=True)):
        n = (hi - lo) * tables[t].dim
        if first < pos + n:
            row = (first - pos) // tables[t].dim
            raise BadTensorError(
                f"fused_optimize: grads of block {i} (table {table_names[t]!r}) row {row} "
                f"(id {int(ids[lo + row])}, row {lo + row} of the request) holds "
                f"{flat[first]}, not a finite number; nothing was changed{_NON_FINITE_ADVICE}"
            )
        pos += n


def _check_global_step(global_step: int) -> None:
    """:raises InvalidArgumentError: a negative ``global_step`` (a checkpoint could
    not be saved under it)."""
    if global_step < 0:
        raise InvalidArgumentError(
            f"apply_gradients needs a non-negative global_step (an int64 >= 0), got "
            f"{global_step}; nothing was changed"
        )


def _bad_grads(shape: tuple[int, ...], n: int) -> Floats:
    raise DimMismatchError(
        f"grads of shape {shape} cannot be viewed as one row per id ({n} ids)"
    )


def _check_name(name: str, what: str) -> None:
    if not name or not isinstance(name, str):
        raise InvalidArgumentError(f"{what} name must be a non-empty string, got {name!r}")
    # Names become file names in checkpoints (255 bytes at most, with part suffixes).
    if "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"{what} name {name[:60]!r}{'...' if len(name) > 60 else ''} must have no NUL "
            "character and at most "
            f"{MAX_NAME_BYTES} bytes (it names checkpoint files), got {len(name.encode())}"
        )


def _check_stem(name: str, what: str, existing: Iterable[str]) -> None:
    """Refuse ``name`` if another live table (filter) has its checkpoint file stem."""
    other = stem_collision(name, existing)
    if other is not None:
        raise AlreadyExistsError(
            f"{what} {name!r} cannot be created: {what} {other!r} exists and both names "
            "map to the same checkpoint file names (':' and '/' are written as '-'); "
            "choose another name"
        )


def _block_bounds(
    blocks: Sequence[tuple[int, int]], num_tables: int, num_ids: int
) -> list[tuple[int, int]]:
    bounds: list[tuple[int, int]] = []
    pos = 0
    for i, (t, n) in enumerate(blocks):
        if not 0 <= t < num_tables:
            raise InvalidArgumentError(
                f"fused block {i} names table index {t}, but {num_tables} table(s) were given"
            )
        if n < 0:
            raise InvalidArgumentError(f"fused block {i} has a negative size {n}")
        bounds.append((pos, pos + n))
        pos += n
    if pos != num_ids:
        raise DimMismatchError(
            f"fused block sizes add up to {pos} ids but {num_ids} ids were given"
        )
    return bounds

