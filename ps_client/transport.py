"""How the client talks to the shards: channels, calls, fan-out, request tags, retries.

:class:`Transport` holds one ``grpc.aio`` channel per shard (so it must be created
inside the event loop that uses it) and knows nothing of tables: it sends a request
to one shard (:meth:`Transport.call`) or to every shard at once
(:meth:`Transport.each`) and turns failures into :class:`ps_client.errors.PsError`.

Calls:

* every call has a deadline: ``timeout`` (``file_timeout`` for saves, restores
  and checkpoints); a call's retries all fit inside its deadline;
* what may be retried is declared once, per RPC, in ``ps_service.proto`` and read
  from :mod:`protos.contract`:

  - read-only RPCs (:data:`protos.contract.READ_ONLY_RPCS`) are retried on
    ``UNAVAILABLE`` with exponential backoff and jitter;
  - tagged mutating RPCs (:data:`protos.contract.TAGGED_RPCS`) carry a
    ``RequestTag`` (:meth:`Transport.next_tag`): this client's random id and a
    sequence number of its own for each request to each shard. The shard keeps a
    ledger of recent tags and answers a repeat with the first answer, without
    applying it again, so these are retried too, with the same tag (the
    very same request bytes): on ``UNAVAILABLE`` and on ``DEADLINE_EXCEEDED`` of one
    attempt, whose deadline (:attr:`RetryPolicy.attempt_timeout`) is shorter than
    the call's, so a lost answer leads to a resend. When the retries run out, the
    error raised (``PsUnavailable``, ``PsDeadlineExceeded``) leaves open whether the
    shard applied the update. Limit: a shard restarted between the attempts has an
    empty ledger and applies the resend (which is what a restarted shard that had
    not applied it needs; one that had applied it, then lost it with its state,
    is back at whatever its restore holds);
  - other RPCs that change state (creation, saves, restores) are never retried;

* a fan-out waits for every shard before raising the first failure (in shard
  order), so no call is left running when the caller sees an error;
* a tagged write fanned out to several shards (:meth:`Transport.write_each`) may
  fail on some shards only. Its error is of the class of the first failure in shard
  order (so ``except PsInvalidArgument`` and the builtin bases keep working), its
  message names by index and address the shards that *applied* (answered OK), the
  shards that *refused* (a definitive status: a shard applies a request all or
  nothing, so a refusing shard changed nothing) with their reasons, and the shards
  whose outcome is *unknown* (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``CANCELLED``
  after the retries above, or ``INTERNAL``); when none applied it says that nothing
  changed anywhere. The same facts are in ``error.write``
  (:class:`ps_client.errors.PartialWrite`), with each shard's original request.
  :meth:`Transport.retry_write` (``client.retry(error)``) resends the original
  request, same tag and same bytes, to every shard that did not answer OK, and never
  contacts the shards that did: no row is applied twice, even by a shard whose ledger
  forgot the tag. A shard that applied but whose answer was lost answers the resend
  from its ledger; a shard restarted meanwhile with its state restored (so it had
  not applied the part) applies it once. A shard that refused after running the
  request records the refusal against the tag and refuses the resend the same way;
  one that refused before running it (an unknown table, a request guard) runs the
  resend. When the write went to one shard only, that shard's error is raised as it
  is (its message is the whole story), with ``error.write`` attached;
* a connection that fails as a TLS mismatch does (a failed handshake; a plaintext
  connection closed before gRPC came up) is not retried further and its
  ``PsUnavailable`` says so (:func:`ps_client.errors.tls_mismatch_hint`).

Retries are the client's own: gRPC's transparent retries are turned off on the channels.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from protos import contract
from protos import ps_service_pb2 as pb
from protos import ps_service_pb2_grpc as pb_grpc
from ps_client.errors import (
    PartialWrite,
    PsError,
    PsInvalidArgument,
    error_from_rpc,
    rpc_details,
    tls_mismatch_hint,
)

SERVICE_PATH: Final = f"/{contract.DATA_SERVICE.full_name}"
_ADMIN_RPCS: Final = frozenset(m.name for m in contract.ADMIN_SERVICE.methods)
"""Prefix of the data-plane method paths (``/monolith_ps.ParameterServer``)."""

_RETRY_ON: Final[dict[str, tuple[grpc.StatusCode, ...]]] = {
    **{m: (grpc.StatusCode.UNAVAILABLE,) for m in contract.READ_ONLY_RPCS},
    **{m: (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
       for m in contract.TAGGED_RPCS},
}
"""Status codes each retryable RPC is retried on (absent: never retried)."""

_UNKNOWN_OUTCOME: Final = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNKNOWN"}
)
"""Final status codes of a write that leave open whether the shard applied it (any
other status is a refusal: the shard validates a request before it changes anything)."""


# ---------------------------------------------------------------- channels


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the shards.

    :param credentials: TLS (or other) channel credentials; None = plaintext.
    :param auth_token: sent as ``authorization: Bearer <token>`` on every call.
    :param max_message_bytes: send and receive limit per message (the servers'
        default, :data:`protos.contract.MAX_MESSAGE_BYTES`, unless given).
    :param keepalive_ms: ping an idle connection this often (ms) to notice a dead shard.
    :param keepalive_timeout_ms: a ping unanswered this long (ms) drops the connection.
    """

    credentials: grpc.ChannelCredentials | None = None
    auth_token: str | None = None
    max_message_bytes: int = contract.MAX_MESSAGE_BYTES
    keepalive_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000

    def grpc_options(self) -> list[tuple[str, int | str]]:
        """The ``grpc.*`` channel arguments."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # Reconnect quickly to a restarted shard (gRPC's default waits 1 s and more).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata attached to every call."""
        if self.auth_token is None:
            return ()
        return (("authorization", f"Bearer {self.auth_token}"),)


