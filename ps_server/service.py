"""The data plane of one shard: ``monolith_ps.ParameterServer``, a thin translator.

Each RPC turns its request into arrays (:mod:`ps_server.codec`), hands the engine work
to the :class:`~ps_server.runtime.ShardRuntime` (which runs it on its executor under
the right locks, at most once per request tag) and turns the answer back into a
message. Errors become statuses in :func:`~ps_server.status.translate_errors`. There is
no math, no locking and no file handling here. Whole checkpoints are the admin
plane's (:mod:`ps_server.admin`); this plane saves and restores one table or one
filter at a time.

Wire. :func:`add_servicer_to_server` registers the service. The bulk RPCs
(:data:`protos.contract.BULK_RPCS`) receive a :class:`~ps_server.codec.BulkRequest`
(tensors are views of the received bytes), and answers with tensors leave the worker
thread already encoded (:func:`~ps_server.codec.encode_message`), so the event loop
only hands bytes to gRPC.

Exactly once. The writes declared ``IDEMPOTENT`` in the proto (Assign, AssignAdd,
ApplyGradients, FusedOptimize, InterceptGradient) carry a ``RequestTag``; a repeat of
a tag gets the recorded answer (``UpdateResponse.replayed`` set) or error again
without being applied (:meth:`~ps_server.runtime.ShardRuntime.apply_once`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import grpc
import numpy as np

import ps_server
from protos import contract
from protos import ps_service_pb2 as ps_pb2
from protos import ps_service_pb2_grpc as ps_grpc
from protos.wire import FLOAT16, narrow
from ps_server import codec
from ps_server.errors import BadTensorError
from ps_server.runtime import ShardRuntime
from ps_server.status import translate_errors

__all__ = ["SERVICE_NAME", "ParameterServerServicer", "add_servicer_to_server"]

#: Full name of the service (health checks and reflection use it).
SERVICE_NAME: Final = contract.DATA_SERVICE.full_name

_T = TypeVar("_T")


#: Largest float32 scratch a worker thread keeps between half-wire lookups (bytes);
#: bigger answers get a buffer of their own.
_SCRATCH_BYTES: Final = 64 << 20

_scratch = threading.local()


def _rows_scratch(n: int, dim: int) -> np.ndarray[Any, Any]:
    """A float32 ``[n, dim]`` array this worker thread reuses for the rows of a
    half-wire lookup before they are narrowed: a fresh 8 MiB array each call would
    cost its page faults every time."""
    size = n * dim
    if size * 4 > _SCRATCH_BYTES:
        return np.empty((n, dim), dtype=np.float32)
    buf: np.ndarray[Any, Any] | None = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[0] < size:
        buf = _scratch.buf = np.empty(size, dtype=np.float32)
    return buf[:size].reshape(n, dim)


@contextlib.contextmanager
def _float16_overflow_named(wire: np.dtype[Any], grads: np.ndarray[Any, Any]) -> Iterator[None]:
    """A refusal of non-finite grads that came as float16 and hold an infinity says
    that a finite float32 gradient can have become it on the way."""
    try:
        yield
    except BadTensorError as e:
        if wire != FLOAT16 or not np.isinf(grads).any():
            raise
        raise BadTensorError(
            f"{e} (the grads travelled as float16: a finite float32 gradient of "
            "magnitude 65520 or more arrives as an infinity; send bfloat16 or float32)"
        ) from e


def _update(answer: tuple[None, bool]) -> ps_pb2.UpdateResponse:
    return ps_pb2.UpdateResponse(replayed=answer[1])


class ParameterServerServicer(ps_grpc.ParameterServerServicer):
    """``monolith_ps.ParameterServer`` over a :class:`~ps_server.runtime.ShardRuntime`.

    Bulk RPCs get ``request.head`` (the message without its tensors) and
    ``request.tensor(name)`` (a view of a tensor's bytes); ids and rows are decoded on
    the worker thread, inside the work handed to the runtime.
    """

    def __init__(self, runtime: ShardRuntime) -> None:
        self.runtime: Final = runtime
        self._shard = runtime.shard

    async def _apply_once(self, rpc: str, tag: ps_pb2.RequestTag, work: Callable[[], _T],
                          **locks: Any) -> tuple[_T, bool]:
        return await self.runtime.apply_once(rpc, tag.client_id, tag.seq, work, **locks)

    # ------------------------------------------------------------ shard info

    @translate_errors
    async def GetShardInfo(self, request: ps_pb2.ShardInfoRequest, context: Any
                           ) -> ps_pb2.ShardInfo:
        described = await self.runtime.describe()
        return ps_pb2.ShardInfo(
            shard_index=described.shard_index,
            num_shards=described.num_shards,
            version=ps_server.__version__,
            cluster_id=self.runtime.cluster_id,
            tables=[
                ps_pb2.TableInfo(
                    name=t.name, dim_size=t.dim, num_segments=t.num_segments, size=t.size,
                    config=t.config_bytes, hash_filter=t.hash_filter,
                    extra_restore_names=t.extra_restore_names,
                    saver_parallel=t.saver_parallel, max_update_ts=t.max_update_ts,
                    memory_bytes=t.memory_bytes,
                )
                for t in described.tables
            ],
            hash_filters=[
                ps_pb2.HashFilterInfo(
                    name=f.name, filter_type=f.filter_type, enabled=f.enabled,
                    split_num=f.split_num, failure_count=f.failure_count,
                    fill_ratio=f.fill_ratio,
                )
                for f in described.filters
            ],
        )

    @translate_errors
    async def JoinCluster(self, request: ps_pb2.JoinClusterRequest, context: Any
                          ) -> ps_pb2.ShardInfo:
        shard = self._shard
        self.runtime.join_cluster(request.cluster_id, request.shard_index, request.num_shards)
        # The identity only: a client joining learns nothing of tables from it.
        return ps_pb2.ShardInfo(
            shard_index=shard.shard_index, num_shards=shard.num_shards,
            version=ps_server.__version__, cluster_id=self.runtime.cluster_id,
        )

    @translate_errors
    async def ListTables(self, request: ps_pb2.ListTablesRequest, context: Any
                         ) -> ps_pb2.ListTablesResponse:
        names = await self.runtime.run("ListTables", lambda: sorted(self._shard.tables))
        return ps_pb2.ListTablesResponse(names=names)

    # ------------------------------------------------------------ creation

    @translate_errors
    async def CreateHashFilter(self, request: ps_pb2.CreateHashFilterRequest, context: Any
                               ) -> ps_pb2.CreateResponse:
        # proto3 zero values stand for "unset": the runtime's defaults apply.
        created = await self.runtime.create_hash_filter(
            request.name,
            enable_hash_filter=request.enable_hash_filter,
            filter_type=request.filter_type,
            occurrence_threshold_config=request.occurrence_threshold_config,
            capacity=request.capacity,
            split_num=request.split_num,
            equal_probability=request.equal_probability,
        )
        return ps_pb2.CreateResponse(created=created)

    @translate_errors
    async def CreateTable(self, request: ps_pb2.CreateTableRequest, context: Any
                          ) -> ps_pb2.CreateResponse:
        created = await self.runtime.create_table(
            request.name,
            request.config,
            hash_filter=request.hash_filter,
            extra_restore_names=request.extra_restore_names,
            # 0 is proto3's "unset": Monolith's automatic file count (-1).
            saver_parallel=request.saver_parallel or -1,
            allow_existing=request.allow_existing,
            monolith_quirks=request.monolith_quirks,
        )
        return ps_pb2.CreateResponse(created=created)

    # ------------------------------------------------------------ reads

    @translate_errors
    async def Lookup(self, request: codec.BulkRequest[ps_pb2.LookupRequest], context: Any
                     ) -> bytes:
        name = request.head.table
        wire = codec.float_wire(request.head.values_wire, "LookupRequest.values_wire")

        def fill(ids: np.ndarray[Any, Any], values: np.ndarray[Any, Any]) -> None:
            if wire == codec.FLOAT32:
                self._shard.lookup(name, ids, out=values)
            else:  # float32 rows, narrowed into the answer
                rows = _rows_scratch(*values.shape)
                narrow(self._shard.lookup(name, ids, out=rows), wire, out=values)

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            return codec.encode_message_filled(
                ps_pb2.LookupResponse(), "values", (ids.shape[0], self._shard.dim(name)),
                wire, lambda values: fill(ids, values),
            )

        return await self.runtime.run("Lookup", work, tables=[name])

    @translate_errors
    async def LookupEntry(self, request: codec.BulkRequest[ps_pb2.LookupEntryRequest],
                          context: Any) -> bytes:
        name = request.head.table

        def work() -> bytes:
            entries = self.runtime.entry_dumps(name, codec.decode_ids(request.tensor("ids")))
            # Serialized here, once: sizing a message serializes it too.
            return ps_pb2.LookupEntryResponse(entries=entries).SerializeToString()

        return await self.runtime.run("LookupEntry", work, tables=[name])

    @translate_errors
    async def FusedLookup(self, request: codec.BulkRequest[ps_pb2.FusedLookupRequest],
                          context: Any) -> bytes:
        head = request.head
        wire = codec.float_wire(head.values_wire, "FusedLookupRequest.values_wire")

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            blocks = [(b.table_index, b.num_ids) for b in head.blocks]
            names = list(head.tables)
            floats = self._shard.fused_lookup_size(names, blocks, ids.shape[0])

            def fill(values: np.ndarray[Any, Any]) -> None:
                if wire == codec.FLOAT32:
                    self._shard.fused_lookup(names, blocks, ids, out=values)
                else:
                    rows = _rows_scratch(floats, 1).reshape(-1)
                    narrow(self._shard.fused_lookup(names, blocks, ids, out=rows), wire,
                           out=values)

            return codec.encode_message_filled(
                ps_pb2.FusedLookupResponse(), "values", (floats,), wire, fill,
            )

        return await self.runtime.run("FusedLookup", work, tables=head.tables)

    @translate_errors
    async def Size(self, request: ps_pb2.SizeRequest, context: Any) -> ps_pb2.SizeResponse:
        # No table lock: the count is one integer read.
        return ps_pb2.SizeResponse(size=self._shard.size(request.table))

    @translate_errors
    async def SaveAsTensor(self, request: ps_pb2.SaveAsTensorRequest, context: Any) -> bytes:
        def work() -> bytes:
            offset, entries = self.runtime.entry_dump_page(
                request.table, request.shard_idx, request.num_shards, request.limit,
                request.offset,
            )
            # Serialized here, once: sizing a message serializes it too.
            return ps_pb2.SaveAsTensorResponse(offset=offset, entries=entries).SerializeToString()

        return await self.runtime.run("SaveAsTensor", work, tables=[request.table])

    # ------------------------------------------------------------ writes (tagged)

    async def _assign(self, rpc: str, request: codec.BulkRequest[ps_pb2.AssignRequest],
                      assign: Callable[..., None]) -> ps_pb2.UpdateResponse:
        head = request.head

        def work() -> None:
            ids = codec.decode_ids(request.tensor("ids"))
            values = codec.decode_floats(request.tensor("values"), "values", rows=ids.shape[0])
            assign(head.table, ids, values, head.req_time)

        return _update(await self._apply_once(rpc, head.tag, work, tables=[head.table],
                                              table_filters=True))

    @translate_errors
    async def Assign(self, request: codec.BulkRequest[ps_pb2.AssignRequest], context: Any
                     ) -> ps_pb2.UpdateResponse:
        return await self._assign("Assign", request, self._shard.assign)

    @translate_errors
    async def AssignAdd(self, request: codec.BulkRequest[ps_pb2.AssignRequest], context: Any
                        ) -> ps_pb2.UpdateResponse:
        return await self._assign("AssignAdd", request, self._shard.assign_add)

    @translate_errors
    async def ApplyGradients(self, request: codec.BulkRequest[ps_pb2.ApplyGradientsRequest],
                             context: Any) -> ps_pb2.UpdateResponse:
        head = request.head
        wire = codec.float_wire(head.grads_wire, "ApplyGradientsRequest.grads_wire")

        def work() -> None:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads", rows=ids.shape[0],
                                        wire=wire)
            with _float16_overflow_named(wire, grads):
                self._shard.apply_gradients(
                    head.table, ids, grads, np.array(head.learning_rates, dtype=np.float32),
                    head.global_step, enable_dedup=head.enable_dedup, req_time=head.req_time,
                )

        return _update(await self._apply_once("ApplyGradients", head.tag, work,
                                              tables=[head.table], table_filters=True))

    @translate_errors
    async def FusedOptimize(self, request: codec.BulkRequest[ps_pb2.FusedOptimizeRequest],
                            context: Any) -> ps_pb2.UpdateResponse:
        head = request.head
        wire = codec.float_wire(head.grads_wire, "FusedOptimizeRequest.grads_wire")

        def work() -> None:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads", wire=wire)
            with _float16_overflow_named(wire, grads):
                self._shard.fused_optimize(
                    list(head.tables),
                    [(b.table_index, b.num_ids) for b in head.blocks],
                    ids,
                    grads,
                    np.array(head.learning_rates, dtype=np.float32),
                    head.global_step,
                    enable_grad_accumulation=head.enable_grad_accumulation,
                    req_time=head.req_time,
                )

        return _update(await self._apply_once("FusedOptimize", head.tag, work,
                                              tables=head.tables, table_filters=True))

    @translate_errors
    async def InterceptGradient(
        self, request: codec.BulkRequest[ps_pb2.InterceptGradientRequest], context: Any
    ) -> bytes:
        head = request.head

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads", rows=ids.shape[0])
            out = self._shard.intercept_gradient(head.hash_filter, ids, grads)
            return codec.encode_message(ps_pb2.InterceptGradientResponse(), grads=out)

        answer, _ = await self._apply_once("InterceptGradient", head.tag, work,
                                           filters=[head.hash_filter])
        return answer

    # ------------------------------------------------------------ one table's / filter's files

    @translate_errors
    async def SaveTable(self, request: ps_pb2.SaveRequest, context: Any
                        ) -> ps_pb2.SaveResponse:
        result = await self.runtime.save_table(request.table, request.basename)
        return ps_pb2.SaveResponse(files=result.files, entries=result.entries)

    @translate_errors
    async def RestoreTable(self, request: ps_pb2.RestoreRequest, context: Any
                           ) -> ps_pb2.RestoreResponse:
        result = await self.runtime.restore_table(request.table, request.basename,
                                                  validate_only=request.validate_only)
        return ps_pb2.RestoreResponse(entries=result.entries, files=result.files)

    @translate_errors
    async def SaveHashFilter(self, request: ps_pb2.HashFilterFilesRequest, context: Any
                             ) -> ps_pb2.HashFilterFilesResponse:
        files = await self.runtime.save_filter(request.hash_filter, request.basename)
        return ps_pb2.HashFilterFilesResponse(files=files)

    @translate_errors
    async def RestoreHashFilter(self, request: ps_pb2.HashFilterFilesRequest, context: Any
                                ) -> ps_pb2.HashFilterFilesResponse:
        files = await self.runtime.restore_filter(request.hash_filter, request.basename,
                                                  validate_only=request.validate_only)
        return ps_pb2.HashFilterFilesResponse(files=files)


def add_servicer_to_server(servicer: ParameterServerServicer, server: Any) -> None:
    """Register ``servicer`` as ``monolith_ps.ParameterServer`` on ``server``.

    Like the generated ``add_ParameterServerServicer_to_server``, except that the
    :data:`~protos.contract.BULK_RPCS` parse their requests with
    :class:`~ps_server.codec.BulkRequestParser`, every answer may be pre-encoded
    ``bytes`` (:func:`~ps_server.codec.to_wire`), and the methods are not registered
    with ``add_registered_method_handlers``: grpc.aio waits on one pending request
    per registered method for every call it accepts (see ``ps_server.server``), and
    the generic handler serves the same methods.
    """
    handlers = {}
    for method in contract.DATA_SERVICE.methods:
        request_type = getattr(ps_pb2, method.input_type.name)
        deserializer: Callable[[bytes], Any] = (
            codec.BulkRequestParser(request_type) if method.name in contract.BULK_RPCS
            else request_type.FromString
        )
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=deserializer,
            response_serializer=codec.to_wire,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
