"""Helpers of the fault tests: in-process clusters, exact state fingerprints, oracles.

A *fingerprint* is everything a shard holds, read straight from its engine objects
(the in-process servers share this process) or from an in-process reference
:class:`Shard`: per table its size, clock and every entry's id, values, optimizer
state and timestamp (sorted by id, compared bit for bit), per hash filter every
array and counter of its state. Two fingerprints are equal exactly when the shards
would answer every lookup, update and save the same.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.filters.xorshift import XorShift128Plus
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.shard import FilterOptions, Shard
from tests.integration.conftest import RunningServer, start_inprocess_server

Fingerprint = dict[str, Any]


def table_fingerprint(table: EmbeddingHashTable) -> tuple[Any, ...]:
    """Size, clock and a digest of every entry (ids, values, state, timestamps) by id."""
    cols = table.export_columns(0, table.size())
    order = np.argsort(cols.ids, kind="stable")
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(cols.ids[order]).tobytes())
    digest.update(np.ascontiguousarray(cols.values[order]).tobytes())
    digest.update(np.ascontiguousarray(cols.timestamps[order]).tobytes())
    for state in cols.states:
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(state[name][order]).tobytes())
    return table.size(), table.max_update_ts, digest.hexdigest()


def filter_fingerprint(hash_filter: Any) -> tuple[Any, ...]:
    """Every public array and counter of a filter (and its random generator's state)."""
    out: list[Any] = [type(hash_filter).__name__]
    for name, value in sorted(vars(hash_filter).items()):
        if isinstance(value, np.ndarray):
            out.append((name, value.dtype.str, value.shape,
                        hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()))
        elif isinstance(value, np.random.Generator):
            out.append((name, repr(value.bit_generator.state)))
        elif isinstance(value, XorShift128Plus):
            out.append((name, value.state))
        elif not name.startswith("_") and isinstance(value, int | float | bool | str | bytes):
            out.append((name, value))
    return tuple(out)


def shard_fingerprint(shard: Shard) -> Fingerprint:
    """Tables (declaration and content) and filters (options and state) of a shard."""
    return {
        "tables": {
            name: (slot.config_bytes, slot.hash_filter, slot.extra_restore_names,
                   slot.saver_parallel, table_fingerprint(slot.table))
            for name, slot in sorted(shard.tables.items())
        },
        "filters": {
            name: (slot.options, filter_fingerprint(slot.hash_filter))
            for name, slot in sorted(shard.filters.items())
        },
    }


def without_clocks(fingerprint: Fingerprint) -> Fingerprint:
    """The fingerprint with every table clock left out.

    A restore raises a table's clock to the newest restored timestamp but never
    lowers it (docs/semantics.md §4.3), so after a restore only the entries must equal the
    checkpoint's.
    """
    tables = {
        name: (*decl[:-1], (content[0], content[2]))
        for name, (*decl, content) in fingerprint["tables"].items()
    }
    return {**fingerprint, "tables": tables}


@contextlib.contextmanager
def inprocess_cluster(num_shards: int, **config: Any) -> Iterator[list[RunningServer]]:
    """``num_shards`` in-process shard servers (shard ``i`` of ``num_shards``)."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                start_inprocess_server(shard_index=i, num_shards=num_shards, **config)
            )
            for i in range(num_shards)
        ]


def thresholds(default: int) -> bytes:
    """A serialized ``SlotOccurrenceThresholdConfig`` with one default threshold."""
    return eht.SlotOccurrenceThresholdConfig(
        default_occurrence_threshold=default
    ).SerializeToString()


class Oracle:
    """What each shard of a cluster must hold: one reference :class:`Shard` per shard,
    fed the part of every update its shard owns (``floormod(id, num_shards)``)."""

    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards
        self.shards = [Shard(i, num_shards) for i in range(num_shards)]

    def create_filter(self, name: str, options: FilterOptions) -> None:
        for shard in self.shards:
            shard.create_hash_filter(name, options)

    def create_table(self, name: str, config: eht.EmbeddingHashTableConfig, **kw: Any) -> None:
        for shard in self.shards:
            shard.create_table(name, config, **kw)

    def owned(self, ids: np.ndarray, shard: int) -> np.ndarray:
        """Positions of ``ids`` owned by ``shard``, in order."""
        return np.flatnonzero(np.mod(ids, self.num_shards) == shard)

    def apply_gradients(self, table: str, ids: np.ndarray, grads: np.ndarray, lrs: Sequence[float],
                        step: int, *, req_time: int = 0, shards: Sequence[int] | None = None,
                        **kw: Any) -> None:
        """Apply ``(ids, grads)`` on ``shards`` (default all), each its own ids."""
        for s in range(self.num_shards) if shards is None else shards:
            pick = self.owned(ids, s)
            self.shards[s].table(table).apply_gradients(
                ids[pick], grads[pick], lrs, step, req_time=req_time, **kw)

    def assign(self, table: str, ids: np.ndarray, values: np.ndarray, *, req_time: int = 0
               ) -> None:
        for s in range(self.num_shards):
            pick = self.owned(ids, s)
            self.shards[s].table(table).assign(ids[pick], values[pick], req_time)

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """What a lookup through the client must return."""
        out = np.zeros((ids.shape[0], self.shards[0].table(table).dim), dtype=np.float32)
        for s in range(self.num_shards):
            pick = self.owned(ids, s)
            out[pick] = self.shards[s].table(table).lookup(ids[pick])
        return out

    def snapshot(self) -> list[Shard]:
        """Deep copies of every reference shard."""
        return copy.deepcopy(self.shards)

    def fingerprints(self) -> list[Fingerprint]:
        return [shard_fingerprint(s) for s in self.shards]
