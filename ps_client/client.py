"""The synchronous client (docs/api.md): :class:`PsClient`, :class:`Table`, :class:`HashFilters`.

A :class:`PsClient` starts one private thread running an asyncio event loop and an
:class:`ps_client.AsyncPsClient` on it; every method submits the matching
coroutine to that loop and waits for it. There is no second implementation: the
sync classes only translate calls (sync handles in, sync handles out, ``self`` back
from table updates so calls chain). Each method keeps the parameters and defaults
of its async twin; ``tests/unit/test_client_congruence.py`` holds the two faces to
that. A client may be shared by many threads (their calls run concurrently on the
loop). Do not call it from inside a learning-rate function (that runs on the loop
thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from protos import contract
from protos import embedding_hash_table_pb2 as eht
from ps_client.async_client import AsyncPsClient
from ps_client.async_hash_filters import AsyncHashFilters
from ps_client.async_table import AsyncTable, TableSpec
from ps_client.errors import PsInvalidArgument
from ps_client.fused_ops import FusedLookupResult
from ps_client.graph_meta import MetaContext
from ps_client.learning_rate_functions import LearningRate
from ps_client.transport import ChannelOptions, RetryPolicy

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._main, name="ps-client-loop", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a PsClient cannot be called from its own event-loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class PsClient:
    """Client of a monolith-ps cluster: one logical view of all its shards.

    :param addresses: ``host:port`` of shard 0, 1, ... in shard order.
    :param timeout: deadline (s) of every data-plane call, retries included.
    :param credentials: channel credentials for TLS; None = plaintext.
    :param auth_token: sent as ``authorization: Bearer <token>`` on every call.
    :param file_timeout: deadline (s) of saves, restores and checkpoints.
    :param retry: retries of read-only calls and of updates (see
        :class:`ps_client.RetryPolicy`: updates carry a tag the shards deduplicate, so a
        resent update is applied once).
    :param max_message_bytes: largest message sent or accepted (default: the
        servers' default, :data:`protos.contract.MAX_MESSAGE_BYTES`).
    :param check_cluster: at construction, check that ``addresses`` are exactly one
        cluster's shards in index order, and give a fresh cluster its id (see
        :meth:`connect`). False skips the check: only for tools that address shards
        of different clusters, or part of a cluster, on purpose.
    :raises PsInvalidArgument: no addresses.
    :raises PsFailedPrecondition: (``check_cluster``) the addresses are not one
        cluster's shards in index order; the message lists what each address said.
    :raises PsError: (``check_cluster``) a shard could not be asked, e.g.
        ``PsUnavailable`` when one is down.

    Use it as a context manager (``with PsClient(...) as client:``) or call
    :meth:`close`. Inside the ``with`` block the client's metadata registry is the
    current one for :func:`ps_client.graph_meta.get_meta`.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        auth_token: str | None = None,
        file_timeout: float = 3600.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
        check_cluster: bool = True,
    ) -> None:
        if isinstance(addresses, str) or not addresses:
            raise PsInvalidArgument(
                f"addresses must be a non-empty list of host:port strings, got {addresses!r}"
            )
        self._meta = MetaContext()
        self._meta_scopes: list[contextlib.AbstractContextManager[MetaContext]] = []
        self._loop = _LoopThread()
        options = ChannelOptions(
            credentials=credentials, auth_token=auth_token,
            max_message_bytes=int(max_message_bytes),
        )

        async def build() -> AsyncPsClient:
            return AsyncPsClient(
                addresses, timeout=timeout, file_timeout=file_timeout,
                channel_options=options, retry=retry, meta=self._meta,
                check_cluster=check_cluster,
            )

        try:
            self._core = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise
        try:
            self._loop.run(self._core.connect())
        except BaseException:
            self._loop.run(self._core.close())
            self._loop.stop()
            raise
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("this PsClient is closed")
        return self._loop.run(coro)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the channels and stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._core.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> PsClient:
        scope = self._meta.as_current()
        scope.__enter__()
        self._meta_scopes.append(scope)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._meta_scopes:
            self._meta_scopes.pop().__exit__(exc_type, exc, tb)
        self.close()

    def __repr__(self) -> str:
        return f"PsClient({self._core.addresses!r})"

    # ------------------------------------------------------------ routing

    @property
    def addresses(self) -> list[str]:
        """The shards' addresses in shard order."""
        return list(self._core.addresses)

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return self._core.num_shards

    def shard_of(self, ids: Any) -> npt.NDArray[np.int64]:
        """Owner shard of every id: ``floormod(ids, num_shards)`` as ``int64``."""
        return self._core.shard_of(ids)

    @property
    def cluster_id(self) -> str:
        """The id of the cluster the shards belong to ("" with ``check_cluster=False``)."""
        return self._core.cluster_id

    def connect(self) -> str:
        """The cluster check: every address must report its own shard index, the count
        of addresses and one cluster id; shards without an id are given it (a new one for
        a fresh cluster). Done once, at construction, so this only returns its id;
        nothing is checked with ``check_cluster=False``.

        :returns: the cluster id ("" with ``check_cluster=False``).
        :raises PsFailedPrecondition: the addresses are not one cluster's shards in
            index order.
        """
        return self._run(self._core.connect())

    @property
    def meta(self) -> MetaContext:
        """This client's metadata registry (table names under ``"hash_table_metadata"``)."""
        return self._meta

    # ------------------------------------------------------------ creation

    def create_hash_filters(
        self,
        enable_hash_filter: bool,
        config: Any = b"",
        *,
        capacity: int = contract.DEFAULT_FILTER_CAPACITY,
        split_num: int = contract.DEFAULT_FILTER_SPLIT_NUM,
        equal_probability: bool = False,
        filter_type: str = contract.DEFAULT_FILTER_TYPE,
        name_suffix: str = "",
    ) -> HashFilters:
        """One filter per shard, named ``MonolithHashFilter<name_suffix>`` on each.

        :param config: ``SlotOccurrenceThresholdConfig`` or its serialized bytes.
        :param filter_type: ``sliding_hash_filter``, ``probabilistic_filter`` or
            ``no_filter``; ``enable_hash_filter=False`` makes dummy filters.
        :raises PsInvalidArgument: (``ValueError``) unknown ``filter_type``.
        :raises PsAlreadyExists: (``ValueError``) that name exists with other options.
        """
        core = self._run(
            self._core.create_hash_filters(
                enable_hash_filter, config, capacity=capacity, split_num=split_num,
                equal_probability=equal_probability, filter_type=filter_type,
                name_suffix=name_suffix,
            )
        )
        return HashFilters(self, core)

    def create_table(
        self,
        config: eht.EmbeddingHashTableConfig,
        *,
        name: str | None = None,
        learning_rate_fns: Sequence[LearningRate] = (1.0,),
        hash_filters: HashFilters | None = None,
        extra_restore_names: Sequence[str] = (),
        saver_parallel: int = -1,
        monolith_quirks: bool = False,
    ) -> Table:
        """Create one logical table on every shard.

        :param name: None picks a fresh ``MonolithHashTable_<n>``.
        :param learning_rate_fns: one per segment: a number, ``lambda: lr`` or a
            function of the global step (e.g. ``PolynomialDecay``), evaluated at each
            ``apply_gradients``.
        :param hash_filters: the filters consulted before creating entries.
        :param monolith_quirks: reproduce Monolith's C++ where monolith-ps deliberately
            differs (docs/semantics.md §12), e.g. for a table restored from Monolith.
        :raises PsInvalidArgument: (``ValueError``) wrong number of learning rates or a
            config the shards reject.
        :raises PsAlreadyExists: (``ValueError``) the name is already used.
        """
        core = self._run(
            self._core.create_table(
                config, name=name, learning_rate_fns=learning_rate_fns,
                hash_filters=hash_filters._core if hash_filters is not None else None,
                extra_restore_names=extra_restore_names, saver_parallel=saver_parallel,
                monolith_quirks=monolith_quirks,
            )
        )
        return Table(self, core)

    def table(
        self, name: str, *, learning_rate_fns: Sequence[LearningRate] | None = None
    ) -> Table:
        """Attach to table ``name`` existing on the shards.

        :param learning_rate_fns: default: the ones this client created it with, else
            1.0 per segment.
        :raises PsNotFound: (``KeyError``) no table ``name`` on some shard.
        """
        return Table(self, self._run(self._core.table(name, learning_rate_fns=learning_rate_fns)))

    def tables(self) -> list[str]:
        """Sorted names of the tables on the cluster."""
        return self._run(self._core.tables())

    def shard_infos(self) -> list[Any]:
        """Each shard's ``ShardInfo`` message (tables, filters, sizes), in shard order."""
        return self._run(self._core.shard_infos())

    # ------------------------------------------------------------ fused ops

    def fused_lookup(
        self, tables: Sequence[Table], ids: Any, fused_slot_size: Any, num_of_shards: int,
        req_time: int = 0, *, wire_dtype: str | None = None,
    ) -> FusedLookupResult:
        """Monolith's ``fused_lookup`` (docs/semantics.md §7), whatever shard owns each id.

        Block ``i = s * K + t`` (shard-major) holds ``fused_slot_size[i]`` ids of
        ``tables[t]``.

        :returns: ``(embeddings float32, recv_splits int32[N], id_offsets int32[K*N+1],
            emb_offsets int32[K*N+1], indices int64)``, Monolith's five outputs; ``indices``
            is ``ids`` passed through (int64, values unchanged).
        :param wire_dtype: how the values travel (None: the tables' common
            ``wire_dtype``), as for :meth:`Table.lookup`.
        :raises PsInvalidArgument: ``sum(fused_slot_size) != len(ids)`` or bad sizes; an
            unknown ``wire_dtype``, or None for tables whose defaults differ.
        """
        return self._run(
            self._core.fused_lookup(
                _cores(tables), ids, fused_slot_size, num_of_shards, req_time,
                wire_dtype=wire_dtype,
            )
        )

    def fused_apply_gradient(
        self, tables: Sequence[Table], ids: Any, indices: Any, fused_slot_size: Any,
        id_grads: Any, id_offsets: Any, grad_offsets: Any, learning_rate_tensors: Any,
        req_time: int, global_step: int, num_of_shards: int,
        enable_grad_accumulation: bool = False, *, wire_dtype: str | None = None,
    ) -> None:
        """Monolith's ``fused_apply_gradient`` (docs/semantics.md §7), whatever shard owns each id.

        ``learning_rate_tensors`` is the concatenation of every table's per-segment
        rates; ``indices`` is unused.

        :param wire_dtype: how the grads travel (None: the tables' common
            ``wire_dtype``), as for :meth:`Table.apply_gradients`.
        :raises PsInvalidArgument: offsets, sizes, grads or rates that do not fit; an
            unknown ``wire_dtype``, or None for tables whose defaults differ.
        """
        self._run(
            self._core.fused_apply_gradient(
                _cores(tables), ids, indices, fused_slot_size, id_grads, id_offsets,
                grad_offsets, learning_rate_tensors, req_time, global_step, num_of_shards,
                enable_grad_accumulation, wire_dtype=wire_dtype,
            )
        )

    # ------------------------------------------------------------ failed writes

    def retry(self, error: BaseException) -> None:
        """Finish a write (``assign``, ``assign_add``, ``apply_gradients``,
        ``fused_apply_gradient``, ``intercept_gradient``) that failed on some shards.

        Resends the write's original request (same tag, same bytes) to every shard that
        did not answer OK (``error.write.refused`` and ``error.write.unknown``); the
        shards that applied it are not contacted, so no row is applied twice. A shard
        whose outcome was unknown and that did apply answers from its ledger. The
        answers of ``intercept_gradient`` are not returned.

        :param error: the :class:`PsError` the write raised (``error.write`` set).
        :raises PsInvalidArgument: ``error`` has no write outcome.
        :raises PsError: some shard failed again, of the same kind, naming the shards
            (``write.applied`` includes the shards that applied before).
        """
        self._run(self._core.retry(error))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, model_dir: str, global_step: int, *, max_to_keep: int = 0) -> str:
        """Save every table and filter of every shard to ``<model_dir>/model.ckpt-<step>``.

        :param max_to_keep: keep only this many newest checkpoints (0 = all).
        :returns: the checkpoint prefix.
        """
        return self._run(self._core.save_checkpoint(model_dir, global_step,
                                                    max_to_keep=max_to_keep))

    def export_checkpoint(
        self, model_dir: str, global_step: int, *, layout: str = "monolith", num_ps: int = 1
    ) -> str:
        """Write the tables as checkpoint ``<model_dir>/model.ckpt-<step>`` in Monolith's
        files for a job with ``num_ps`` parameter servers (0 = single process), with the
        ``.index`` and ``checkpoint`` files ``tf.train.latest_checkpoint`` needs.

        :param layout: ``"monolith"`` (a HashTable per table) or ``"monolith-multi"``
            (native MultiHashTable).
        :returns: the checkpoint prefix.
        """
        return self._run(self._core.export_checkpoint(model_dir, global_step, layout=layout,
                                                      num_ps=num_ps))

    def restore_checkpoint(
        self, model_dir: str, *, prefix: str | None = None, required: bool = False,
        reset_filters: bool = False,
    ) -> str | None:
        """Restore the latest checkpoint of ``model_dir`` (or ``prefix``) on every shard,
        all-or-nothing; tables it creates become known to this client.

        :param required: nothing to restore raises :class:`ps_client.errors.PsNotFound`
            instead of returning None.
        :param reset_filters: restore a checkpoint saved by another shard count with the
            filters whose state it saved emptied (logged at WARNING) instead of raising
            :class:`ps_client.errors.PsFailedPrecondition`.
        :returns: the restored prefix (a ``str`` whose ``reset_filters`` attribute names
            the filters reset), or None when there is no checkpoint (logged at WARNING,
            naming ``model_dir``).
        """
        return self._run(
            self._core.restore_checkpoint(model_dir, prefix=prefix, required=required,
                                          reset_filters=reset_filters)
        )


