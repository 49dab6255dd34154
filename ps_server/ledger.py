"""Exactly-once mutating requests: the shard's ledger of recent request tags.

A mutating request (assign, assign_add, apply_gradients, fused optimize, intercept
gradient) carries a ``RequestTag``: the sending client's id and a sequence number
that client never reuses. A client that saw no answer (a dropped connection, a
deadline) sends the same request again with the same tag. :class:`RequestLedger`
lets the shard tell the repeat from a new request:

* the first request with a tag *claims* it (:meth:`RequestLedger.claim`), runs, and
  *records* its outcome (:meth:`RequestLedger.record`): the answer, or the error it
  failed with. A repeat then gets that outcome back without running again, errors
  included (the error is raised again, not re-run);
* a repeat that arrives while the first is still running waits for it and gets its
  outcome;
* a request that ended before it could change anything (e.g. cancelled while waiting
  for a lock) *releases* its claim (:meth:`RequestLedger.release`): a repeat runs.

Untagged requests (empty client id or sequence number 0) never reach the ledger:
they are applied every time.

Memory is bounded three ways: each client keeps its last ``window`` outcomes (the
oldest are dropped first), at most ``max_clients`` clients are remembered (the
least recently seen is forgotten first) and all outcomes together stay under
``max_bytes`` (the oldest go first; :data:`RECORD_OVERHEAD_BYTES` per outcome plus
the bytes of its cached answer). Answers are cached, requests never are.

A client's sequence number that is not held but not newer than the highest one
dropped from its window may have been applied already: it is refused with
:class:`~ps_server.errors.FailedPreconditionError` rather than applied again (a
request overtaken by ``window`` newer ones of the same client is refused too).

Limits. The ledger lives in memory: a shard that restarts (or is restored from a
checkpoint) starts with an empty ledger, so a retry of an update the old process
had applied just before it died is applied again. After a restart the table
state is whatever was restored anyway, which already loses every update since that
checkpoint. A client forgotten for ``max_clients`` (or whose outcomes all went for
``max_bytes``) loses its history the same way.

The ledger is not thread-safe: use it from one event loop (the shard's). It
imports no gRPC.
"""

from __future__ import annotations

import asyncio
import copy
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ps_server.errors import ConfigError, FailedPreconditionError, InvalidArgumentError

__all__ = [
    "DEFAULT_LEDGER_BYTES",
    "DEFAULT_LEDGER_CLIENTS",
    "DEFAULT_LEDGER_WINDOW",
    "MAX_CLIENT_ID_CHARS",
    "RECORD_OVERHEAD_BYTES",
    "Outcome",
    "RequestLedger",
]

