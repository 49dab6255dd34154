"""Monolith's ``hash_table_ops`` over a monolith-ps cluster.

Names, positional order and defaults are Monolith's; see :mod:`ps_client.monolith`
for what changes everywhere (no graph, ``client=``, ignored thread arguments). Per name:

* :class:`HashTable` wraps one :class:`ps_client.Table` (one logical table spread over
  every shard). Writes return the handle itself; ``.table`` is the wrapped
  :class:`ps_client.Table` (Monolith's resource tensor), which the fused ops accept.
  ``save(basename)`` makes shard ``i`` write ``<basename>_<i>-%05d-of-%05d``;
  ``restore(basename)`` reads those or Monolith's ``<basename>-%05d-of-%05d`` from any
  number of saving shards or processes.
* ``hash_table_from_config(config, hash_filter=None, name_suffix="", …)`` creates the
  table ``MonolithHashTable_<name_suffix>``; a name already used is ``ValueError``
  (Monolith's ``testNameConflict``). ``config`` is an
  :class:`ps_client.monolith.entry.HashTableConfigInstance` (or a bare
  ``EmbeddingHashTableConfig``, meaning learning rate 1.0 for each segment).
  ``sync_client`` (distributed serving) is not supported: anything but ``None`` raises.
* ``test_hash_table`` / ``vocab_hash_table`` build Monolith's one-segment SGD (or
  Adagrad) test table. Without ``name_suffix`` the table gets a fresh name. Its filter
  is named after the table, so two test tables with different thresholds can live on
  one cluster (Monolith would share one ``MonolithHashFilter`` resource).
* ``fused_lookup`` / ``fused_apply_gradient`` follow the Monolith snapshot of
  ``docs/semantics.md`` (commit ``135c491``): ``fused_lookup`` returns five values
  (``embeddings, recv_splits, id_offsets, emb_offsets, indices``) and
  ``fused_apply_gradient`` takes ``indices`` as its third argument (unused; pass
  ``fused_lookup``'s fifth output). It returns the tables.
* ``extract_slot_from_entry(entries, fid_v2=True)`` parses serialized ``EntryDump`` s
  and returns their slots (``int64``).

Not provided, because they exist only for a TensorFlow graph: ``HashTable.to_proto`` /
``from_proto`` and the meta-graph registration, and the checkpoint listeners
(``HashTableCheckpointSaverListener``, ``HashTableCheckpointRestorerListener``,
``HashTableRestorerSaverLitsener``): use :meth:`ps_client.PsClient.save_checkpoint` and
:meth:`~ps_client.PsClient.restore_checkpoint`. GPU tables (``use_gpu``) are refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from ps_client.client import PsClient, Table
from ps_client.monolith import get_client
from ps_client.monolith.entry import HashTableConfigInstance
from ps_client.monolith.hash_filter_ops import HashFilter

__all__ = [
    "BaseHashTable",
    "HashTable",
    "extract_slot_from_entry",
    "fused_apply_gradient",
    "fused_lookup",
    "hash_table_from_config",
    "test_hash_table",
    "vocab_hash_table",
]

_unique = itertools.count()


def _req_time(req_time: Any) -> int:
    return 0 if req_time is None else int(np.asarray(req_time))


class HashTable:
    """Monolith's ``HashTable`` over one :class:`ps_client.Table`."""

    def __init__(self, table: Table, client: PsClient) -> None:
        self._table = table
        self._client = client

    def __repr__(self) -> str:
        return f"monolith.HashTable({self.name!r}, dim_size={self.dim_size})"

    @property
    def table(self) -> Table:
        """The wrapped :class:`ps_client.Table`."""
        return self._table

    @property
    def client(self) -> PsClient:
        return self._client

    @property
    def name(self) -> str:
        return self._table.name

    @property
    def extra_restore_names(self) -> list[str]:
        return list(self._table.extra_restore_names)

    @property
    def dim_size(self) -> int:
        return self._table.dim_size

    def assign(self, ids: Any, values: Any, req_time: Any = None) -> HashTable:
        """Set the rows of ``ids``; a later duplicate wins."""
        self._table.assign(ids, values, _req_time(req_time))
        return self

    def assign_add(self, ids: Any, values: Any, req_time: Any = None) -> HashTable:
        """Add to the rows of ``ids``; duplicates accumulate."""
        self._table.assign_add(ids, values, _req_time(req_time))
        return self

    def lookup(
        self, ids: Any, use_multi_threads: bool = False, enable_dedup: bool = False
    ) -> npt.NDArray[np.float32]:
        """``float32[len(ids), dim_size]``, zeros for missing ids. Both flags are
        accepted and ignored (they change no value)."""
        return self._table.lookup(ids)

    def lookup_entry(self, ids: Any) -> npt.NDArray[np.object_]:
        """One serialized ``EntryDump`` per id (``b""`` when missing), as an object array."""
        entries = self._table.lookup_entry(ids)
        out = np.empty(len(entries), dtype=object)
        out[:] = entries
        return out

    def apply_gradients(
        self, ids: Any, grads: Any, global_step: Any, use_multi_threads: bool = False,
        enable_dedup: bool = False, req_time: Any = None,
    ) -> HashTable:
        """One optimizer step per occurrence (``enable_dedup``: duplicates summed per
        shard). ``grads`` may be ``[len(ids), dim_size]`` or flat with that many values.
        ``use_multi_threads`` is ignored."""
        n = np.shape(ids)[0] if np.ndim(ids) else 0
        g = np.asarray(grads)
        if g.ndim != 2 and g.size == n * self.dim_size:
            g = g.reshape(n, self.dim_size)
        self._table.apply_gradients(
            ids, g, int(np.asarray(global_step)), enable_dedup=bool(enable_dedup),
            req_time=_req_time(req_time),
        )
        return self

    def as_op(self) -> HashTable:
        """The handle itself: every call has already run."""
        return self

    def table_update(self, update_op: Any) -> HashTable:
        """The handle itself (``update_op`` has already run)."""
        return self

    def save(self, basename: str, random_sleep_ms: int = 0) -> HashTable:
        """Shard ``i`` writes ``<basename>_<i>-…``; ``random_sleep_ms`` is ignored."""
        self._table.save(str(basename))
        return self

    def restore(self, basename: str) -> HashTable:
        """Replace the entries with the files of ``basename`` (all or nothing).

        :raises ps_client.PsNotFound: (``KeyError``) no files.
        """
        self._table.restore(str(basename))
        return self

    def size(self) -> int:
        return self._table.size()

    def save_as_tensor(
        self, shard_idx: int, num_shards: int, limit: int, offset: int
    ) -> tuple[int, npt.NDArray[np.object_]]:
        """``(next offset, serialized EntryDumps)`` of the entries with
        ``floormod(id, num_shards) == shard_idx``; fewer than ``limit`` means done."""
        cursor, dumps = self._table.save_as_tensor(
            int(shard_idx), int(num_shards), int(limit), int(offset))
        out = np.empty(len(dumps), dtype=object)
        out[:] = dumps
        return cursor, out


