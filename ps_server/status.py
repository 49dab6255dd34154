"""Errors become gRPC statuses here, and nowhere else.

Every RPC method of the shard's servicers (data plane and admin) is decorated with
:func:`translate_errors`: a :class:`~ps_server.errors.ShardError` gets the status of
its family (:data:`STATUS_BY_ERROR`) and its own message; an ``OSError`` a request can
cause (a full disk, a path that cannot be a file) gets the code in
:data:`STATUS_BY_ERRNO` with a message naming the file; running out of memory is
``RESOURCE_EXHAUSTED``; anything else is a bug: ``INTERNAL`` with an opaque message
and the traceback in the shard's log. Interceptors that refuse a call before it
reaches a servicer use :func:`abort` for the same trimming of details.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn, TypeVar

import grpc

from ps_server.errors import (
    AlreadyExistsError,
    CheckpointCorruptError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PathOutsideRootError,
    ResourceExhaustedError,
    ShardError,
)

__all__ = [
    "STATUS_BY_ERRNO",
    "STATUS_BY_ERROR",
    "abort",
    "internal_error",
    "status_of",
    "translate_errors",
]

_log = logging.getLogger(__name__)

_Code = grpc.StatusCode

#: The status code of each error family; a subclass takes its nearest listed base.
STATUS_BY_ERROR: Final[Mapping[type[ShardError], grpc.StatusCode]] = {
    InvalidArgumentError: _Code.INVALID_ARGUMENT,
    NotFoundError: _Code.NOT_FOUND,
    AlreadyExistsError: _Code.ALREADY_EXISTS,
    FailedPreconditionError: _Code.FAILED_PRECONDITION,
    CheckpointCorruptError: _Code.DATA_LOSS,
    PathOutsideRootError: _Code.PERMISSION_DENIED,
    ResourceExhaustedError: _Code.RESOURCE_EXHAUSTED,
}

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

# Status details travel in trailers, which gRPC caps at a few KiB.
_MAX_DETAILS_CHARS = 2000

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Servicer = TypeVar("_Servicer")


def status_of(error: ShardError) -> grpc.StatusCode:
    """The status code :func:`translate_errors` sends for ``error``.

    A :class:`ShardError` outside every listed family is ``INTERNAL``.
    """
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return _Code.INTERNAL


_TRUNCATED = " ... (truncated)"


def _details(message: str) -> str:
    if len(message) <= _MAX_DETAILS_CHARS:
        return message
    return message[: _MAX_DETAILS_CHARS - len(_TRUNCATED)] + _TRUNCATED


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (trimmed to fit in trailers)."""
    await context.abort(code, _details(message))
    raise AssertionError("context.abort returned")  # abort always raises


def internal_error(rpc: str) -> str:
    """The opaque message of an ``INTERNAL`` answer (the details go to the log)."""
    return f"{rpc}: internal error (see the shard's log)"


def translate_errors(
    rpc: Callable[[_Servicer, _Req, Any], Awaitable[_Resp]],
) -> Callable[[_Servicer, _Req, Any], Awaitable[_Resp]]:
    """Decorate a servicer's RPC method: exceptions become statuses (see the module doc).

    An ``OSError``'s message names its file, or else the request's ``model_dir`` /
    ``basename``.
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
        except ShardError as e:
            code = status_of(e)
            _log.debug("%s: %s: %s", name, code.name, e)
            await abort(context, code, str(e))
        except MemoryError:
            _log.exception("%s: out of memory", name)
            await abort(
                context,
                _Code.RESOURCE_EXHAUSTED,
                f"{name}: the shard ran out of memory; send smaller batches or add shards",
            )
        except OSError as e:
            code = STATUS_BY_ERRNO.get(e.errno or 0)
            if code is None:
                _log.exception("%s: internal error", name)
                await abort(context, _Code.INTERNAL, internal_error(name))
            _log.warning("%s: %s: %s", name, code.name, e)
            await abort(context, code, _os_error_details(name, e, request))
        except Exception:
            _log.exception("%s: internal error", name)
            await abort(context, _Code.INTERNAL, internal_error(name))

    return wrapper


def _os_error_details(rpc: str, error: OSError, request: Any) -> str:
    """What failed, on which path, and what to do (for :data:`STATUS_BY_ERRNO` codes)."""
    path = error.filename or getattr(request, "model_dir", "") or getattr(
        request, "basename", "")
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    text = f"{rpc}: {error.strerror or error} ({name}) at {path!r}"
    if STATUS_BY_ERRNO.get(error.errno or 0) == _Code.RESOURCE_EXHAUSTED:
        text += ("; free disk space (or raise the file size limit) or write elsewhere. "
                 "A failed save is not committed: the previous checkpoint stays the latest")
    return text