def _cores(tables: Sequence[Table | AsyncTable]) -> list[AsyncTable]:
    out: list[AsyncTable] = []
    for t in tables:
        if isinstance(t, Table):
            out.append(t._core)
        elif isinstance(t, AsyncTable):
            out.append(t)
        else:
            raise PsInvalidArgument(f"fused ops take Table objects, got {type(t).__name__}")
    return out


class Table:
    """One logical table spread over all shards (``floormod(id, num_shards)`` owns ``id``).

    Mutating methods return the table itself so calls can be chained.
    """

    def __init__(self, client: PsClient, core: AsyncTable) -> None:
        self._client = client
        self._core = core

    @property
    def name(self) -> str:
        """The table's name (the same on every shard)."""
        return self._core.name

    @property
    def dim_size(self) -> int:
        """Embedding dim (sum of the segments' dims)."""
        return self._core.dim_size

    @property
    def extra_restore_names(self) -> tuple[str, ...]:
        """Other names the table's files may have been saved under."""
        return self._core.extra_restore_names

    @property
    def spec(self) -> TableSpec:
        """Config, learning rates, filter and saver settings of the table."""
        return self._core.spec

    def __repr__(self) -> str:
        return f"Table({self.name!r}, dim_size={self.dim_size})"

    def assign(self, ids: Any, values: Any, req_time: int = 0) -> Table:
        """Set the rows of ``ids`` to ``values`` (``[len(ids), dim_size]``), creating
        missing entries (through the filter); a later duplicate wins.

        :raises PsInvalidArgument: (``ValueError``) shapes that do not match.
        """
        self._client._run(self._core.assign(ids, values, req_time))
        return self

    def assign_add(self, ids: Any, values: Any, req_time: int = 0) -> Table:
        """Add ``values`` to the rows of ``ids``; duplicates accumulate in order."""
        self._client._run(self._core.assign_add(ids, values, req_time))
        return self

    @property
    def wire_dtype(self) -> str:
        """How lookups and gradients travel when a call does not say: ``"float32"``
        (the default), ``"float16"`` or ``"bfloat16"`` (half the bytes, rounded as
        docs/api.md says). Settable; shared by every handle of this table in this client.

        :raises PsInvalidArgument: (``ValueError``) set to another name.
        """
        return self._core.wire_dtype

    @wire_dtype.setter
    def wire_dtype(self, value: str) -> None:
        self._core.wire_dtype = value

    def lookup(self, ids: Any, *, wire_dtype: str | None = None) -> npt.NDArray[np.float32]:
        """``float32[len(ids), dim_size]``; missing ids give zero rows (nothing is created).

        :param wire_dtype: how the values travel (None: :attr:`wire_dtype`):
            ``"float16"`` / ``"bfloat16"`` halve the answer's bytes; each shard rounds its
            float32 rows to that form, and they come back widened to float32.
        :raises PsInvalidArgument: (``ValueError``) an unknown ``wire_dtype``.
        """
        return self._client._run(self._core.lookup(ids, wire_dtype=wire_dtype))

    def lookup_entry(self, ids: Any) -> list[bytes]:
        """One serialized ``EntryDump`` per id (``id`` unset); ``b""`` when missing."""
        return self._client._run(self._core.lookup_entry(ids))

    def apply_gradients(
        self, ids: Any, grads: Any, global_step: int, *, enable_dedup: bool = False,
        req_time: int = 0, wire_dtype: str | None = None,
    ) -> Table:
        """Optimize ``(id, grad)`` pairs in order (each occurrence is one step).

        Learning rates are the table's functions evaluated at ``global_step``. With
        ``enable_dedup`` each owner shard sums duplicate ids' grads and makes one step
        (filter count = occurrences).

        :param wire_dtype: how the grads travel (None: :attr:`wire_dtype`):
            ``"float16"`` / ``"bfloat16"`` round them here to half their bytes; the
            shards widen them back and apply float32 math.
        :raises PsInvalidArgument: (``ValueError``) grads not ``[len(ids), dim_size]``,
            or an unknown ``wire_dtype``.
        """
        self._client._run(
            self._core.apply_gradients(
                ids, grads, global_step, enable_dedup=enable_dedup, req_time=req_time,
                wire_dtype=wire_dtype,
            )
        )
        return self

    def size(self) -> int:
        """Number of entries over all shards."""
        return self._client._run(self._core.size())

    def save(self, basename: str) -> Table:
        """Shard ``i`` writes ``<basename>_<i>-%05d-of-%05d`` (TFRecord of ``EntryDump``)."""
        self._client._run(self._core.save(basename))
        return self

    def restore(self, basename: str) -> Table:
        """Replace the table's entries with the files of ``basename`` (any shard count,
        or Monolith's ``<basename>-…``); all-or-nothing across shards.

        :raises PsNotFound: (``KeyError``) no files; other :class:`PsError` for bad files.
        """
        self._client._run(self._core.restore(basename))
        return self

    def save_as_tensor(
        self, shard_idx: int, num_shards: int, limit: int, offset: int
    ) -> tuple[int, list[bytes]]:
        """Up to ``limit`` ``EntryDump`` (``id`` set) of the entries whose
        ``floormod(id, num_shards) == shard_idx``, from cursor ``offset`` (0 = start).

        The returned cursor is opaque (it encodes the real shard being read and that
        shard's position); fewer than ``limit`` entries means the part is exhausted.
        """
        return self._client._run(self._core.save_as_tensor(shard_idx, num_shards, limit, offset))