#: Monolith's abstract base is this one class here.
BaseHashTable = HashTable


def _tables_and_client(
    tables: Sequence[HashTable | Table], client: PsClient | None
) -> tuple[list[Table], PsClient]:
    cores: list[Table] = []
    found = client
    for t in tables:
        if isinstance(t, HashTable):
            cores.append(t.table)
            found = found or t.client
        else:
            cores.append(t)
    return cores, get_client(found)


def fused_lookup(
    tables: Sequence[HashTable | Table], ids: Any, fused_slot_size: Any, num_of_shards: int,
    *, client: PsClient | None = None,
) -> tuple[npt.NDArray[Any], ...]:
    """``(embeddings, recv_splits, id_offsets, emb_offsets, indices)`` of Monolith's
    fused lookup over ``tables`` (``HashTable`` s or their ``.table``)."""
    cores, c = _tables_and_client(tables, client)
    return tuple(c.fused_lookup(cores, ids, fused_slot_size, int(num_of_shards)))


def fused_apply_gradient(
    tables: Sequence[HashTable | Table],
    ids: Any,
    indices: Any,
    fused_slot_size: Any,
    id_grads: Any,
    id_offsets: Any,
    grad_offsets: Any,
    learning_rate_tensors: Any,
    req_time: Any,
    global_step: Any,
    num_of_shards: int,
    enable_grad_accumulation: bool = False,
    *,
    client: PsClient | None = None,
) -> list[HashTable | Table]:
    """Monolith's fused apply-gradient; returns ``tables`` (as a list)."""
    cores, c = _tables_and_client(tables, client)
    c.fused_apply_gradient(
        cores, ids, indices, fused_slot_size, id_grads, id_offsets, grad_offsets,
        learning_rate_tensors, _req_time(req_time), int(np.asarray(global_step)),
        int(num_of_shards), enable_grad_accumulation=bool(enable_grad_accumulation),
    )
    return list(tables)


