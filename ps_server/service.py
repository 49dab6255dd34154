"""The gRPC face of one shard: ``monolith_ps.ParameterServer`` over a :class:`Shard`.

Each RPC decodes its request (:mod:`ps_server.codec`), calls the engine and encodes
the answer; there is no math here. Errors become status codes in exactly one place,
:func:`_translate_errors`, using :data:`STATUS_BY_ERROR`.

Concurrency. Engine work (numpy) runs on a thread pool, never on the event loop.
Calls on one table are serialized by that table's lock; calls on different tables
run side by side. A call that can count ids in a hash filter (assign, assign_add,
apply_gradients, fused optimize, intercept_gradient) also holds the filter's lock,
since tables may share a filter. Locks are always taken in one global order, so
multi-table calls cannot deadlock. Creating tables or filters and saving or
restoring whole checkpoints hold the shard exclusively. Once started, an engine
call finishes even if its RPC is cancelled, and keeps its locks until then. The
locks live in a :class:`~ps_server.locks.ShardLocks` shared with the admin service
(:mod:`ps_server.admin`) and periodic eviction, so those never interleave with data
RPCs either.

Wire. :func:`add_servicer_to_server` registers the service. The bulk RPCs
(:data:`BULK_RPCS`) receive a :class:`~ps_server.codec.BulkRequest` (tensors are
views of the received bytes) and every data-plane answer leaves the worker thread
already encoded (tensors written once, by :func:`~ps_server.codec.encode_message`),
so the event loop only hands bytes to gRPC.

Exactly once. A mutating request with a ``RequestTag`` (Assign, AssignAdd,
ApplyGradients, FusedOptimize, InterceptGradient) runs at most once per tag: its
outcome is kept in the shard's :class:`~ps_server.dedup.RequestLedger` (recorded
under the request's locks, once the engine call ended, even if the RPC was cancelled
meanwhile), and a repeat gets that answer (``UpdateResponse.replayed`` set) or error
again without being applied. Untagged requests are applied every time.

Checkpoint operations and evictions are reported to an optional
:class:`ShardEvents` (readiness during restores, metrics, the admin Stats history).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

import ps_server
from protos import contract
from protos import ps_service_pb2 as ps_pb2
from protos import ps_service_pb2_grpc as ps_grpc
from ps_server import codec
from ps_server.config import DEFAULT_MAX_MESSAGE_BYTES
from ps_server.dedup import Outcome, RequestLedger
from ps_server.engine.expiry import evict_expired
from ps_server.engine.filters import HashFilter, SlidingHashFilter
from ps_server.engine.shard import DEFAULT_CAPACITY, DEFAULT_SPLIT_NUM, FilterOptions, Shard
from ps_server.errors import (
    AlreadyExistsError,
    CheckpointCorruptError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PathOutsideRootError,
    PsError,
    ResourceExhaustedError,
)
from ps_server.interception import WrappingInterceptor
from ps_server.locks import ShardLocks

__all__ = [
    "BULK_RPCS",
    "SERVICE_NAME",
    "STATUS_BY_ERRNO",
    "STATUS_BY_ERROR",
    "CheckpointOutcome",
    "MalformedRequestGuard",
    "ParameterServerServicer",
    "ShardEvents",
    "TableEvicted",
    "add_servicer_to_server",
    "filter_stats",
    "resolve_path",
    "status_of",
    "translate_errors",
]

_log = logging.getLogger(__name__)

#: Full name of the service (health checks and reflection use it).
SERVICE_NAME: Final = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name

#: RPCs whose requests carry tensors: their handlers get a ``codec.BulkRequest``.
BULK_RPCS: Final = contract.BULK_RPCS

#: The status code of each error family; a subclass takes its nearest listed base.
STATUS_BY_ERROR: Final[Mapping[type[PsError], grpc.StatusCode]] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    CheckpointCorruptError: grpc.StatusCode.DATA_LOSS,
    PathOutsideRootError: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_Code = grpc.StatusCode

#: The status code of the OS errors a request can cause (a full disk, a path that
#: cannot be a file); other ``OSError``\ s are bugs (``INTERNAL``).
STATUS_BY_ERRNO: Final[Mapping[int, grpc.StatusCode]] = {
    errno.ENOSPC: _Code.RESOURCE_EXHAUSTED,
    errno.EDQUOT: _Code.RESOURCE_EXHAUSTED,
    errno.EFBIG: _Code.RESOURCE_EXHAUSTED,
    errno.ENAMETOOLONG: _Code.INVALID_ARGUMENT,
    errno.ENOENT: _Code.NOT_FOUND,
    errno.ENOTDIR: _Code.FAILED_PRECONDITION,
    errno.EISDIR: _Code.FAILED_PRECONDITION,
    errno.EEXIST: _Code.FAILED_PRECONDITION,
    errno.EACCES: _Code.PERMISSION_DENIED,
    errno.EPERM: _Code.PERMISSION_DENIED,
    errno.EROFS: _Code.PERMISSION_DENIED,
}

#: Save/restore paths must be shorter than this many characters (Linux's PATH_MAX)...
MAX_PATH_CHARS: Final = 4096
#: ... and have fewer levels (directories are created one level at a time).
MAX_PATH_DEPTH: Final = 128

# Status details travel in trailers, which gRPC caps at a few KiB.
_MAX_DETAILS_CHARS = 2000

_T = TypeVar("_T")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Servicer = TypeVar("_Servicer")


def status_of(error: PsError) -> grpc.StatusCode:
    """The status code :func:`_translate_errors` sends for ``error``.

    A :class:`PsError` outside every listed family is ``INTERNAL``.
    """
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _details(message: str) -> str:
    if len(message) <= _MAX_DETAILS_CHARS:
        return message
    return message[: _MAX_DETAILS_CHARS - 15] + " ... (truncated)"


async def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, _details(message))
    raise AssertionError("context.abort returned")  # abort always raises


def translate_errors(
    rpc: Callable[[_Servicer, _Req, Any], Awaitable[_Resp]],
) -> Callable[[_Servicer, _Req, Any], Awaitable[_Resp]]:
    """The single place where exceptions become gRPC statuses (decorates every RPC
    method of every servicer of the shard: data plane and admin).

    :class:`PsError` → its :func:`status_of` code with the error's message;
    ``MemoryError`` → ``RESOURCE_EXHAUSTED``; an ``OSError`` listed in
    :data:`STATUS_BY_ERRNO` (e.g. a full disk) → that code, naming the file (or the
    request's ``model_dir`` / ``basename``); anything else is a bug → ``INTERNAL``
    with an opaque message and the traceback in the shard's log.
    """
    name = rpc.__name__

    @functools.wraps(rpc)
    async def wrapper(self: _Servicer, request: _Req, context: Any) -> _Resp:
        _log.debug("%s: start", name)
        try:
            response = await rpc(self, request, context)
            _log.debug("%s: done", name)
            return response
        except grpc.aio.AbortError:
            raise  # already a status; must propagate untouched
        except PsError as e:
            code = status_of(e)
            _log.debug("%s: %s: %s", name, code.name, e)
            await _abort(context, code, str(e))
        except MemoryError:
            _log.exception("%s: out of memory", name)
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{name}: the shard ran out of memory; send smaller batches or add shards",
            )
        except OSError as e:
            code = STATUS_BY_ERRNO.get(e.errno or 0)
            if code is None:
                _log.exception("%s: internal error", name)
                await _abort(context, grpc.StatusCode.INTERNAL,
                             f"{name}: internal error (see the shard's log)")
            _log.warning("%s: %s: %s", name, code.name, e)
            await _abort(context, code, _os_error_details(name, e, request))
        except Exception:
            _log.exception("%s: internal error", name)
            await _abort(
                context, grpc.StatusCode.INTERNAL, f"{name}: internal error (see the shard's log)"
            )

    return wrapper


_translate_errors = translate_errors


def _os_error_details(rpc: str, error: OSError, request: Any) -> str:
    """What failed, on which path, and what to do (for :data:`STATUS_BY_ERRNO` codes)."""
    path = error.filename or getattr(request, "model_dir", "") or getattr(
        request, "basename", "")
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    text = f"{rpc}: {error.strerror or error} ({name}) at {path!r}"
    if STATUS_BY_ERRNO.get(error.errno or 0) == grpc.StatusCode.RESOURCE_EXHAUSTED:
        text += ("; free disk space (or raise the file size limit) or write elsewhere. "
                 "A failed save is not committed: the previous checkpoint stays the latest")
    return text


class _Unparsable:
    """Stands for request bytes that did not parse (deserializers must not raise)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestGuard(WrappingInterceptor):
    """Request bytes that do not parse get ``INVALID_ARGUMENT`` naming the message.

    gRPC answers a deserializer's exception with ``UNKNOWN``; here the deserializer
    of every unary method is wrapped so it never raises, and the call is refused
    before the servicer runs. A parser bug (anything but ``DecodeError``) is logged
    and answered ``INTERNAL``, as :func:`translate_errors` does.
    """

    def wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        inner = handler.unary_unary
        method = full_method.rsplit("/", 1)[-1]

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # handed to ``guarded``: gRPC would say UNKNOWN
                return _Unparsable(e)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                error = request.error
                if not isinstance(error, DecodeError):
                    _log.error("%s: request parser failed", method, exc_info=error)
                    await _abort(context, grpc.StatusCode.INTERNAL,
                                 f"{method}: internal error (see the shard's log)")
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{method}: the request is not a valid protobuf message of "
                             f"the method's request type ({error}); "
                             "check the client's protos")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def resolve_path(path: str, data_root: str, what: str = "path", *, prefix: bool = True) -> str:
    """Where a save/restore ``path`` points, checked against ``data_root``.

    Without a data root the path is used as given. With one, a relative path is
    taken under the root, symlinks are resolved (``realpath``), and the result must
    lie inside the root; for a file-name ``prefix`` (files are ``<path>_...``) it must
    lie strictly inside, for a directory it may be the root itself.

    :raises InvalidArgumentError: empty path, a NUL character in it, or a path of
        :data:`MAX_PATH_CHARS` characters or :data:`MAX_PATH_DEPTH` levels or more.
    :raises PathOutsideRootError: the resolved path escapes the root.
    """
    if not path:
        raise InvalidArgumentError(f"{what} must not be empty")
    if "\0" in path:
        raise InvalidArgumentError(f"{what} {path!r} contains a NUL character")
    if len(path) >= MAX_PATH_CHARS or path.count("/") >= MAX_PATH_DEPTH:
        raise InvalidArgumentError(
            f"{what} is {len(path)} characters and {path.count('/') + 1} levels deep; it "
            f"must be shorter than {MAX_PATH_CHARS} characters and {MAX_PATH_DEPTH} levels"
        )
    if not data_root:
        return path
    root = os.path.realpath(data_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise PathOutsideRootError(
            f"{what} {path!r} resolves to {full!r}, which is outside the data root {root!r}; "
            "use a path under the data root"
        )
    if prefix and full == root:
        raise PathOutsideRootError(
            f"{what} {path!r} is the data root {root!r} itself: its files would land outside "
            "the data root; name a file prefix under it (e.g. 'dir/name')"
        )
    return full


def _checkpoint_module(name: str) -> Any:
    # Imported on first use: the service works (except these RPCs) without them.
    return importlib.import_module(f"ps_server.checkpoint.{name}")


def filter_stats(hash_filter: HashFilter) -> tuple[float, int, int]:
    """``(fill_ratio, failure_count, capacity)`` of a hash filter.

    Only a sliding filter counts into cells: its fill ratio is its elements over its
    capacity (Monolith's ``fill_rate``). Other filters report ``(0.0, 0, 0)``.
    """
    if isinstance(hash_filter, SlidingHashFilter):
        fill = float(hash_filter.num_elements.sum()) / hash_filter.capacity
        return fill, int(hash_filter.failure_count), int(hash_filter.capacity)
    return 0.0, 0, 0


@dataclass(frozen=True)
class CheckpointOutcome:
    """One finished checkpoint operation, as reported to :class:`ShardEvents`.

    :param op: ``save`` | ``commit`` | ``restore`` | ``validate``.
    :param start_time: unix seconds when it started (after the locks were taken).
    :param seconds: how long it ran.
    :param result: the :class:`~ps_server.checkpoint.checkpoints.CheckpointResult`;
        None when it failed.
    :param nbytes: total size of ``result.files`` (0 when it failed).
    :param error: what failed (None when it succeeded).
    """

    op: str
    start_time: float
    seconds: float
    result: Any | None
    nbytes: int
    error: BaseException | None


@dataclass(frozen=True)
class TableEvicted:
    """Outcome of evicting one table: entries deleted and entries left."""

    table: str
    evicted: int
    remaining: int


class ShardEvents(Protocol):
    """What a servicer reports besides its answers (``ps_server.admin.ShardOps``)."""

    def restoring(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a restore changes the shard (readiness is NOT_SERVING)."""
        ...

    def checkpoint_done(self, outcome: CheckpointOutcome) -> None:
        """A checkpoint operation finished (successfully or not)."""
        ...

    def evicted(self, table: str, count: int, trigger: str) -> None:
        """``count`` expired entries were deleted from ``table`` (``trigger``:
        ``admin`` or ``periodic``)."""
        ...


def _files_size(files: Iterable[str]) -> int:
    total = 0
    for path in files:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_size
    return total


#: The recorded outcome of every update that succeeded (their answers are all alike).
_UPDATED: Final = Outcome.succeeded(ps_pb2.UpdateResponse())


def _replay(outcome: Outcome) -> Any:
    """The answer to a repeat of a request that ended with ``outcome`` (raises its error)."""
    answer = outcome.replay()
    if isinstance(answer, ps_pb2.UpdateResponse):
        return ps_pb2.UpdateResponse(replayed=True)
    return answer


class ParameterServerServicer(ps_grpc.ParameterServerServicer):
    """gRPC adapter over one :class:`Shard`: decode, delegate, encode.

    :param shard: the state served.
    :param executor: where engine work runs (the caller owns and shuts it down).
    :param data_root: save/restore paths must resolve inside it ("" = any path).
    :param max_message_bytes: responses larger than this fail with
        ``RESOURCE_EXHAUSTED`` naming the limit (instead of gRPC's generic failure).
    :param locks: the shard's locks (shared with the admin service); None: new ones.
    :param events: told about checkpoint operations and evictions (None: nobody).
    :param default_filter_capacity: sliding filter capacity when a CreateHashFilter
        request leaves it 0.
    :param default_filter_split_num: split count when a request leaves it 0.
    :param ledger: outcomes of recent tagged mutating requests (None: a new one with
        the default limits).
    """

    def __init__(
        self,
        shard: Shard,
        executor: concurrent.futures.Executor,
        *,
        data_root: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        locks: ShardLocks | None = None,
        events: ShardEvents | None = None,
        default_filter_capacity: int = DEFAULT_CAPACITY,
        default_filter_split_num: int = DEFAULT_SPLIT_NUM,
        ledger: RequestLedger | None = None,
    ) -> None:
        self._shard = shard
        self._executor = executor
        self._data_root = data_root
        self._max_message_bytes = max_message_bytes
        self._locks = locks if locks is not None else ShardLocks()
        self._events = events
        self._default_filter_capacity = default_filter_capacity
        self._default_filter_split_num = default_filter_split_num
        self._ledger = ledger if ledger is not None else RequestLedger()

    @property
    def shard(self) -> Shard:
        """The shard served."""
        return self._shard

    @property
    def ledger(self) -> RequestLedger:
        """Outcomes of recent tagged mutating requests (exactly-once updates)."""
        return self._ledger

    # ------------------------------------------------------------ machinery

    @property
    def locks(self) -> ShardLocks:
        """The shard's locks (shared with the admin service and periodic eviction)."""
        return self._locks

    @property
    def data_root(self) -> str:
        """Save/restore paths must resolve inside it ("" = any path)."""
        return self._data_root

    async def call(
        self,
        rpc: str,
        work: Callable[[], _T],
        *,
        tables: Iterable[str] = (),
        table_filters: bool = False,
        filters: Iterable[str] = (),
        exclusive: bool = False,
    ) -> _T:
        """Run ``work`` on the executor holding the locks it needs.

        :param rpc: name used in errors (e.g. an oversized response).
        :param tables: tables ``work`` touches (each must exist: ``NOT_FOUND`` otherwise).
        :param table_filters: also lock the hash filters of ``tables``.
        :param filters: hash filters ``work`` touches.
        :param exclusive: hold the whole shard (creation, whole checkpoints).
        """
        async with self._locks.hold(
            self._shard,
            tables=tables,
            table_filters=table_filters,
            filters=filters,
            exclusive=exclusive,
        ):
            return await self._run(rpc, work)

    _call = call

    def _check_size(self, rpc: str, result: object) -> None:
        """Refuse an answer (encoded ``bytes`` or a message) over ``max_message_bytes``."""
        if isinstance(result, bytes):
            size = len(result)
        elif isinstance(result, Message):
            size = result.ByteSize()
        else:
            return
        if size > self._max_message_bytes:
            raise ResourceExhaustedError(
                f"{rpc}: the response would be {size} bytes, over the shard's "
                f"max_message_bytes={self._max_message_bytes}; ask for fewer ids per "
                "call or raise the limit on both ends"
            )

    async def _run(self, rpc: str, work: Callable[[], _T]) -> _T:
        def checked() -> _T:
            result = work()
            self._check_size(rpc, result)
            return result

        fut = asyncio.get_running_loop().run_in_executor(self._executor, checked)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The engine call cannot be interrupted: keep the locks until it is done.
            while not fut.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            raise

    async def _apply_once(
        self,
        rpc: str,
        tag: ps_pb2.RequestTag,
        work: Callable[[], _T],
        *,
        tables: Iterable[str] = (),
        table_filters: bool = False,
        filters: Iterable[str] = (),
    ) -> _T:
        """:meth:`call` for a mutating ``work``: at most once per ``tag`` (see "Exactly
        once" in the module doc); an untagged request runs every time.

        :raises InvalidArgumentError: the tag was used by another RPC, or its client id
            is too long.
        :raises FailedPreconditionError: the tag is older than its client's window.
        """
        if not tag.client_id or not tag.seq:
            return await self.call(rpc, work, tables=tables, table_filters=table_filters,
                                   filters=filters)
        ledger = self._ledger
        client_id, seq = tag.client_id, tag.seq
        first = await ledger.claim(client_id, seq, rpc)
        if first is not None:
            return _replay(first)
        ended: list[Outcome] = []  # set on the worker thread once the engine call ended

        def recorded() -> _T:
            try:
                result = work()
                self._check_size(rpc, result)
            except Exception as e:
                ended.append(Outcome.failed(e))
                raise
            ended.append(_UPDATED if isinstance(result, ps_pb2.UpdateResponse)
                         else Outcome.succeeded(result))
            return result

        try:
            async with self._locks.hold(self._shard, tables=tables,
                                        table_filters=table_filters, filters=filters):
                try:
                    return await self._run(rpc, recorded)
                finally:
                    if ended:  # also when the RPC was cancelled meanwhile
                        ledger.record(client_id, seq, ended[0])
        finally:
            if not ended:  # refused before the engine ran (e.g. unknown table), cancelled
                ledger.release(client_id, seq)

    def _path(self, path: str, what: str, *, prefix: bool = True) -> str:
        return resolve_path(path, self._data_root, what, prefix=prefix)

    # ------------------------------------------------------------ shard info

    @_translate_errors
    async def GetShardInfo(self, request: ps_pb2.ShardInfoRequest, context: Any
                           ) -> ps_pb2.ShardInfo:
        def work() -> ps_pb2.ShardInfo:
            shard = self._shard
            info = ps_pb2.ShardInfo(
                shard_index=shard.shard_index,
                num_shards=shard.num_shards,
                version=ps_server.__version__,
            )
            for name, slot in sorted(shard.tables.items()):
                t = slot.table
                info.tables.append(ps_pb2.TableInfo(
                    name=name,
                    dim_size=t.dim,
                    num_segments=t.num_segments,
                    size=t.size(),
                    config=slot.config_bytes,
                    hash_filter=slot.hash_filter,
                    extra_restore_names=slot.extra_restore_names,
                    saver_parallel=slot.saver_parallel,
                    max_update_ts=t.max_update_ts,
                    memory_bytes=t.nbytes(),
                ))
            for name, fslot in sorted(shard.filters.items()):
                flt = fslot.hash_filter
                opts = fslot.options
                fill, failures, _ = filter_stats(flt)
                info.hash_filters.append(ps_pb2.HashFilterInfo(
                    name=name,
                    filter_type=opts.filter_type,
                    enabled=opts.enable_hash_filter,
                    split_num=flt.split_num,
                    failure_count=failures,
                    fill_ratio=fill,
                ))
            return info

        # Reads sizes without table locks: a snapshot that may race concurrent writes.
        return await self._call("GetShardInfo", work)

    @_translate_errors
    async def ListTables(self, request: ps_pb2.ListTablesRequest, context: Any
                         ) -> ps_pb2.ListTablesResponse:
        return await self._call(
            "ListTables",
            lambda: ps_pb2.ListTablesResponse(names=sorted(self._shard.tables)),
        )

    # ------------------------------------------------------------ creation

    @_translate_errors
    async def CreateHashFilter(self, request: ps_pb2.CreateHashFilterRequest, context: Any
                               ) -> ps_pb2.CreateResponse:
        # proto3 zero values stand for "unset": the client API's defaults apply.
        options = FilterOptions(
            enable_hash_filter=request.enable_hash_filter,
            filter_type=request.filter_type or "sliding_hash_filter",
            occurrence_threshold_config=request.occurrence_threshold_config,
            capacity=request.capacity or self._default_filter_capacity,
            split_num=request.split_num or self._default_filter_split_num,
            equal_probability=request.equal_probability,
        )
        created = await self._call(
            "CreateHashFilter",
            lambda: self._shard.create_hash_filter(request.name, options),
            exclusive=True,
        )
        return ps_pb2.CreateResponse(created=created)

    @_translate_errors
    async def CreateTable(self, request: ps_pb2.CreateTableRequest, context: Any
                          ) -> ps_pb2.CreateResponse:
        created = await self._call(
            "CreateTable",
            lambda: self._shard.create_table(
                request.name,
                request.config,
                hash_filter=request.hash_filter,
                extra_restore_names=list(request.extra_restore_names),
                # 0 is proto3's "unset": Monolith's automatic file count (-1).
                saver_parallel=request.saver_parallel or -1,
                allow_existing=request.allow_existing,
            ),
            exclusive=True,
        )
        return ps_pb2.CreateResponse(created=created)

    # ------------------------------------------------------------ data plane

    # Bulk RPCs (BULK_RPCS): ``request.head`` is the message without its tensors,
    # ``request.tensor(name)`` a view of a tensor's bytes. Answers with tensors are
    # encoded on the worker thread (codec.encode_message), so they travel as bytes.

    @_translate_errors
    async def Lookup(self, request: codec.BulkRequest[ps_pb2.LookupRequest], context: Any
                     ) -> bytes:
        head = request.head

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            table = self._shard.table(head.table)
            return codec.encode_message_filled(
                ps_pb2.LookupResponse(), "values", (ids.shape[0], table.dim), codec.FLOAT32,
                lambda values: table.lookup(ids, out=values),
            )

        return await self._call("Lookup", work, tables=[head.table])

    @_translate_errors
    async def LookupEntry(self, request: codec.BulkRequest[ps_pb2.LookupEntryRequest],
                          context: Any) -> bytes:
        head = request.head

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            entries = self._shard.table(head.table).lookup_entry(ids)
            # Serialized here, once: sizing a message serializes it too.
            return ps_pb2.LookupEntryResponse(entries=entries).SerializeToString()

        return await self._call("LookupEntry", work, tables=[head.table])

    async def _assign(self, rpc: str, request: codec.BulkRequest[ps_pb2.AssignRequest],
                      add: bool) -> ps_pb2.UpdateResponse:
        head = request.head

        def work() -> ps_pb2.UpdateResponse:
            ids = codec.decode_ids(request.tensor("ids"))
            values = codec.decode_floats(request.tensor("values"), "values", rows=ids.shape[0])
            table = self._shard.table(head.table)
            if add:
                table.assign_add(ids, values, head.req_time)
            else:
                table.assign(ids, values, head.req_time)
            return ps_pb2.UpdateResponse()

        return await self._apply_once(rpc, head.tag, work, tables=[head.table],
                                      table_filters=True)

    @_translate_errors
    async def Assign(self, request: codec.BulkRequest[ps_pb2.AssignRequest], context: Any
                     ) -> ps_pb2.UpdateResponse:
        return await self._assign("Assign", request, add=False)

    @_translate_errors
    async def AssignAdd(self, request: codec.BulkRequest[ps_pb2.AssignRequest], context: Any
                        ) -> ps_pb2.UpdateResponse:
        return await self._assign("AssignAdd", request, add=True)

    @_translate_errors
    async def ApplyGradients(self, request: codec.BulkRequest[ps_pb2.ApplyGradientsRequest],
                             context: Any) -> ps_pb2.UpdateResponse:
        head = request.head

        def work() -> ps_pb2.UpdateResponse:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads", rows=ids.shape[0])
            lrs = np.array(head.learning_rates, dtype=np.float32)
            self._shard.table(head.table).apply_gradients(
                ids,
                grads,
                lrs,
                head.global_step,
                enable_dedup=head.enable_dedup,
                req_time=head.req_time,
            )
            return ps_pb2.UpdateResponse()

        return await self._apply_once("ApplyGradients", head.tag, work, tables=[head.table],
                                      table_filters=True)

    @_translate_errors
    async def FusedLookup(self, request: codec.BulkRequest[ps_pb2.FusedLookupRequest],
                          context: Any) -> bytes:
        head = request.head

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            blocks = [(b.table_index, b.num_ids) for b in head.blocks]
            names = list(head.tables)
            floats = self._shard.fused_lookup_size(names, blocks, ids.shape[0])
            return codec.encode_message_filled(
                ps_pb2.FusedLookupResponse(), "values", (floats,), codec.FLOAT32,
                lambda values: self._shard.fused_lookup(names, blocks, ids, out=values),
            )

        return await self._call("FusedLookup", work, tables=head.tables)

    @_translate_errors
    async def FusedOptimize(self, request: codec.BulkRequest[ps_pb2.FusedOptimizeRequest],
                            context: Any) -> ps_pb2.UpdateResponse:
        head = request.head

        def work() -> ps_pb2.UpdateResponse:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads")
            blocks = [(b.table_index, b.num_ids) for b in head.blocks]
            self._shard.fused_optimize(
                list(head.tables),
                blocks,
                ids,
                grads,
                np.array(head.learning_rates, dtype=np.float32),
                head.global_step,
                enable_grad_accumulation=head.enable_grad_accumulation,
                req_time=head.req_time,
            )
            return ps_pb2.UpdateResponse()

        return await self._apply_once("FusedOptimize", head.tag, work, tables=head.tables,
                                      table_filters=True)

    @_translate_errors
    async def InterceptGradient(
        self, request: codec.BulkRequest[ps_pb2.InterceptGradientRequest], context: Any
    ) -> bytes:
        head = request.head

        def work() -> bytes:
            ids = codec.decode_ids(request.tensor("ids"))
            grads = codec.decode_floats(request.tensor("grads"), "grads", rows=ids.shape[0])
            out = self._shard.intercept_gradient(head.hash_filter, ids, grads)
            return codec.encode_message(ps_pb2.InterceptGradientResponse(), grads=out)

        return await self._apply_once("InterceptGradient", head.tag, work,
                                      filters=[head.hash_filter])

    @_translate_errors
    async def Size(self, request: ps_pb2.SizeRequest, context: Any) -> ps_pb2.SizeResponse:
        # No table lock: the count is one integer read.
        table = self._shard.table(request.table)
        return ps_pb2.SizeResponse(size=table.size())

    @_translate_errors
    async def SaveAsTensor(self, request: ps_pb2.SaveAsTensorRequest, context: Any) -> bytes:
        def work() -> bytes:
            offset, entries = self._shard.table(request.table).save_as_tensor(
                request.shard_idx, request.num_shards, request.limit, request.offset
            )
            # Serialized here, once: sizing a message serializes it too.
            return ps_pb2.SaveAsTensorResponse(offset=offset, entries=entries).SerializeToString()

        return await self._call("SaveAsTensor", work, tables=[request.table])

    # ------------------------------------------------------------ files

    @_translate_errors
    async def Save(self, request: ps_pb2.SaveRequest, context: Any) -> ps_pb2.SaveResponse:
        basename = self._path(request.basename, "basename")

        def work() -> ps_pb2.SaveResponse:
            table_files = _checkpoint_module("table_files")
            slot = self._shard.table_slot(request.table)
            result = table_files.save_table(
                slot.table,
                basename,
                shard_index=self._shard.shard_index,
                nshards=slot.saver_parallel,
            )
            return ps_pb2.SaveResponse(files=result.files, entries=result.entries)

        return await self._call("Save", work, tables=[request.table])

    @_translate_errors
    async def Restore(self, request: ps_pb2.RestoreRequest, context: Any
                      ) -> ps_pb2.RestoreResponse:
        basename = self._path(request.basename, "basename")

        def work() -> ps_pb2.RestoreResponse:
            table_files = _checkpoint_module("table_files")
            result = table_files.restore_table(
                self._shard.table(request.table),
                basename,
                shard_index=self._shard.shard_index,
                num_shards=self._shard.num_shards,
                validate_only=request.validate_only,
            )
            return ps_pb2.RestoreResponse(entries=result.entries, files=result.files)

        return await self._call("Restore", work, tables=[request.table])

    @_translate_errors
    async def SaveHashFilter(self, request: ps_pb2.HashFilterFilesRequest, context: Any
                             ) -> ps_pb2.HashFilterFilesResponse:
        basename = self._path(request.basename, "basename")

        def work() -> ps_pb2.HashFilterFilesResponse:
            filter_dump = _checkpoint_module("filter_dump")
            flt = self._shard.hash_filter(request.hash_filter).hash_filter
            return ps_pb2.HashFilterFilesResponse(files=filter_dump.save_filter(flt, basename))

        return await self._call("SaveHashFilter", work, filters=[request.hash_filter])

    @_translate_errors
    async def RestoreHashFilter(self, request: ps_pb2.HashFilterFilesRequest, context: Any
                                ) -> ps_pb2.HashFilterFilesResponse:
        basename = self._path(request.basename, "basename")

        def work() -> ps_pb2.HashFilterFilesResponse:
            filter_dump = _checkpoint_module("filter_dump")
            flt = self._shard.hash_filter(request.hash_filter).hash_filter
            # validate_only is passed only when set, so a plain restore also works with
            # a restore_filter(hash_filter, basename) that predates the flag.
            extra = {"validate_only": True} if request.validate_only else {}
            files = filter_dump.restore_filter(flt, basename, **extra)
            return ps_pb2.HashFilterFilesResponse(files=files or [])

        return await self._call("RestoreHashFilter", work, filters=[request.hash_filter])

    # ------------------------------------------------------------ checkpoints

    async def _checkpoint(
        self, op: str, work: Callable[[], Any], *, restoring: bool = False
    ) -> tuple[Any, int]:
        """Run a whole-checkpoint ``work`` exclusively; report it to the events.

        :returns: ``(CheckpointResult, total bytes of its files)``.
        """
        events = self._events
        started = time.time()
        t0 = time.perf_counter()

        def measured() -> tuple[Any, int]:
            result = work()
            return result, _files_size(result.files)

        async with (
            events.restoring() if restoring and events is not None
            else contextlib.nullcontext()
        ):
            try:
                result, nbytes = await self.call(op, measured, exclusive=True)
            except BaseException as e:
                if events is not None:
                    events.checkpoint_done(CheckpointOutcome(
                        op, started, time.perf_counter() - t0, None, 0, e))
                raise
        if events is not None:
            events.checkpoint_done(CheckpointOutcome(
                op, started, time.perf_counter() - t0, result, nbytes, None))
        return result, nbytes

    async def save_checkpoint(self, model_dir: str, global_step: int) -> tuple[Any, int]:
        """This shard's part of checkpoint ``global_step`` (see
        :func:`~ps_server.checkpoint.checkpoints.save_shard_checkpoint`).

        :returns: ``(CheckpointResult, bytes written)``.
        :raises InvalidArgumentError: empty ``model_dir`` or a negative step.
        :raises PathOutsideRootError: ``model_dir`` is outside the data root.
        """
        path = self._path(model_dir, "model_dir", prefix=False)
        _check_step(global_step)

        def work() -> Any:
            return _checkpoint_module("checkpoints").save_shard_checkpoint(
                self._shard, path, global_step
            )

        return await self._checkpoint("save", work)

    async def commit_checkpoint(
        self, model_dir: str, global_step: int, max_to_keep: int
    ) -> tuple[Any, int]:
        """Manifest and ``checkpoint`` index of checkpoint ``global_step`` (see
        :func:`~ps_server.checkpoint.checkpoints.commit_checkpoint`).

        :raises InvalidArgumentError: empty ``model_dir``, a negative step or
            ``max_to_keep``.
        """
        path = self._path(model_dir, "model_dir", prefix=False)
        _check_step(global_step)

        def work() -> Any:
            return _checkpoint_module("checkpoints").commit_checkpoint(
                self._shard, path, global_step, max_to_keep
            )

        return await self._checkpoint("commit", work)

    async def restore_checkpoint(
        self, model_dir: str, prefix: str, validate_only: bool
    ) -> tuple[Any, int]:
        """Restore (or validate) a checkpoint into this shard, all or nothing (see
        :func:`~ps_server.checkpoint.checkpoints.restore_shard_checkpoint`).

        While a real restore runs, :meth:`ShardEvents.restoring` is held.

        :param prefix: ``""`` = the latest.
        :returns: ``(CheckpointResult, bytes read)``; the result's prefix is ``""``
            when ``model_dir`` holds no checkpoint.
        """
        path = self._path(model_dir, "model_dir", prefix=False)
        if prefix and not os.path.dirname(prefix):
            # A bare model.ckpt-<step> lies in model_dir (as the checkpoint code takes
            # it), not at the top of the data root.
            prefix = os.path.join(model_dir, prefix)
        resolved = self._path(prefix, "prefix") if prefix else None

        def work() -> Any:
            checkpoints = _checkpoint_module("checkpoints")
            target = resolved
            if target is None and self._data_root:
                # The index is just a file: the checkpoint it names must be in the root too.
                latest = checkpoints.latest_checkpoint(path)
                if latest is not None:
                    target = self._path(latest, f"the latest checkpoint of {model_dir!r}")
            return checkpoints.restore_shard_checkpoint(self._shard, path, target, validate_only)


        op = "validate" if validate_only else "restore"
        return await self._checkpoint(op, work, restoring=not validate_only)

    @staticmethod
    def _checkpoint_response(result: Any) -> ps_pb2.CheckpointResponse:
        return ps_pb2.CheckpointResponse(
            prefix=result.prefix, files=result.files, entries=result.entries,
            tables=result.tables,
        )

    @_translate_errors
    async def SaveCheckpoint(self, request: ps_pb2.CheckpointRequest, context: Any
                             ) -> ps_pb2.CheckpointResponse:
        result, _ = await self.save_checkpoint(request.model_dir, request.global_step)
        return self._checkpoint_response(result)

    @_translate_errors
    async def CommitCheckpoint(self, request: ps_pb2.CheckpointRequest, context: Any
                               ) -> ps_pb2.CheckpointResponse:
        result, _ = await self.commit_checkpoint(
            request.model_dir, request.global_step, request.max_to_keep
        )
        return self._checkpoint_response(result)

    @_translate_errors
    async def RestoreCheckpoint(self, request: ps_pb2.CheckpointRequest, context: Any
                                ) -> ps_pb2.CheckpointResponse:
        result, _ = await self.restore_checkpoint(
            request.model_dir, request.prefix, request.validate_only
        )
        return self._checkpoint_response(result)

    # ------------------------------------------------------------ eviction

    async def evict(self, tables: Sequence[str] | None, trigger: str) -> list[TableEvicted]:
        """Delete the expired entries of ``tables`` (None: every table) now.

        Expiry follows each table's ``slot_expire_time_config`` against its own clock
        (:func:`~ps_server.engine.expiry.evict_expired`), whatever its
        ``enable_feature_eviction`` says (that only schedules periodic runs). Each
        table is evicted under its own lock, one after the other.

        :param trigger: ``admin`` or ``periodic`` (reported to the events).
        :raises UnknownTableError: a named table does not exist (nothing evicted).
        """
        if tables is None:
            names = sorted(self._shard.tables)
        else:
            names = list(tables)
            for name in names:
                self._shard.table_slot(name)
        out: list[TableEvicted] = []
        for name in names:
            def work(name: str = name) -> TableEvicted:
                table = self._shard.table(name)
                evicted = evict_expired(table)
                return TableEvicted(name, evicted, table.size())

            try:
                done = await self.call("Evict", work, tables=[name])
            except NotFoundError:
                if tables is None:
                    continue  # dropped meanwhile (a failed restore's rollback)
                raise
            if done.evicted:
                _log.info("evicted %d expired entries of table %r (%s)",
                          done.evicted, name, trigger)
            if self._events is not None:
                self._events.evicted(name, done.evicted, trigger)
            out.append(done)
        return out


def add_servicer_to_server(servicer: ParameterServerServicer, server: Any) -> None:
    """Register ``servicer`` as ``monolith_ps.ParameterServer`` on ``server``.

    Like the generated ``add_ParameterServerServicer_to_server``, except that the
    :data:`BULK_RPCS` parse their requests with :class:`~ps_server.codec.BulkRequestParser`
    and every answer may be pre-encoded ``bytes`` (:func:`~ps_server.codec.to_wire`).
    """
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(ps_pb2, method.input_type.name)
        deserializer: Callable[[bytes], Any] = (
            codec.BulkRequestParser(request_type) if method.name in BULK_RPCS
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
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _check_step(global_step: int) -> None:
    if global_step < 0:
        raise InvalidArgumentError(f"global_step must be >= 0, got {global_step}")
