"""The async client core: one implementation of every client operation.

:class:`AsyncPsClient` holds one ``grpc.aio`` channel per shard and does all the
work: routing, concurrent fan-out (``asyncio.gather``), deadlines, retries and
reassembly. :class:`ps_client.PsClient` runs it on a private event-loop thread.

Calls:

* every call has a deadline: ``timeout`` (``file_timeout`` for saves, restores
  and checkpoints); a call's retries all fit inside its deadline;
* read-only RPCs (:data:`READ_ONLY`) are retried on ``UNAVAILABLE`` with
  exponential backoff and jitter;
* tagged mutating RPCs (:data:`TAGGED`) carry a ``RequestTag``: this client's random
  id and a sequence number of its own for each request to each shard. The shard
  remembers recent tags and answers a repeat with the first answer, without
  applying it again (``ps_server.dedup``), so these are retried too, with the same
  tag (the very same request bytes): on ``UNAVAILABLE`` and on
  ``DEADLINE_EXCEEDED`` of one attempt, whose deadline
  (:attr:`RetryPolicy.attempt_timeout`) is shorter than the call's, so a lost
  answer leads to a resend. When the retries run out, the error raised
  (``PsUnavailable``, ``PsDeadlineExceeded``) leaves open whether the shard applied
  the update. Limit: a shard restarted between the attempts has an empty ledger
  and applies the resend (see ``ps_server.dedup``);
* other RPCs that change state (creation, saves, restores) are never retried;
* a fan-out waits for every shard before raising the first failure (in shard
  order), so no call is left running when the caller sees an error.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from protos import contract
from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as pb_grpc
from ps_client._codec import Gather, encode_request, read_floats
from ps_client._table import (
    AsyncHashFilters,
    AsyncTable,
    TableSpec,
    check_learning_rate_fns,
)
from ps_client.channel import ChannelOptions, make_channel
from ps_client.errors import (
    PsAlreadyExists,
    PsError,
    PsInvalidArgument,
    PsNotFound,
    error_from_rpc,
)
from ps_client.graph_meta import HASH_TABLE_METADATA, MetaContext
from ps_client.learning_rate_functions import LearningRate
from ps_client.routing import FusedRoute, as_ids, fused_layout, shard_of, to_int32

READ_ONLY = contract.READ_ONLY_RPCS
"""RPCs that change nothing and may be retried (declared in ps_service.proto)."""

TAGGED = contract.TAGGED_RPCS
"""Mutating RPCs whose requests carry a ``RequestTag``: shards apply each at most once,
so they are retried (with the same tag) like reads, and on an attempt's deadline."""

SERVICE_PATH = "/monolith_ps.ParameterServer"

FILTER_TYPES = contract.FILTER_TYPES