class HashFilters:
    """The hash filters of all shards, one per shard, created by
    :meth:`PsClient.create_hash_filters`."""

    def __init__(self, client: PsClient, core: AsyncHashFilters) -> None:
        self._client = client
        self._core = core

    @property
    def name(self) -> str:
        """The filters' name on each shard."""
        return self._core.name

    @property
    def enabled(self) -> bool:
        """False for dummy filters (``enable_hash_filter=False`` or ``no_filter``)."""
        return self._core.enabled

    def __repr__(self) -> str:
        return f"HashFilters({self.name!r})"

    def intercept_gradient(self, ids: Any, grads: Any) -> npt.NDArray[np.float32]:
        """Count each id (in order) on its owner shard; ``grads`` (same shape) with the
        rows of ids not admitted yet zeroed."""
        return self._client._run(self._core.intercept_gradient(ids, grads))

    def save(self, asset_dir: str) -> None:
        """Shard ``i`` writes ``<asset_dir>/hash_filter_<i>-%05d-of-%05d``."""
        self._client._run(self._core.save(asset_dir))

    def restore(self, asset_dir: str) -> None:
        """Load every shard's filter from ``asset_dir``; missing or bad files on any
        shard raise and leave every filter untouched."""
        self._client._run(self._core.restore(asset_dir))

    def save_files(self, basenames: Sequence[str | None]) -> list[str]:
        """Shard ``i`` writes ``<basenames[i]>-%05d-of-%05d`` (None: nothing); returns
        every file written."""
        return self._client._run(self._core.save_files(basenames))

    def restore_files(self, basenames: Sequence[str | None]) -> None:
        """Shard ``i`` loads its filter from ``<basenames[i]>-…`` (None: left as is);
        missing or bad files on any shard raise and leave every filter untouched."""
        self._client._run(self._core.restore_files(basenames))