def hash_table_from_config(
    config: HashTableConfigInstance | eht.EmbeddingHashTableConfig,
    hash_filter: HashFilter | None = None,
    name_suffix: str = "",
    sync_client: Any = None,
    saver_parallel: int = -1,
    *,
    client: PsClient | None = None,
    monolith_quirks: bool = False,
) -> HashTable:
    """Create the table ``MonolithHashTable_<name_suffix>`` on every shard.

    :param monolith_quirks: reproduce Monolith's optimizer bugs that monolith-ps does not
        copy by default (Adam's restore swap, Group AdaGrad's 0/0, multi-segment
        stochastic rounding; ``PsClient.create_table``), e.g. to continue a Monolith
        checkpoint exactly as Monolith would.
    :raises ValueError: the name is taken, or the learning rates do not match the segments.
    :raises NotImplementedError: a ``sync_client`` or a ``gpucuco`` table.
    """
    if sync_client is not None:
        raise NotImplementedError("sync_client (distributed serving) is not supported")
    if isinstance(config, eht.EmbeddingHashTableConfig):
        config = HashTableConfigInstance(
            config, [1.0] * len(config.entry_config.segments))
    if config.table_config.WhichOneof("type") == "gpucuco":
        raise NotImplementedError("gpucuco (GPU) tables are not supported")
    c = get_client(hash_filter.client if hash_filter is not None and client is None
                   else client)
    table = c.create_table(
        config.table_config,
        name="MonolithHashTable_" + name_suffix,
        learning_rate_fns=config.learning_rate_fns,
        hash_filters=None if hash_filter is None else hash_filter.filters,
        extra_restore_names=config.extra_restore_names,
        saver_parallel=saver_parallel,
        monolith_quirks=monolith_quirks,
    )
    return HashTable(table, c)


def test_hash_table(
    dim_size: int,
    enable_hash_filter: bool = False,
    name_suffix: str | None = None,
    learning_rate: Any = 1.0,
    occurrence_threshold: int = 0,
    use_adagrad: bool = False,
    expire_time: int = 36500,
    sync_client: Any = None,
    extra_restore_names: Sequence[str] | None = None,
    use_gpu: bool = False,
    *,
    client: PsClient | None = None,
) -> HashTable:
    """A cuckoo table of one ``dim_size`` segment: SGD (or Adagrad), zeros initializer,
    fp32, ``expire_time`` days, behind its own filter of ``occurrence_threshold``."""
    if use_gpu:
        raise NotImplementedError("gpucuco (GPU) tables are not supported")
    table_config = eht.EmbeddingHashTableConfig()
    table_config.cuckoo.SetInParent()
    segment = table_config.entry_config.segments.add()
    segment.dim_size = dim_size
    if use_adagrad:
        segment.opt_config.adagrad.SetInParent()
    else:
        segment.opt_config.sgd.SetInParent()
    segment.init_config.zeros.SetInParent()
    segment.comp_config.fp32.SetInParent()
    table_config.slot_expire_time_config.default_expire_time = expire_time
    thresholds = eht.SlotOccurrenceThresholdConfig(
        default_occurrence_threshold=occurrence_threshold)
    c = get_client(client)
    if not name_suffix:
        taken = set(c.tables())
        name_suffix = f"test_{next(_unique)}"
        while "MonolithHashTable_" + name_suffix in taken:
            name_suffix = f"test_{next(_unique)}"
    filters = c.create_hash_filters(
        enable_hash_filter is True, thresholds, name_suffix="_" + name_suffix)
    config = HashTableConfigInstance(
        table_config, [learning_rate], extra_restore_names=extra_restore_names)
    return hash_table_from_config(
        config, HashFilter(filters, c), name_suffix, sync_client, client=c)


def vocab_hash_table(
    vocab_size: int, dim_size: int, enable_hash_filter: bool = False,
    learning_rate: Any = 1.0, *, client: PsClient | None = None,
) -> HashTable:
    """``test_hash_table(dim_size, enable_hash_filter, learning_rate=…)``; ``vocab_size``
    is unused (as in Monolith)."""
    return test_hash_table(dim_size, enable_hash_filter, learning_rate=learning_rate,
                           client=client)


def extract_slot_from_entry(entry: Any, fid_v2: bool = True) -> npt.NDArray[np.int64]:
    """Slots of the ids of serialized ``EntryDump`` s: v2 ``(id >> 48) & 0x7FFF``,
    v1 ``id >> 54`` (ids read as unsigned)."""
    items = [entry] if isinstance(entry, bytes | bytearray) else list(entry)
    ids = np.fromiter((eht.EntryDump.FromString(bytes(e)).id for e in items),
                      dtype=np.int64, count=len(items)).view(np.uint64)
    if fid_v2:
        return ((ids >> np.uint64(48)) & np.uint64(0x7FFF)).astype(np.int64)
    return (ids >> np.uint64(54)).astype(np.int64)


# Keep pytest from collecting Monolith's helper as a test when a test module imports it.
test_hash_table.__test__ = False  # type: ignore[attr-defined]
