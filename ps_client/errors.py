"""Exceptions raised by the client, one per gRPC status code.

Every failure a shard reports becomes a :class:`PsError` subclass that keeps the
status ``code`` (its name, e.g. ``"INVALID_ARGUMENT"``), the server's ``details``, the
shard ``address`` and the RPC ``method``; it is raised ``from`` the original
``grpc.RpcError``. The client's own argument checks raise the same classes with no
address.

Where ``docs/api.md`` promises a builtin exception the class also derives from it:
bad arguments, a name already in use and a state that forbids the request are
``ValueError`` (:class:`PsInvalidArgument`, :class:`PsAlreadyExists`,
:class:`PsFailedPrecondition`); an unknown table or file is a ``KeyError``
(:class:`PsNotFound`, so ``client.table("nope")`` raises ``KeyError``); a deadline is
a ``TimeoutError``. Catch :class:`PsError` to catch them all.

A failed write that went to shards (assign, assign_add, apply_gradients, fused
apply gradient, intercept gradient) carries what it did on each shard in
:attr:`PsError.write` (a :class:`PartialWrite`); ``client.retry(error)`` resends it.

This module imports no gRPC (codes travel as names), so :mod:`ps_client.routing`
can raise these too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PartialWrite:
    """What one tagged write did on each shard it was sent to, when some shard failed.

    A shard applies a request all or nothing, so every shard is in exactly one of:

    :ivar applied: shards that answered OK: their part is applied (once).
    :ivar refused: shards that answered with a definitive status (a refusal: bad
        input, a limit, an unknown table...): their part changed nothing.
    :ivar unknown: shards whose outcome is unknown (``UNAVAILABLE``,
        ``DEADLINE_EXCEEDED``, ``CANCELLED`` after the transport's own retries, or an
        ``INTERNAL`` failure): their part may or may not be applied.
    :ivar method: the RPC (``"ApplyGradients"``...).
    :ivar addresses: the shards' addresses, in shard order.
    :ivar requests: the original request of each shard (wire bytes or message, with its
        ``RequestTag``), None where nothing was sent. A retry resends these very
        requests, so a shard that applied one already answers from its ledger.
    """

    method: str
    addresses: tuple[str, ...]
    requests: tuple[Any, ...]
    applied: tuple[int, ...]
    refused: tuple[int, ...]
    unknown: tuple[int, ...]

    @property
    def pending(self) -> tuple[int, ...]:
        """The shards a retry resends to (refused and unknown), in shard order."""
        return tuple(sorted(self.refused + self.unknown))


class PsError(Exception):
    """Base of every client-side monolith-ps error.

    :ivar code: gRPC status code name (``"NOT_FOUND"``...), or None for client-side checks.
    :ivar details: the message (the server's details for RPC failures).
    :ivar address: the shard that reported it, or None.
    :ivar method: the RPC name, or None.
    :ivar write: for a failed write sent to shards, what it did on each shard (see
        :class:`PartialWrite`); None otherwise. It is not pickled: an error sent to
        another process arrives without it (its message still names the shards).
    """

    default_code: str | None = None

    def __init__(
        self,
        details: str,
        *,
        code: str | None = None,
        address: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code
        self.address = address
        self.method = method
        self.write: PartialWrite | None = None

    def __str__(self) -> str:
        if self.address is None:
            return self.details
        return f"{self.details} [{self.code} from {self.method} on shard {self.address}]"

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), self.details, self.code, self.address, self.method),
        )


def _rebuild(
    cls: type[PsError], details: str, code: str | None, address: str | None, method: str | None
) -> PsError:
    return cls(details, code=code, address=address, method=method)


class PsInvalidArgument(PsError, ValueError):
    """The request is wrong: shapes, dtypes, values, config fields (INVALID_ARGUMENT)."""

    default_code = "INVALID_ARGUMENT"


class PsNotFound(PsError, KeyError):
    """A table, filter, file or checkpoint named in the request does not exist (NOT_FOUND)."""

    default_code = "NOT_FOUND"


class PsAlreadyExists(PsError, ValueError):
    """The name is used already, with another definition (ALREADY_EXISTS)."""

    default_code = "ALREADY_EXISTS"


class PsFailedPrecondition(PsError, ValueError):
    """Well formed, but the state forbids it, e.g. checkpoint dims differ (FAILED_PRECONDITION)."""

    default_code = "FAILED_PRECONDITION"


class PsOutOfRange(PsError, ValueError):
    """A value outside the accepted range (OUT_OF_RANGE)."""

    default_code = "OUT_OF_RANGE"


class PsDataLoss(PsError):
    """A file is damaged: bad CRC, truncated record (DATA_LOSS)."""

    default_code = "DATA_LOSS"


class PsPermissionDenied(PsError):
    """A path outside the shard's data root (PERMISSION_DENIED)."""

    default_code = "PERMISSION_DENIED"


class PsUnauthenticated(PsError):
    """Missing or wrong auth token (UNAUTHENTICATED)."""

    default_code = "UNAUTHENTICATED"


class PsResourceExhausted(PsError):
    """A limit was hit: table capacity, batch size, message size (RESOURCE_EXHAUSTED)."""

    default_code = "RESOURCE_EXHAUSTED"


class PsUnavailable(PsError, ConnectionError):
    """The shard cannot be reached or is draining (UNAVAILABLE)."""

    default_code = "UNAVAILABLE"


class PsDeadlineExceeded(PsError, TimeoutError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""

    default_code = "DEADLINE_EXCEEDED"


class PsCancelled(PsError):
    """The call was cancelled (CANCELLED)."""

    default_code = "CANCELLED"


class PsUnimplemented(PsError, NotImplementedError):
    """The shard does not implement this RPC (UNIMPLEMENTED)."""

    default_code = "UNIMPLEMENTED"


class PsInternal(PsError):
    """A bug on the shard (INTERNAL, UNKNOWN or any other code); see the shard's log."""

    default_code = "INTERNAL"


ERROR_BY_CODE: dict[str, type[PsError]] = {
    "INVALID_ARGUMENT": PsInvalidArgument,
    "NOT_FOUND": PsNotFound,
    "ALREADY_EXISTS": PsAlreadyExists,
    "FAILED_PRECONDITION": PsFailedPrecondition,
    "OUT_OF_RANGE": PsOutOfRange,
    "DATA_LOSS": PsDataLoss,
    "PERMISSION_DENIED": PsPermissionDenied,
    "UNAUTHENTICATED": PsUnauthenticated,
    "RESOURCE_EXHAUSTED": PsResourceExhausted,
    "UNAVAILABLE": PsUnavailable,
    "DEADLINE_EXCEEDED": PsDeadlineExceeded,
    "CANCELLED": PsCancelled,
    "UNIMPLEMENTED": PsUnimplemented,
    "INTERNAL": PsInternal,
}


def error_from_rpc(
    err: Any, *, address: str, method: str, hint: str | None = None
) -> PsError:
    """The :class:`PsError` for a failed call (``grpc.RpcError``); raise it ``from err``.

    Unknown codes (``UNKNOWN``, ``ABORTED``...) become :class:`PsInternal` keeping the code.

    :param hint: what the failure likely means (see :func:`tls_mismatch_hint`),
        appended to the details.
    """
    code_obj = err.code() if callable(getattr(err, "code", None)) else None
    code = getattr(code_obj, "name", None) or "UNKNOWN"
    details = rpc_details(err)
    if hint:
        details = f"{details}; {hint}"
    cls = ERROR_BY_CODE.get(code, PsInternal)
    return cls(details, code=code, address=address, method=method)


def rpc_details(err: Any) -> str:
    """The details of a failed call (``grpc.RpcError``), or its text."""
    details_fn = getattr(err, "details", None)
    return str((details_fn() if callable(details_fn) else None) or err)


def tls_mismatch_hint(details: str, *, secure: bool) -> str | None:
    """What an ``UNAVAILABLE`` failure to connect means when the client and the shard
    disagree about TLS, or None when the details do not look like that.

    * a TLS client (``secure``) whose handshake failed: the shard may speak plaintext,
      its certificate may not be signed by the client's CA, or it may want a client
      certificate;
    * a plaintext client whose connection was closed before gRPC came up ("failed to
      connect ... Socket closed"): what a TLS shard does to a plaintext hello.
    """
    text = details.lower()
    if secure and ("handshake" in text or "ssl" in text or "certificate" in text):
        return (
            "the TLS handshake with the shard failed: the shard may speak plaintext (then "
            "pass no credentials), its certificate may not be signed by the CA in the "
            "client's credentials, or it may require a client certificate (mutual TLS)"
        )
    if not secure and "failed to connect" in text and "socket closed" in text:
        return (
            "the shard closed the connection before answering: it may speak TLS "
            "(started with tls_cert_file) while this client passed no credentials; pass "
            "credentials=grpc.ssl_channel_credentials(<the shards' CA>)"
        )
    return None
