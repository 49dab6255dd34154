"""The async client: one implementation of every client operation.

:class:`AsyncPsClient` connects to the shards (a :class:`ps_client.transport.Transport`),
creates tables and filters on all of them, and hands out the handles that route ids
(:class:`ps_client.AsyncTable`, :class:`ps_client.AsyncHashFilters`). Fused ops
(:mod:`ps_client.fused_ops`) and checkpoints (:mod:`ps_client.checkpoints`) are
orchestrated in their own modules; this class keeps the client's knowledge of which
tables exist. Before its first operation (or at ``await client.connect()``) it checks
that the addresses are exactly one cluster's shards in index order
(:mod:`ps_client.cluster`). :class:`ps_client.PsClient` runs it on a private event-loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import contract
from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from ps_client import checkpoints, cluster, fused_ops
from ps_client.async_hash_filters import AsyncHashFilters
from ps_client.async_table import AsyncTable, TableSpec, check_learning_rate_fns
from ps_client.errors import PsAlreadyExists, PsError, PsInvalidArgument, PsNotFound
from ps_client.fused_ops import FusedLookupResult
from ps_client.graph_meta import HASH_TABLE_METADATA, MetaContext
from ps_client.learning_rate_functions import LearningRate
from ps_client.routing import shard_of
from ps_client.transport import ChannelOptions, RetryPolicy, Transport

_log = logging.getLogger(__name__)


class AsyncPsClient:
    """Client of a monolith-ps cluster (async). Create it inside the running loop.

    :param addresses: ``host:port`` of shard 0, 1, ... (the order is the shard index).
    :param timeout: deadline (s) of each data-plane call, retries included.
    :param file_timeout: deadline (s) of saves, restores and checkpoints.
    :param channel_options: credentials, auth token, message limits, keepalive.
    :param retry: retries of read-only and tagged mutating calls (see
        :mod:`ps_client.transport`).
    :param meta: registry of table names (a fresh one per client by default).
    :param check_cluster: before the first operation, check that ``addresses`` are
        exactly one cluster's shards in index order and name a fresh cluster
        (:meth:`connect`). False skips it: for tools that talk to shards of
        different clusters, or to a shard list that is not a whole cluster, on
        purpose (e.g. tests of a single shard of a larger cluster).
    :ivar transport: the calls to the shards.
    :raises PsInvalidArgument: no addresses.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = 60.0,
        file_timeout: float = 3600.0,
        channel_options: ChannelOptions | None = None,
        retry: RetryPolicy | None = None,
        meta: MetaContext | None = None,
        check_cluster: bool = True,
    ) -> None:
        if isinstance(addresses, str) or not addresses:
            raise PsInvalidArgument(
                f"addresses must be a non-empty list of host:port strings, got {addresses!r}"
            )
        self.transport = Transport(
            addresses, timeout=timeout, file_timeout=file_timeout,
            channel_options=channel_options, retry=retry,
        )
        self.meta = meta or MetaContext()
        self._tables: dict[str, AsyncTable] = {}
        self._fresh = itertools.count()
        self._check_cluster = bool(check_cluster)
        self._cluster_id = ""
        self._connected: asyncio.Future[str] | None = None

    @property
    def addresses(self) -> list[str]:
        """The shards' addresses in shard order."""
        return self.transport.addresses

    @property
    def num_shards(self) -> int:
        """Number of shards of the cluster."""
        return self.transport.num_shards

    def shard_of(self, ids: Any) -> npt.NDArray[np.int64]:
        """Owner shard of every id: ``floormod(ids, num_shards)``."""
        return shard_of(ids, self.num_shards)

    @property
    def cluster_id(self) -> str:
        """The id of the cluster the shards belong to ("" before :meth:`connect`, or
        with ``check_cluster=False``)."""
        return self._cluster_id

    async def connect(self) -> str:
        """Check the cluster (:mod:`ps_client.cluster`) unless ``check_cluster=False``;
        runs once, before the client's first operation if not called. Idempotent: a
        failed check is tried again by the next call.

        :returns: the cluster id ("" with ``check_cluster=False``).
        :raises PsFailedPrecondition: the addresses are not exactly one cluster's
            shards in index order (the message lists what each address said).
        :raises PsError: a shard could not be asked (e.g. ``PsUnavailable``).
        """
        if not self._check_cluster:
            return ""
        if self._connected is None:
            self._connected = asyncio.ensure_future(cluster.connect(self.transport))
        try:
            self._cluster_id = await asyncio.shield(self._connected)
        except BaseException:
            if self._connected.done():
                self._connected = None  # the next operation checks again
            raise
        return self._cluster_id

    async def _ready(self) -> None:
        if self._check_cluster and not self._cluster_id:
            await self.connect()

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled)."""
        await self.transport.close()

    # ------------------------------------------------------------ cluster state

    async def shard_infos(self) -> list[pb.ShardInfo]:
        """``GetShardInfo`` of every shard, in shard order."""
        await self._ready()
        return await self.transport.each("GetShardInfo", pb.ShardInfoRequest())

    async def tables(self) -> list[str]:
        """Sorted names of the tables present on any shard."""
        await self._ready()
        answers = await self.transport.each("ListTables", pb.ListTablesRequest())
        return sorted({n for a in answers for n in a.names})

    def _names(self) -> set[str]:
        names: set[str] = self.meta.get_meta(HASH_TABLE_METADATA, set)
        return names

    # ------------------------------------------------------------ creation and access

    async def create_hash_filters(
        self,
        enable_hash_filter: bool,
        config: Any = b"",
        *,
        capacity: int = contract.DEFAULT_FILTER_CAPACITY,
        split_num: int = contract.DEFAULT_FILTER_SPLIT_NUM,
        equal_probability: bool = False,
        filter_type: str = contract.DEFAULT_FILTER_TYPE,
        name_suffix: str = "",
    ) -> AsyncHashFilters:
        """Create filter ``MonolithHashFilter<name_suffix>`` on every shard.

        Asking again with the same options attaches to the existing filters.

        :param config: ``SlotOccurrenceThresholdConfig`` or its serialized bytes.
        :raises PsInvalidArgument: unknown ``filter_type``, or a bad config.
        :raises PsAlreadyExists: the name exists with other options.
        """
        await self._ready()
        if filter_type not in contract.FILTER_TYPES:
            raise PsInvalidArgument(
                f"unknown filter_type {filter_type!r}; use one of "
                f"{', '.join(contract.FILTER_TYPES)}"
            )
        if isinstance(config, bytes | bytearray):
            config_bytes = bytes(config)
        elif hasattr(config, "SerializeToString"):
            config_bytes = config.SerializeToString(deterministic=True)
        else:
            raise PsInvalidArgument(
                "config must be a SlotOccurrenceThresholdConfig or its serialized bytes, "
                f"got {type(config).__name__}"
            )
        name = f"MonolithHashFilter{name_suffix}"
        await self.transport.each(
            "CreateHashFilter",
            pb.CreateHashFilterRequest(
                name=name, enable_hash_filter=bool(enable_hash_filter),
                occurrence_threshold_config=config_bytes, capacity=int(capacity),
                split_num=int(split_num), equal_probability=bool(equal_probability),
                filter_type=filter_type,
            ),
        )
        enabled = bool(enable_hash_filter) and filter_type != "no_filter"
        return AsyncHashFilters(self.transport, name, enabled, filter_type)

    async def create_table(
        self,
        config: eht.EmbeddingHashTableConfig,
        *,
        name: str | None = None,
        learning_rate_fns: Sequence[LearningRate] = (1.0,),
        hash_filters: AsyncHashFilters | None = None,
        extra_restore_names: Sequence[str] = (),
        saver_parallel: int = -1,
        monolith_quirks: bool = False,
    ) -> AsyncTable:
        """Create a table on every shard.

        :param name: None picks a fresh ``MonolithHashTable_<n>``.
        :param monolith_quirks: the shards reproduce Monolith's C++ where monolith-ps
            deliberately differs (multi-segment stochastic rounding, Group AdaGrad's
            ``0/0``, Adam's restore swap: docs/semantics.md §12); for tables restored
            from Monolith checkpoints that must keep training as Monolith would.
        :raises PsInvalidArgument: not a config, wrong number of learning rates
            (one per segment), or a config the shards reject.
        :raises PsAlreadyExists: the name is used in this client or exists on a shard.
        """
        if not isinstance(config, eht.EmbeddingHashTableConfig):
            raise PsInvalidArgument(
                f"config must be an EmbeddingHashTableConfig, got {type(config).__name__}"
            )
        await self._ready()
        if name is not None and (not isinstance(name, str) or not name):
            raise PsInvalidArgument(f"table name must be a non-empty string, got {name!r}")
        fns = tuple(learning_rate_fns)
        spec_name = name if name is not None else "?"
        check_learning_rate_fns(fns, len(config.entry_config.segments), spec_name)
        names = self._names()
        on_cluster = set(await self.tables())
        if name is None:
            name = next(
                n for n in (f"MonolithHashTable_{i}" for i in self._fresh)
                if n not in names and n not in on_cluster
            )
        if name in names or name in on_cluster:
            raise PsAlreadyExists(
                f"a table named {name!r} exists already"
                + (" on the cluster" if name in on_cluster else " in this client")
            )
        names.add(name)
        spec = TableSpec(
            name=name, config=config, learning_rate_fns=fns,
            hash_filter=hash_filters.name if hash_filters is not None else "",
            extra_restore_names=tuple(extra_restore_names), saver_parallel=int(saver_parallel),
        )
        try:
            await self.transport.each(
                "CreateTable",
                pb.CreateTableRequest(
                    name=name, config=config.SerializeToString(deterministic=True),
                    hash_filter=spec.hash_filter,
                    extra_restore_names=list(spec.extra_restore_names),
                    saver_parallel=spec.saver_parallel, allow_existing=True,
                    monolith_quirks=bool(monolith_quirks),
                ),
            )
        except PsError:
            names.discard(name)
            raise
        table = AsyncTable(self.transport, spec)
        self._tables[name] = table
        return table

    async def table(
        self, name: str, *, learning_rate_fns: Sequence[LearningRate] | None = None
    ) -> AsyncTable:
        """Attach to table ``name``, which must exist on every shard.

        A table this client created or attached to keeps its learning rates unless
        new ones are given; otherwise each segment gets 1.0 by default.

        :raises PsNotFound: (a ``KeyError``) some shard has no table ``name``.
        :raises PsInvalidArgument: wrong number of learning rates.
        """
        known = self._tables.get(name)
        if known is not None and learning_rate_fns is None:
            return known
        return self._attach(name, await self.shard_infos(), learning_rate_fns)

    def _attach(
        self, name: str, infos: Sequence[pb.ShardInfo],
        learning_rate_fns: Sequence[LearningRate] | None,
    ) -> AsyncTable:
        """The handle of table ``name`` as the shards describe it in ``infos``."""
        known = self._tables.get(name)
        found = [next((t for t in i.tables if t.name == name), None) for i in infos]
        missing = [s for s, t in enumerate(found) if t is None]
        if missing:
            where = "any shard" if len(missing) == len(found) else f"shard(s) {missing}"
            raise PsNotFound(f"no table named {name!r} on {where} of the cluster")
        info = found[0]
        assert info is not None
        config = eht.EmbeddingHashTableConfig.FromString(info.config)
        if learning_rate_fns is None:
            fns: tuple[LearningRate, ...] = (
                known.spec.learning_rate_fns if known is not None
                else (1.0,) * len(config.entry_config.segments)
            )
        else:
            fns = tuple(learning_rate_fns)
        check_learning_rate_fns(fns, len(config.entry_config.segments), name)
        spec = TableSpec(
            name=name, config=config, learning_rate_fns=fns, hash_filter=info.hash_filter,
            extra_restore_names=tuple(info.extra_restore_names),
            saver_parallel=int(info.saver_parallel),
        )
        table = AsyncTable(self.transport, spec)
        self._tables[name] = table
        self._names().add(name)
        return table

    # ------------------------------------------------------------ fused ops

    async def fused_lookup(
        self, tables: Sequence[AsyncTable], ids: Any, fused_slot_size: Any,
        num_of_shards: int, req_time: int = 0, *, wire_dtype: str | None = None,
    ) -> FusedLookupResult:
        """Monolith's ``fused_lookup`` over logical tables (see :mod:`ps_client.fused_ops`).

        Block ``i = s * K + t`` holds ``fused_slot_size[i]`` ids of ``tables[t]``; every
        id is read from the real shard that owns it. ``req_time`` is unused, as in
        Monolith.

        :returns: ``(embeddings float32[emb_offsets[-1]], recv_splits int32[N],
            id_offsets int32[K*N+1], emb_offsets int32[K*N+1], indices int64)``, Monolith's
            five outputs; ``indices`` is ``ids`` passed through (int64, values unchanged).
        :param wire_dtype: how the values travel (None: the tables' common
            ``wire_dtype``): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        :raises PsInvalidArgument: sizes that do not match ``ids`` or the tables; an
            unknown ``wire_dtype``, or None for tables whose defaults differ.
        """
        del req_time
        await self._ready()
        return await fused_ops.fused_lookup(
            self.transport, tables, ids, fused_slot_size, num_of_shards, wire_dtype
        )

    async def fused_apply_gradient(
        self, tables: Sequence[AsyncTable], ids: Any, indices: Any, fused_slot_size: Any,
        id_grads: Any, id_offsets: Any, grad_offsets: Any, learning_rate_tensors: Any,
        req_time: int, global_step: int, num_of_shards: int,
        enable_grad_accumulation: bool = False, *, wire_dtype: str | None = None,
    ) -> None:
        """Monolith's ``fused_apply_gradient`` over logical tables (see
        :mod:`ps_client.fused_ops`). ``indices`` is unused, as in Monolith.

        :param wire_dtype: how the grads travel (None: the tables' common
            ``wire_dtype``): ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        :raises PsInvalidArgument: offsets, sizes, grads or rates that do not fit; an
            unknown ``wire_dtype``, or None for tables whose defaults differ.
        """
        del indices
        await self._ready()
        await fused_ops.fused_apply_gradient(
            self.transport, tables, ids, fused_slot_size, id_grads, id_offsets, grad_offsets,
            learning_rate_tensors, req_time, global_step, num_of_shards,
            enable_grad_accumulation, wire_dtype,
        )

    # ------------------------------------------------------------ failed writes

    async def retry(self, error: BaseException) -> None:
        """Finish a write that failed on some shards: resend its original request (same
        tag, same bytes) to every shard that did not apply it; the shards that applied
        are not contacted, so nothing is applied twice.

        :param error: a :class:`PsError` raised by a write (``error.write`` set).
        :raises PsInvalidArgument: ``error`` has no write outcome.
        :raises PsError: some shard failed again (its ``write.applied`` includes the
            shards that applied before).
        """
        await self.transport.retry_write(error)

    # ------------------------------------------------------------ checkpoints

    async def save_checkpoint(
        self, model_dir: str, global_step: int, *, max_to_keep: int = 0
    ) -> str:
        """Every shard writes its part of ``<model_dir>/model.ckpt-<step>`` concurrently;
        then shard 0 writes the manifest and the ``checkpoint`` index (last).

        :param max_to_keep: older checkpoints beyond this many are deleted (0 = keep all).
        :returns: the prefix ``<model_dir>/model.ckpt-<global_step>``.
        """
        await self._ready()
        return await checkpoints.save_checkpoint(
            self.transport, model_dir, global_step, max_to_keep
        )

    async def export_checkpoint(
        self, model_dir: str, global_step: int, *, layout: str = "monolith", num_ps: int = 1
    ) -> str:
        """Write the tables as the checkpoint ``<model_dir>/model.ckpt-<step>`` that a
        Monolith job with ``num_ps`` parameter servers restores (docs/monolith-migration.md,
        "Moving back / exporting to Monolith"): every shard writes its entries regrouped
        by Monolith's routing ``floormod(id, num_ps)``, then shard 0 writes
        ``model.ckpt-<step>.index`` and the ``checkpoint`` index (last).

        :param layout: ``"monolith"`` (one HashTable per table: ``<P>[_<i>]-…``) or
            ``"monolith-multi"`` (one native MultiHashTable per parameter server,
            ``MonolithMultiHashTable_[<i>]``, CpuTraining's default).
        :param num_ps: the Monolith job's parameter-server count; 0 = a single-process
            job (files without a PS suffix).
        :returns: the prefix ``<model_dir>/model.ckpt-<global_step>``.
        """
        await self._ready()
        return await checkpoints.export_checkpoint(
            self.transport, model_dir, global_step, layout, num_ps
        )

    async def restore_checkpoint(
        self, model_dir: str, *, prefix: str | None = None, required: bool = False,
        reset_filters: bool = False,
    ) -> str | None:
        """Restore every table and filter of a checkpoint on every shard, all-or-nothing.

        Shard 0 resolves the checkpoint (``prefix`` or the latest of ``model_dir``);
        every shard then checks its files, and only if all pass do they restore.
        Tables the checkpoint's manifest creates become known to this client.

        :param required: nothing to restore is an error (:class:`PsNotFound`) instead
            of None.
        :param reset_filters: a checkpoint saved by another shard count holds filter
            state that cannot move to the new owner shards; without this such a
            restore raises :class:`PsFailedPrecondition` naming the filters (nothing
            changes), with it the tables are restored and those filters start empty
            (logged at WARNING, named in the result's ``reset_filters``).
        :returns: the restored prefix (a :class:`~ps_client.checkpoints.RestoredCheckpoint`,
            a ``str`` whose ``reset_filters`` names the filters reset), or None when
            ``model_dir`` has no checkpoint (logged at WARNING, naming ``model_dir``: a
            mistyped directory would otherwise start a training from scratch without a
            word).
        """
        await self._ready()
        restored = await checkpoints.restore_checkpoint(self.transport, model_dir, prefix,
                                                        reset_filters=reset_filters)
        if restored is None:
            what = f"no checkpoint to restore in model_dir {model_dir!r}" + (
                f" (prefix {prefix!r})" if prefix else ""
            )
            if required:
                raise PsNotFound(f"{what}, and restore_checkpoint was called with required=True")
            _log.warning("%s: nothing restored, the tables keep their state", what)
            return None
        await self._learn_tables(restored.tables)
        if restored.reset_filters:
            _log.warning("restored %s with hash filter(s) %s reset to empty: their state "
                         "was saved by another shard count (reset_filters=True)",
                         restored.prefix, ", ".join(map(repr, restored.reset_filters)))
        return checkpoints.RestoredCheckpoint(restored.prefix, restored.reset_filters)

    async def _learn_tables(self, names: set[str]) -> None:
        """Make tables restored or created on the shards known to this client."""
        todo = sorted(n for n in names if n not in self._tables)
        if todo:
            infos = await self.shard_infos()
            for name in todo:
                self._attach(name, infos, None)