def make_channel(address: str, options: ChannelOptions) -> grpc.aio.Channel:
    """An aio channel to ``address`` (``host:port``); call inside the running loop."""
    opts: Sequence[tuple[str, int | str]] = options.grpc_options()
    if options.credentials is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, options.credentials, options=opts)


# ---------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of read-only calls that fail with ``UNAVAILABLE``, and of tagged
    mutating calls that fail with ``UNAVAILABLE`` or whose attempt ran out of time
    (``DEADLINE_EXCEEDED``).

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


# ---------------------------------------------------------------- calls


class Transport:
    """Calls to the shards of one cluster. Create it inside the running loop.

    :param addresses: ``host:port`` of shard 0, 1, ... (the order is the shard index).
    :param timeout: deadline (s) of each data-plane call, retries included.
    :param file_timeout: deadline (s) of calls made with ``file_op=True``.
    :param channel_options: credentials, auth token, message limits, keepalive.
    :param retry: retries of read-only and tagged mutating calls.
    :ivar client_id: this transport's random id, the first half of its request tags.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = 60.0,
        file_timeout: float = 3600.0,
        channel_options: ChannelOptions | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.addresses = [str(a) for a in addresses]
        self.timeout = float(timeout)
        self.file_timeout = float(file_timeout)
        self.retry = retry or RetryPolicy()
        self.client_id = uuid.uuid4().hex
        opts = channel_options or ChannelOptions()
        self._metadata = opts.metadata() or None
        self._secure = opts.credentials is not None
        self._channels = [make_channel(a, opts) for a in self.addresses]
        self._stubs = [pb_grpc.ParameterServerStub(c) for c in self._channels]
        # Whole checkpoints are admin-plane RPCs (their names are the admin service's own).
        self._admin_stubs = [pb_grpc.ParameterServerAdminStub(c) for c in self._channels]
        self._raw: list[dict[str, Callable[..., Any]]] = [{} for _ in self._channels]
        self._seq = itertools.count(1)

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.addresses)

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled)."""
        await asyncio.gather(*(c.close() for c in self._channels))

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
        return await self._call(shard, method, request, file_op, None)

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
        :raises PsError: the first failure in shard order, after every call ended. A
            tagged write (:data:`protos.contract.TAGGED_RPCS`) goes through
            :meth:`write_each`, and fails as it does.
        """
        reqs = requests if isinstance(requests, list) else [requests] * self.num_shards
        if method in contract.TAGGED_RPCS:
            return await self.write_each(method, reqs, on_answer=on_answer)
        live = [s for s, r in enumerate(reqs) if r is not None]
        results = await asyncio.gather(
            *(self._call(s, method, reqs[s], file_op, on_answer) for s in live),
            return_exceptions=True,
        )
        out: list[Any] = [None] * self.num_shards
        for s, res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                raise res
            out[s] = res
        return out

    async def write_each(
        self, method: str, requests: Sequence[Any], *,
        on_answer: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Send a tagged write (``method`` in :data:`protos.contract.TAGGED_RPCS`) to
        every shard with a request, concurrently, and wait for all of them.

        :param requests: one request per shard (None = nothing for that shard), each
            with its own tag (:meth:`next_tag`).
        :param on_answer: as in :meth:`each`; a shard whose answer it fails on did
            apply its part (its exception is raised when no shard failed).
        :returns: the answers in shard order.
        :raises PsError: when some shard failed: of the first failure's class, naming
            the shards that applied, refused or have an unknown outcome, with
            ``error.write`` set (see the module docstring). A write sent to one shard
            only raises that shard's error, with ``error.write`` set.
        """
        if method not in contract.TAGGED_RPCS:
            raise PsInvalidArgument(f"{method} is not a tagged write")
        reqs = tuple(requests)
        if len(reqs) != self.num_shards:
            raise PsInvalidArgument(
                f"{method}: {len(reqs)} requests for {self.num_shards} shards"
            )
        targets = [s for s, r in enumerate(reqs) if r is not None]
        return await self._write(method, reqs, targets, (), on_answer)

    async def retry_write(self, error: BaseException) -> None:
        """Resend a failed write (an error raised by :meth:`write_each` or by this
        method): the original request of every shard that did not answer OK, same
        tag, same bytes; the shards that applied are not contacted.

        :raises PsInvalidArgument: ``error`` carries no write outcome, or came from a
            client of other shards.
        :raises PsError: some shard failed again: as :meth:`write_each`, the shards
            applied before counted as applied.
        """
        write = error.write if isinstance(error, PsError) else None
        if write is None:
            raise PsInvalidArgument(
                f"retry() resends a write that failed on some shards (an error with a "
                f"write outcome, error.write); this {type(error).__name__} has none"
            )
        if write.addresses != tuple(self.addresses):
            raise PsInvalidArgument(
                f"retry(): the failed {write.method} went to the shards "
                f"{list(write.addresses)}, this client talks to {self.addresses}"
            )
        await self._write(write.method, write.requests, list(write.pending),
                          write.applied, None)

    async def _write(
        self, method: str, reqs: tuple[Any, ...], targets: list[int],
        applied_before: tuple[int, ...], on_answer: Callable[[int, Any], None] | None,
    ) -> list[Any]:
        """Send ``reqs[s]`` to each shard ``s`` of ``targets``; sort the outcomes."""
        answered: set[int] = set()

        def note(shard: int, answer: Any) -> None:
            answered.add(shard)
            if on_answer is not None:
                on_answer(shard, answer)

        results = await asyncio.gather(
            *(self._call(s, method, reqs[s], False, note) for s in targets),
            return_exceptions=True,
        )
        out: list[Any] = [None] * self.num_shards
        applied = set(applied_before)
        failures: dict[int, BaseException] = {}
        late: BaseException | None = None  # on_answer failed on an applied shard
        for s, res in zip(targets, results, strict=True):
            if s in answered:
                applied.add(s)
                if isinstance(res, BaseException):
                    late = late or res
                else:
                    out[s] = res
            elif isinstance(res, BaseException):
                failures[s] = res
            else:
                out[s] = res
        if not failures:
            if late is not None:
                raise late
            return out
        unknown = tuple(s for s in sorted(failures) if not _is_refusal(failures[s]))
        write = PartialWrite(
            method=method, addresses=tuple(self.addresses), requests=reqs,
            applied=tuple(sorted(applied)),
            refused=tuple(s for s in sorted(failures) if s not in unknown),
            unknown=unknown,
        )
        first = failures[min(failures)]
        if not isinstance(first, PsError):
            raise first
        if len(targets) == 1 and not applied_before:
            first.write = write  # the one shard of the write: its message says it all
            raise first
        err = type(first)(
            _describe(write, failures), code=first.code, address=first.address,
            method=method,
        )
        err.write = write
        raise err from first

    async def _call(
        self, shard: int, method: str, request: Any, file_op: bool,
        on_answer: Callable[[int, Any], None] | None,
    ) -> Any:
        """:meth:`call`, handing a success to ``on_answer`` (one coroutine per shard call)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.file_timeout if file_op else self.timeout)
        retry_on = _RETRY_ON.get(method, ())
        attempt_cap = (
            self.retry.attempt_timeout if method in contract.TAGGED_RPCS else math.inf
        )
        rpc: Callable[..., Any]
        if isinstance(request, bytes):
            rpc = self._raw[shard].get(method) or self._raw[shard].setdefault(
                method, self._channels[shard].unary_unary(f"{SERVICE_PATH}/{method}")
            )
        else:
            stubs = self._admin_stubs if method in _ADMIN_RPCS else self._stubs
            rpc = getattr(stubs[shard], method)
        attempt = 0
        while True:
            attempt += 1
            remaining = min(max(deadline - loop.time(), 0.001), attempt_cap)
            try:
                answer = await rpc(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                hint = None
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    hint = tls_mismatch_hint(rpc_details(err), secure=self._secure)
                # A failed TLS handshake fails again: no retry. A plaintext connection
                # closed at once may be a shard going down: one more attempt.
                give_up = hint is not None and (self._secure or attempt >= 2)
                if err.code() in retry_on and attempt < self.retry.max_attempts and not give_up:
                    pause = self.retry.delay(attempt)
                    if loop.time() + pause < deadline:
                        await asyncio.sleep(pause)
                        continue
                raise error_from_rpc(
                    err, address=self.addresses[shard], method=method, hint=hint
                ) from err
            if on_answer is not None:
                on_answer(shard, answer)
            return answer


def _is_refusal(failure: BaseException) -> bool:
    """A definitive answer: the shard changed nothing."""
    return isinstance(failure, PsError) and failure.code not in _UNKNOWN_OUTCOME


def _describe(write: PartialWrite, failures: dict[int, BaseException]) -> str:
    """The message of a write that failed on some shards: what each shard did."""

    def at(s: int) -> str:
        return f"shard {s} ({write.addresses[s]})"

    def reason(s: int) -> str:
        f = failures[s]
        return f"{f.code}: {f.details}" if isinstance(f, PsError) else repr(f)

    if write.applied:
        head = f"{write.method} applied on {', '.join(map(at, write.applied))} only"
    elif write.unknown:
        head = f"{write.method} applied on no shard for certain"
    else:
        head = f"{write.method} changed nothing anywhere"
    parts = [f"refused by {at(s)}, which changed nothing there: {reason(s)}"
             for s in write.refused]
    parts += [f"outcome unknown on {at(s)} (it may have applied): {reason(s)}"
              for s in write.unknown]
    return (
        f"{head}; {'; '.join(parts)}. retry(error) resends the same requests (same "
        f"tags) to {', '.join(map(at, write.pending))} only"
    )