FusedLookupResult = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.int32],
    npt.NDArray[np.int32],
]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of read-only calls that fail with ``UNAVAILABLE``, and of tagged
    mutating calls (:data:`TAGGED`) that fail with ``UNAVAILABLE`` or whose attempt
    ran out of time (``DEADLINE_EXCEEDED``).

    Attempt ``k`` (from 1) waits ``min(max_backoff, initial_backoff * multiplier**(k-1))``
    times a random factor in ``[0.5, 1]`` before the next one, as long as that stays
    inside the call's deadline.

    :ivar attempt_timeout: deadline (s) of one attempt of a tagged mutating call (the
        call's own deadline caps it): how long an answer may be missing before the
        request is sent again. A slow attempt cut short costs nothing but the resend:
        the shard finishes the first one and answers the resend with its outcome.
    """

    max_attempts: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    attempt_timeout: float = 20.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt``."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


class AsyncPsClient:
    """Client of a monolith-ps cluster (async). Create it inside the running loop.

    :param addresses: ``host:port`` of shard 0, 1, ... (the order is the shard index).
    :param timeout: deadline (s) of each data-plane call, retries included.
    :param file_timeout: deadline (s) of saves, restores and checkpoints.
    :param channel_options: credentials, auth token, message limits, keepalive.
    :param retry: retries of read-only and tagged mutating calls.
    :param meta: registry of table names (a fresh one per client by default).
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
    ) -> None:
        if isinstance(addresses, str) or not addresses:
            raise PsInvalidArgument(
                f"addresses must be a non-empty list of host:port strings, got {addresses!r}"
            )
        self.addresses = [str(a) for a in addresses]
        self.timeout = float(timeout)
        self.file_timeout = float(file_timeout)
        self.retry = retry or RetryPolicy()
        self.meta = meta or MetaContext()
        self.client_id = uuid.uuid4().hex
        opts = channel_options or ChannelOptions()
        self._metadata = opts.metadata() or None
        self._channels = [make_channel(a, opts) for a in self.addresses]
        self._stubs = [pb_grpc.ParameterServerStub(c) for c in self._channels]
        self._raw: list[dict[str, Callable[..., Any]]] = [{} for _ in self._channels]
        self._seq = itertools.count(1)
        self._tables: dict[str, AsyncTable] = {}
        self._fresh = itertools.count()

    @property
    def num_shards(self) -> int:
        """Number of shards of the cluster."""
        return len(self.addresses)

    def shard_of(self, ids: Any) -> npt.NDArray[np.int64]:
        """Owner shard of every id: ``floormod(ids, num_shards)``."""
        return shard_of(ids, self.num_shards)

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled)."""
        await asyncio.gather(*(c.close() for c in self._channels))

    # ------------------------------------------------------------ transport

    def next_tag(self) -> pb.RequestTag:
        """A fresh tag for a mutating request."""
        return pb.RequestTag(client_id=self.client_id, seq=next(self._seq))

    async def call(
        self, shard: int, method: str, request: Any, *, file_op: bool = False
    ) -> Any:
        """Send ``request`` to ``shard`` with a deadline; retry read-only and tagged
        RPCs (see :class:`RetryPolicy`).

        :param request: a request message (the answer is the response message), or
            request wire bytes (see :mod:`ps_client._codec`; the answer is wire bytes).
            A tagged request is resent as is: same tag.
        :raises PsError: the subclass for the final status code, ``from`` the gRPC error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.file_timeout if file_op else self.timeout)
        tagged = method in TAGGED
        retry_on = (
            (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) if tagged
            else (grpc.StatusCode.UNAVAILABLE,) if method in READ_ONLY
            else ()
        )
        rpc: Callable[..., Any]
        if isinstance(request, bytes):
            rpc = self._raw[shard].get(method) or self._raw[shard].setdefault(
                method, self._channels[shard].unary_unary(f"{SERVICE_PATH}/{method}")
            )
        else:
            rpc = getattr(self._stubs[shard], method)
        attempt = 0
        while True:
            attempt += 1
            remaining = max(deadline - loop.time(), 0.001)
            if tagged:
                remaining = min(remaining, self.retry.attempt_timeout)
            try:
                return await rpc(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() in retry_on and attempt < self.retry.max_attempts:
                    pause = self.retry.delay(attempt)
                    if loop.time() + pause < deadline:
                        await asyncio.sleep(pause)
                        continue
                raise error_from_rpc(err, address=self.addresses[shard], method=method) from err

    async def each(
        self, method: str, requests: Any, *, file_op: bool = False,
        on_answer: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Call ``method`` on every shard concurrently.

        :param requests: one request for all shards, or a list with one per shard
            (None = skip that shard; its answer is None).
        :param on_answer: called as ``on_answer(shard, answer)`` as soon as that
            shard's call succeeds, while the others may still run (e.g. to place a
            big answer while it is in cache); an exception it raises counts as that
            shard's failure.
        :returns: the answers in shard order.
        :raises PsError: the first failure in shard order, after every call ended.
        """
        reqs = requests if isinstance(requests, list) else [requests] * self.num_shards
        live = [s for s, r in enumerate(reqs) if r is not None]

        async def one(shard: int) -> Any:
            answer = await self.call(shard, method, reqs[shard], file_op=file_op)
            if on_answer is not None:
                on_answer(shard, answer)
            return answer

        results = await asyncio.gather(*(one(s) for s in live), return_exceptions=True)
        out: list[Any] = [None] * self.num_shards
        for s, res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                raise res
            out[s] = res
        return out

    # ------------------------------------------------------------ cluster state

    async def shard_infos(self) -> list[pb.ShardInfo]:
        """``GetShardInfo`` of every shard, in shard order."""
        return await self.each("GetShardInfo", pb.ShardInfoRequest())

    async def tables(self) -> list[str]:
        """Sorted names of the tables present on any shard."""
        answers = await self.each("ListTables", pb.ListTablesRequest())
        return sorted({n for a in answers for n in a.names})

    def _names(self) -> set[str]:
        names: set[str] = self.meta.get_meta(HASH_TABLE_METADATA, set)
        return names

    async def create_hash_filters(
        self,
        enable_hash_filter: bool,
        config: Any = b"",
        *,
        capacity: int = 300_000_000,
        split_num: int = 7,
        equal_probability: bool = False,
        filter_type: str = "sliding_hash_filter",
        name_suffix: str = "",
    ) -> AsyncHashFilters:
        """Create filter ``MonolithHashFilter<name_suffix>`` on every shard.

        Asking again with the same options attaches to the existing filters.

        :param config: ``SlotOccurrenceThresholdConfig`` or its serialized bytes.
        :raises PsInvalidArgument: unknown ``filter_type``, or a bad config.
        :raises PsAlreadyExists: the name exists with other options.
        """
        if filter_type not in FILTER_TYPES:
            raise PsInvalidArgument(
                f"unknown filter_type {filter_type!r}; use one of {', '.join(FILTER_TYPES)}"
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
        await self.each(
            "CreateHashFilter",
            pb.CreateHashFilterRequest(
                name=name, enable_hash_filter=bool(enable_hash_filter),
                occurrence_threshold_config=config_bytes, capacity=int(capacity),
                split_num=int(split_num), equal_probability=bool(equal_probability),
                filter_type=filter_type,
            ),
        )
        enabled = bool(enable_hash_filter) and filter_type != "no_filter"
        return AsyncHashFilters(self, name, enabled, filter_type)

    async def create_table(
        self,
        config: eht.EmbeddingHashTableConfig,
        *,
        name: str | None = None,
        learning_rate_fns: Sequence[LearningRate] = (1.0,),
        hash_filters: AsyncHashFilters | None = None,
        extra_restore_names: Sequence[str] = (),
        saver_parallel: int = -1,
    ) -> AsyncTable:
        """Create a table on every shard.

        :param name: None picks a fresh ``MonolithHashTable_<n>``.
        :raises PsInvalidArgument: not a config, wrong number of learning rates
            (one per segment), or a config the shards reject.
        :raises PsAlreadyExists: the name is used in this client or exists on a shard.
        """
        if not isinstance(config, eht.EmbeddingHashTableConfig):
            raise PsInvalidArgument(
                f"config must be an EmbeddingHashTableConfig, got {type(config).__name__}"
            )
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
            await self.each(
                "CreateTable",
                pb.CreateTableRequest(
                    name=name, config=config.SerializeToString(deterministic=True),
                    hash_filter=spec.hash_filter,
                    extra_restore_names=list(spec.extra_restore_names),
                    saver_parallel=spec.saver_parallel, allow_existing=True,
                ),
                )
        except PsError:
            names.discard(name)
            raise
        table = AsyncTable(self, spec)
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
        table = AsyncTable(self, spec)
        self._tables[name] = table
        self._names().add(name)
        return table

    # ------------------------------------------------------------ fused ops

    async def fused_lookup(
        self, tables: Sequence[AsyncTable], ids: Any, fused_slot_size: Any,
        num_of_shards: int, req_time: int = 0,
    ) -> FusedLookupResult:
        """Monolith's ``fused_lookup`` over logical tables (reference §7).

        Block ``i = s * K + t`` holds ``fused_slot_size[i]`` ids of ``tables[t]``; every
        id is read from the real shard that owns it.

        :returns: ``(embeddings float32[emb_offsets[-1]], recv_splits int32[N],
            id_offsets int32[K*N+1], emb_offsets int32[K*N+1])``.
        :raises PsInvalidArgument: sizes that do not match ``ids`` or the tables.
        """
        del req_time  # unused by Monolith too
        ids_ = as_ids(ids)
        names = [t.name for t in tables]
        layout = fused_layout(fused_slot_size, [t.dim_size for t in tables], num_of_shards)
        route = FusedRoute(layout, ids_, self.num_shards)
        requests = [
            encode_request(
                pb.FusedLookupRequest(
                    tables=names,
                    blocks=[pb.FusedBlock(table_index=t, num_ids=c) for t, c in o.blocks],
                ),
                ids=Gather(ids_, o.positions),
            )
            if o.positions.size else None
            for o in route.owners
        ]
        answers = await self.each("FusedLookup", requests)
        flats = [
            read_floats(a, pb.FusedLookupResponse, "values", o.floats, "FusedLookup")
            if a is not None
            else np.zeros(0, dtype=np.float32)
            for a, o in zip(answers, route.owners, strict=True)
        ]
        return (
            route.scatter_floats(flats),
            to_int32(layout.recv_splits, "recv_splits"),
            to_int32(layout.key_off, "id_offsets"),
            to_int32(layout.emb_off, "emb_offsets"),
        )

    async def fused_apply_gradient(
        self, tables: Sequence[AsyncTable], ids: Any, indices: Any, fused_slot_size: Any,
        id_grads: Any, id_offsets: Any, grad_offsets: Any, learning_rate_tensors: Any,
        req_time: int, global_step: int, num_of_shards: int,
        enable_grad_accumulation: bool = False,
    ) -> None:
        """Monolith's ``fused_apply_gradient`` over logical tables (reference §7).

        Block ``i`` (shard ``s``, table ``t``) applies ``id_grads[grad_offsets[i]:
        grad_offsets[i+1]]`` to ``ids[id_offsets[i]:id_offsets[i+1]]`` of ``tables[t]``
        with that table's rates from ``learning_rate_tensors`` (the concatenation of
        every table's per-segment rates). Blocks run in order on each owner shard; with
        ``enable_grad_accumulation`` duplicates inside one block are summed first.
        ``indices`` is unused, as in Monolith.

        :raises PsInvalidArgument: offsets, sizes, grads or rates that do not fit.
        """
        del indices
        ids_ = as_ids(ids)
        names = [t.name for t in tables]
        layout = fused_layout(fused_slot_size, [t.dim_size for t in tables], num_of_shards)
        id_off = layout.check_offsets(
            id_offsets, np.ones_like(layout.sizes), ids_.shape[0], "id_offsets"
        )
        grads = np.ascontiguousarray(np.asarray(id_grads, dtype=np.float32).reshape(-1))
        grad_off = layout.check_offsets(
            grad_offsets, layout.dims[layout.block_tables], grads.shape[0], "grad_offsets"
        )
        lrs = np.asarray(learning_rate_tensors, dtype=np.float32).reshape(-1)
        want_lrs = sum(t.spec.num_segments for t in tables)
        if lrs.shape[0] != want_lrs:
            raise PsInvalidArgument(
                f"learning_rate_tensors must hold {want_lrs} rates (one per segment of each "
                f"table, concatenated), got {lrs.shape[0]}"
            )
        if ids_.shape[0] != layout.num_ids:
            raise PsInvalidArgument(
                f"fused_apply_gradient got {ids_.shape[0]} ids but fused_slot_size adds up to "
                f"{layout.num_ids}"
            )
        logical_ids = (
            ids_ if np.array_equal(id_off, layout.key_off)
            else ids_[id_off[layout.block_of] + layout.within]
        )
        route = FusedRoute(layout, logical_ids, self.num_shards)
        num_tables = len(tables)
        requests: list[Any] = []
        for o in route.owners:
            if not o.positions.size and req_time <= 0:
                requests.append(None)
                continue
            # With req_time > 0 every table's clock moves on every shard, as when
            # Monolith calls apply_gradients on every (shard, table) block, empty or not:
            # tables this shard got no ids of get an empty block.
            blocks = list(o.blocks)
            if req_time > 0:
                seen = {t for t, _ in blocks}
                blocks += [(t, 0) for t in range(num_tables) if t not in seen]
            requests.append(
                encode_request(
                    pb.FusedOptimizeRequest(
                        tables=names,
                        blocks=[pb.FusedBlock(table_index=t, num_ids=c) for t, c in blocks],
                        learning_rates=lrs.tolist(), global_step=int(global_step),
                        enable_grad_accumulation=bool(enable_grad_accumulation),
                        req_time=int(req_time), tag=self.next_tag(),
                    ),
                    ids=Gather(logical_ids, o.positions),
                    grads=grads[route.float_index(o.positions, grad_off)],
                )
            )
        await self.each("FusedOptimize", requests)

    # ------------------------------------------------------------ checkpoints

    async def save_checkpoint(
        self, model_dir: str, global_step: int, *, max_to_keep: int = 0
    ) -> str:
        """Every shard writes its part of ``<model_dir>/model.ckpt-<step>`` concurrently;
        then shard 0 writes the manifest and the ``checkpoint`` index (last).

        :param max_to_keep: older checkpoints beyond this many are deleted (0 = keep all).
        :returns: the prefix ``<model_dir>/model.ckpt-<global_step>``.
        """
        request = pb.CheckpointRequest(
            model_dir=model_dir, global_step=int(global_step), max_to_keep=int(max_to_keep)
        )
        await self.each("SaveCheckpoint", request, file_op=True)
        answer = await self.call(0, "CommitCheckpoint", request, file_op=True)
        return str(answer.prefix)

    async def restore_checkpoint(self, model_dir: str, *, prefix: str | None = None) -> str | None:
        """Restore every table and filter of a checkpoint on every shard, all-or-nothing.

        Shard 0 resolves the checkpoint (``prefix`` or the latest of ``model_dir``);
        every shard then checks its files, and only if all pass do they restore.
        Tables the checkpoint's manifest creates become known to this client.

        :returns: the restored prefix, or None when ``model_dir`` has no checkpoint.
        """
        probe = pb.CheckpointRequest(model_dir=model_dir, prefix=prefix or "", validate_only=True)
        first = await self.call(0, "RestoreCheckpoint", probe, file_op=True)
        resolved = str(first.prefix)
        if not resolved:
            return None
        for validate_only in (True, False):
            answers = await self.each(
                "RestoreCheckpoint",
                pb.CheckpointRequest(
                    model_dir=model_dir, prefix=resolved, validate_only=validate_only
                ),
                file_op=True,
            )
        await self._learn_tables({n for a in answers for n in a.tables})
        return resolved

    async def _learn_tables(self, names: set[str]) -> None:
        """Make tables restored or created on the shards known to this client."""
        todo = sorted(n for n in names if n not in self._tables)
        if todo:
            infos = await self.shard_infos()
            for name in todo:
                self._attach(name, infos, None)