#: Outcomes remembered per client.
DEFAULT_LEDGER_WINDOW: Final = 1024
#: Clients remembered per shard.
DEFAULT_LEDGER_CLIENTS: Final = 1024
#: Bytes all outcomes may take (64 MiB).
DEFAULT_LEDGER_BYTES: Final = 64 * 1024 * 1024
#: What one outcome costs besides its cached answer (key, record, ordering), rounded up.
RECORD_OVERHEAD_BYTES: Final = 320
#: Longest client id accepted (a uuid4 hex is 32).
MAX_CLIENT_ID_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a tagged request ended: its answer, or the error it raised.

    :ivar response: the answer to send again (None when it failed).
    :ivar error: the error to raise again (a copy without traceback; None on success).
    :ivar nbytes: size of a cached ``bytes`` answer (counts against ``max_bytes``).
    """

    response: object = None
    error: BaseException | None = None
    nbytes: int = 0

    @classmethod
    def succeeded(cls, response: object) -> Outcome:
        """The outcome of a request that answered ``response``."""
        size = len(response) if isinstance(response, bytes | bytearray | memoryview) else 0
        return cls(response=response, nbytes=size)

    @classmethod
    def failed(cls, error: BaseException) -> Outcome:
        """The outcome of a request that raised ``error``.

        Only a copy is kept (same type and arguments, no traceback), so the frames of
        the failed call and the request they reference are not held.
        """
        return cls(error=_detached(error), nbytes=len(str(error)))

    def replay(self) -> object:
        """The recorded answer; or raise (a fresh copy of) the recorded error."""
        if self.error is not None:
            raise _detached(self.error)
        return self.response


def _detached(error: BaseException) -> BaseException:
    try:
        clone = copy.copy(error)
    except Exception:  # an exception class that cannot be rebuilt from its args
        clone = RuntimeError(f"{type(error).__name__}: {error}")
    clone.__traceback__ = None
    clone.__cause__ = clone.__context__ = None
    return clone


@dataclass(slots=True)
class _Client:
    """What the ledger holds for one client id."""

    client_id: str
    seqs: deque[int] = field(default_factory=deque)  # recorded seqs, oldest first
    floor: int = 0  # highest seq dropped from the ledger (0 = none)


@dataclass(slots=True)
class _Record:
    client: _Client
    rpc: str
    outcome: Outcome


@dataclass(slots=True)
class _Pending:
    rpc: str
    done: asyncio.Future[Outcome | None]


_Key = tuple[str, int]


class RequestLedger:
    """Outcomes of recent tagged requests, per client, bounded (see the module doc).

    Usage by a handler (on the event loop)::

        replay = await ledger.claim(client_id, seq, "ApplyGradients")
        if replay is not None:
            return replay.replay()          # a repeat: answer as the first time
        ...run the request...; then exactly one of
        ledger.record(client_id, seq, Outcome.succeeded(answer) or Outcome.failed(e))
        ledger.release(client_id, seq)      # it changed nothing

    :param window: outcomes kept per client (>= 1).
    :param max_clients: clients remembered (>= 1).
    :param max_bytes: bytes all outcomes may take (>= 1).
    :raises ConfigError: a limit below 1.
    """

    def __init__(
        self,
        window: int = DEFAULT_LEDGER_WINDOW,
        max_clients: int = DEFAULT_LEDGER_CLIENTS,
        max_bytes: int = DEFAULT_LEDGER_BYTES,
    ) -> None:
        for name, value in (("window", window), ("max_clients", max_clients),
                            ("max_bytes", max_bytes)):
            if value < 1:
                raise ConfigError(f"request ledger {name} must be >= 1, got {value}")
        self.window = window
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        # Every outcome, oldest first (the order max_bytes evicts in); each client's
        # ``seqs`` lists its own in the same order.
        self._records: OrderedDict[_Key, _Record] = OrderedDict()
        # Clients, least recently seen first.
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._pending: dict[_Key, _Pending] = {}
        self._nbytes = 0
        self._replayed: dict[str, int] = {}
        self._refused = 0

    # ------------------------------------------------------------ state

    @property
    def nbytes(self) -> int:
        """Bytes the outcomes take, as counted against ``max_bytes``."""
        return self._nbytes

    @property
    def records(self) -> int:
        """Outcomes held."""
        return len(self._records)

    @property
    def clients(self) -> int:
        """Clients remembered."""
        return len(self._clients)

    @property
    def in_flight(self) -> int:
        """Claimed requests still running."""
        return len(self._pending)

    @property
    def replayed(self) -> Mapping[str, int]:
        """Repeats answered from the ledger since it was made, by RPC name."""
        return dict(self._replayed)

    @property
    def refused(self) -> int:
        """Requests refused as older than their client's window."""
        return self._refused

    # ------------------------------------------------------------ protocol

    async def claim(self, client_id: str, seq: int, rpc: str) -> Outcome | None:
        """Claim tag ``(client_id, seq)`` for a run of ``rpc``.

        :returns: None when the caller must run the request (then :meth:`record` or
            :meth:`release` it); otherwise the first run's :class:`Outcome` (after
            waiting for it if it is still running).
        :raises InvalidArgumentError: an untagged request (empty id or seq <= 0), a
            client id longer than :data:`MAX_CLIENT_ID_CHARS`, or the tag of an earlier
            request of another RPC.
        :raises FailedPreconditionError: ``seq`` is older than the client's window (it
            may have been applied; it is not applied again).
        """
        if not client_id or seq <= 0:
            raise InvalidArgumentError(
                f"request tag ({client_id!r}, {seq}) is untagged; untagged requests are "
                "applied without the ledger"
            )
        if len(client_id) > MAX_CLIENT_ID_CHARS:
            raise InvalidArgumentError(
                f"request tag client_id is {len(client_id)} characters, over "
                f"{MAX_CLIENT_ID_CHARS}; use a short unique id (e.g. a uuid4 hex)"
            )
        key = (client_id, seq)
        while True:
            record = self._records.get(key)
            if record is not None:
                self._check_rpc(key, record.rpc, rpc)
                self._clients.move_to_end(client_id)
                self._replayed[rpc] = self._replayed.get(rpc, 0) + 1
                return record.outcome
            pending = self._pending.get(key)
            if pending is None:
                break
            self._check_rpc(key, pending.rpc, rpc)
            # Shielded: a waiter that is cancelled must not cancel the first run's future.
            outcome = await asyncio.shield(pending.done)
            if outcome is not None:
                self._replayed[rpc] = self._replayed.get(rpc, 0) + 1
                return outcome
            # Released: the first run changed nothing; claim again (or wait for the
            # waiter that claimed first).
        client = self._clients.get(client_id)
        if client is not None and seq <= client.floor:
            self._refused += 1
            raise FailedPreconditionError(
                f"request {seq} of client {client_id} is older than the {self.window} "
                f"requests of that client this shard remembers (down to {client.floor + 1})"
                ": it may have been applied already, so it is not applied again; the "
                "update is lost unless the caller knows it was applied"
            )
        self._pending[key] = _Pending(rpc, asyncio.get_running_loop().create_future())
        return None

    def record(self, client_id: str, seq: int, outcome: Outcome) -> None:
        """The claimed request ran and ended with ``outcome``: keep it, wake the waiters."""
        key = (client_id, seq)
        pending = self._pending.pop(key)
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(client_id)
            while len(self._clients) > self.max_clients:
                self._forget(next(iter(self._clients)))
        else:
            self._clients.move_to_end(client_id)
            key = (client.client_id, seq)  # one string per client, not one per record
        self._records[key] = _Record(client, pending.rpc, outcome)
        client.seqs.append(seq)
        self._nbytes += RECORD_OVERHEAD_BYTES + outcome.nbytes
        if len(client.seqs) > self.window:
            self._drop(client, client.seqs[0])
        while self._nbytes > self.max_bytes and self._records:
            (cid, oldest), _ = next(iter(self._records.items()))
            self._drop(self._clients[cid], oldest)
        pending.done.set_result(outcome)

    def release(self, client_id: str, seq: int) -> None:
        """The claimed request ended without changing anything: forget the claim, so a
        repeat runs (waiters claim again)."""
        pending = self._pending.pop((client_id, seq), None)
        if pending is not None:
            pending.done.set_result(None)

    # ------------------------------------------------------------ eviction

    def _drop(self, client: _Client, seq: int) -> None:
        """Drop ``client``'s oldest outcome (``seq``)."""
        removed = client.seqs.popleft()
        assert removed == seq
        record = self._records.pop((client.client_id, seq))
        self._nbytes -= RECORD_OVERHEAD_BYTES + record.outcome.nbytes
        client.floor = max(client.floor, seq)

    def _forget(self, client_id: str) -> None:
        """Forget a client and every outcome it has."""
        client = self._clients.pop(client_id)
        for seq in client.seqs:
            record = self._records.pop((client_id, seq))
            self._nbytes -= RECORD_OVERHEAD_BYTES + record.outcome.nbytes
        client.seqs.clear()

    @staticmethod
    def _check_rpc(key: _Key, first: str, now: str) -> None:
        if first != now:
            raise InvalidArgumentError(
                f"request tag {key} was first used by a {first} request and is now sent "
                f"with {now}; a client must not reuse a sequence number"
            )
