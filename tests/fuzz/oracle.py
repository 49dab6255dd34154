"""The oracle of the hostile-input fuzz suite: what every request must get.

:class:`Harness` holds the live shard (an in-process server, so its state can be
read directly), a reference :class:`Shard` that starts equal to it, and the data
root. For each request it works out the expected outcome without the server, sends
the bytes, and checks the answer and the state (see ``test_hostile_input``'s
docstring for the rules).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import functools
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, settings

import ps_server
from protos import ps_service_pb2 as pb
from ps_server import errors
from ps_server.checkpoint import checkpoints, filter_dump, monolith_export, table_files
from ps_server.checkpoint.entry_dump import lookup_entry, save_as_tensor
from ps_server.config import cluster_id_problem
from ps_server.engine import configs
from ps_server.engine.expiry import evict_expired
from ps_server.engine.filters import SlidingHashFilter
from ps_server.engine.shard import FilterOptions, Shard
from tests.faults.support import shard_fingerprint, thresholds
from tests.integration.conftest import RunningServer

Code = grpc.StatusCode
MAX_MESSAGE = 64 * 1024
DEFAULT_CAPACITY, DEFAULT_SPLIT = 600, 5
T0 = 1_700_000_000
DAY = 86_400
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
LIMIT_IDS = (I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 1, I64_MAX, 2**31, -(2**31) - 1)


# ---------------------------------------------------------------- bookkeeping


@dataclass
class Stats:
    """Requests sent, per method and outcome (printed in the terminal summary)."""

    outcomes: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter)
    seconds: collections.Counter[str] = field(default_factory=collections.Counter)
    #: requests sent by each fuzz test
    by_test: collections.Counter[str] = field(default_factory=collections.Counter)
    #: calls the shard failed with an error of its own instead of an answer or a precise
    #: status: UNKNOWN or INTERNAL (an unhandled exception) or UNAVAILABLE (it stopped
    #: answering); see :data:`CRASH_CODES`
    crashes: int = 0
    #: calls unanswered past their deadline (:data:`CALL_DEADLINE` seconds)
    hangs: int = 0

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def report(self) -> list[str]:
        by_method: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        for (method, outcome), n in self.outcomes.items():
            by_method[method][outcome] += n
        rejected = sum(n for (_, o), n in self.outcomes.items() if o != "OK")
        lines = [f"{self.total} requests sent to live shards: {self.total - rejected} "
                 f"accepted (checked against the reference or the round trip), {rejected} "
                 f"rejected (precise status, state unchanged); {self.crashes} crashes, "
                 f"{self.hangs} hangs",
                 "  by test: " + ", ".join(f"{t} {n}" for t, n in sorted(self.by_test.items()))
                 + f"; {sum(self.seconds.values()):.1f} s waiting for answers"]
        for method in sorted(by_method):
            parts = ", ".join(f"{o} {n}" for o, n in sorted(by_method[method].items()))
            ms = 1e3 * self.seconds[method] / sum(by_method[method].values())
            lines.append(f"  {method}: {parts} ({ms:.2f} ms per call)")
        return lines


STATS = Stats()
#: Deadline of one fuzz call (s): far beyond any answer; a call past it is a hang.
CALL_DEADLINE = 30.0
#: Statuses no request may get: the shard crashed in the call or stopped answering.
CRASH_CODES = frozenset({Code.UNKNOWN, Code.INTERNAL, Code.UNAVAILABLE})


#: ``PS_FUZZ_SCALE`` (default 1) multiplies every fuzz test's ``max_examples``.
SCALE = float(os.environ.get("PS_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    """``n`` examples at scale 1."""
    return max(1, round(n * SCALE))


#: Settings every fuzz test starts from (examples hit real servers and files).
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=True,
)


@contextlib.contextmanager
def scratch_dir(tmp_path_factory: Any, name: str) -> Iterator[Path]:
    """A directory in memory when the host has ``/dev/shm`` (every save fsyncs its
    files; on a disk that would be most of the suite's time), else under pytest's
    ``tmp_path_factory``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(prefix=f"{name}-", dir="/dev/shm") as tmp:
            yield Path(tmp)
    else:
        yield tmp_path_factory.mktemp(name)


# ---------------------------------------------------------------- the shard and its twin


@functools.cache
def baseline(serving: bool, shard_index: int, num_shards: int) -> Shard:
    """The state every example starts from (``serving``: with a SERVING table, which
    makes whole-checkpoint saves refuse)."""
    shard = Shard(shard_index, num_shards)
    shard.create_hash_filter("flt", FilterOptions(
        occurrence_threshold_config=thresholds(2), capacity=DEFAULT_CAPACITY,
        split_num=DEFAULT_SPLIT))
    shard.create_hash_filter("prob", FilterOptions(
        filter_type="probabilistic_filter", occurrence_threshold_config=thresholds(3)))
    shard.create_table("emb", configs.table_config(3, optimizer=configs.adagrad()),
                       hash_filter="flt")
    shard.create_table("two", configs.table_config(segments=[
        configs.segment(1), configs.segment(2, configs.adagrad())]), saver_parallel=2)
    shard.create_table("exp", configs.table_config(2, expire_days=1), hash_filter="prob")
    ids = np.array([-4, -1, 0, 1, 2, 7, I64_MAX, I64_MIN], dtype=np.int64)
    for _ in range(2):  # the filter (threshold 2) admits on the second sight
        shard.table("emb").assign(ids, np.arange(24, dtype=np.float32).reshape(8, 3), T0)
    shard.table("two").assign(ids, np.ones((8, 3), dtype=np.float32), T0)
    shard.table("exp").assign(ids[:4], np.ones((4, 2), dtype=np.float32), T0 - 2 * DAY)
    shard.table("exp").assign(ids[4:], np.ones((4, 2), dtype=np.float32), T0)
    if serving:
        shard.create_table("sv", configs.table_config(2, serving=True))
        shard.table("sv").assign(ids, np.full((8, 2), 0.5, dtype=np.float32))
    return shard


TABLES = ("emb", "two", "exp", "sv", "new_t")
FILTERS = ("flt", "prob", "new_f")

DATA_METHODS = {
    m.name: (f"/monolith_ps.ParameterServer/{m.name}",
             getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
    for m in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods
}
ADMIN_METHODS = {
    f"Admin.{m.name}": (f"/monolith_ps.ParameterServerAdmin/{m.name}",
                        getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
    for m in pb.DESCRIPTOR.services_by_name["ParameterServerAdmin"].methods
}
METHODS = {**DATA_METHODS, **ADMIN_METHODS}
#: Updates that carry a ``RequestTag``.
TAGGED = frozenset({"Assign", "AssignAdd", "ApplyGradients", "FusedOptimize",
                    "InterceptGradient"})


@dataclass
class Reject:
    codes: frozenset[grpc.StatusCode]


@dataclass
class Accept:
    response: Message


class Skip:
    """A request that would be valid and is not sent: a real Drain (it would end the
    fuzzing), an export to Monolith's layout (it writes files the reference does not
    model; tests/integration/test_monolith_export.py checks them)."""


Expected = Reject | Accept | Skip

_FAMILIES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgumentError, Code.INVALID_ARGUMENT),
    (errors.NotFoundError, Code.NOT_FOUND),
    (errors.AlreadyExistsError, Code.ALREADY_EXISTS),
    (errors.FailedPreconditionError, Code.FAILED_PRECONDITION),
    (errors.CheckpointCorruptError, Code.DATA_LOSS),
    (errors.PathOutsideRootError, Code.PERMISSION_DENIED),
    (errors.ResourceExhaustedError, Code.RESOURCE_EXHAUSTED),
    (MemoryError, Code.RESOURCE_EXHAUSTED),
)


def status_for(e: BaseException) -> grpc.StatusCode:
    """The status docs/architecture.md decision 6 gives an engine or file error; anything else is a
    bug and fails the test."""
    for cls, code in _FAMILIES:
        if isinstance(e, cls):
            return code
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # a bad path
        return Code.INVALID_ARGUMENT
    if isinstance(e, NotADirectoryError | FileExistsError):
        return Code.FAILED_PRECONDITION
    raise AssertionError(f"the reference engine raised an unexpected {e!r}") from e


def attempt(work: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, status)`` for an engine error."""
    try:
        return True, work()
    except (errors.ShardError, MemoryError, OSError) as e:
        return False, status_for(e)


# ---------------------------------------------------------------- the wire contract


def decode_ids(t: pb.Tensor) -> np.ndarray | None:
    """int64 ids of a Tensor per the contract, None if it breaks it."""
    shape = list(t.shape)
    if not shape:
        return None if t.data else np.zeros(0, dtype=np.int64)
    if len(shape) != 1 or shape[0] < 0 or len(t.data) != 8 * shape[0]:
        return None
    return np.frombuffer(t.data, dtype="<i8").astype(np.int64)


#: ``FloatWire`` (ps_service.proto): bytes per value of float32, float16, bfloat16.
WIRE_BYTES = {0: 4, 1: 2, 2: 2}


def widen_wire(raw: bytes, wire: int) -> np.ndarray:
    """float32 values of ``raw`` sent as ``FloatWire`` ``wire``: IEEE binary16 for
    float16, the top half of a float32 for bfloat16."""
    if wire == 1:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if wire == 2:
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def narrow_wire(values: np.ndarray, wire: int) -> bytes:
    """``values`` in ``FloatWire`` ``wire``, rounded to nearest, ties to even (the
    documented rounding); NaN stays a quiet NaN."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    if wire == 1:
        return a.astype("<f2").tobytes()
    if wire == 2:
        u = a.view(np.uint32).astype(np.uint64)
        top = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(a)
        top[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
        return top.astype("<u2").tobytes()
    return a.astype("<f4").tobytes()


def decode_floats(t: pb.Tensor, rows: int | None = None, wire: int = 0
                  ) -> np.ndarray | None:
    """float32 array of a Tensor per the contract (1-D or 2-D; with ``rows``, one row
    per id; values sent as ``FloatWire`` ``wire``), None if it breaks it."""
    if wire not in WIRE_BYTES:
        return None
    shape = list(t.shape)
    if not shape:
        if t.data:
            return None
        shape = [0]
    if len(shape) > 2 or any(d < 0 for d in shape) or (
            len(t.data) != WIRE_BYTES[wire] * math.prod(shape)):
        return None
    try:
        arr = widen_wire(t.data, wire).reshape(shape)
    except ValueError:  # no data, but a dimension no array can have
        return None
    if rows is not None:
        if len(shape) == 2 and shape[0] != rows:
            return None
        if len(shape) == 1 and (shape[0] % rows if rows else shape[0]):
            return None
    return arr


def fits_rows(arr: np.ndarray, n: int, dim: int) -> bool:
    """Whether values/grads can be a table's ``[n, dim]`` rows (flat is fine)."""
    return arr.shape == (n, dim) or (arr.ndim == 1 and arr.size == n * dim)


def tensor(arr: np.ndarray, wire: int = 0) -> pb.Tensor:
    a = np.ascontiguousarray(arr)
    if a.dtype.kind in "iu":
        return pb.Tensor(data=a.astype("<i8").tobytes(), shape=list(a.shape))
    return pb.Tensor(data=narrow_wire(a, wire), shape=list(a.shape))


# ---------------------------------------------------------------- the harness


class Harness:
    """The live shard, its reference twin and the data root they share."""

    def __init__(self, server: RunningServer, root: Path, outside: Path) -> None:
        self.server = server
        self.shard = server.shard
        self.root = root
        self.outside = outside
        self.index = self.shard.shard_index
        self.num = self.shard.num_shards
        self.ref = Shard(self.index, self.num)
        self.fingerprint: dict[str, Any] = {}
        self.rpcs = {name: server.channel.unary_unary(path)
                     for name, (path, _, _) in METHODS.items()}
        self.client_id = f"fuzz-{uuid.uuid4().hex[:12]}"
        self.tags_sent = 0
        #: The cluster id the live shard holds (a JoinCluster may set it, once).
        self.cluster_id = ""

    # ------------------------------------------------------------ state

    def reset(self, serving: bool) -> None:
        """Shard and reference back to the baseline; the data root emptied."""
        base = baseline(serving, self.index, self.num)
        fresh = copy.deepcopy(base)
        self.shard.tables.clear()
        self.shard.tables.update(fresh.tables)
        self.shard.filters.clear()
        self.shard.filters.update(fresh.filters)
        self.ref = copy.deepcopy(base)
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (self.root / "link").symlink_to(self.outside)
        (self.root / "plain_file").write_bytes(b"not a directory")
        self.fingerprint = shard_fingerprint(self.shard)
        assert self.fingerprint == shard_fingerprint(self.ref)

    def sync_new_random_filters(self) -> None:
        """A new probabilistic filter draws from OS entropy: give the shard's the
        reference's generator state so both decide alike from now on."""
        for name, slot in self.ref.filters.items():
            rng = getattr(slot.hash_filter, "_rng", None)
            live = self.shard.filters.get(name)
            if rng is not None and live is not None and name not in self.fingerprint["filters"]:
                live.hash_filter._rng.state = rng.state

    # ------------------------------------------------------------ one request

    def expect(self, method: str, payload: bytes) -> Expected:
        if len(payload) > MAX_MESSAGE:
            return Reject(frozenset({Code.RESOURCE_EXHAUSTED}))
        _, request_type, _ = METHODS[method]
        try:
            request = request_type.FromString(payload)
        except DecodeError:
            return Reject(frozenset({Code.INVALID_ARGUMENT}))
        return ANALYZERS[method](self, request)

    def fresh_tag(self, method: str, payload: bytes) -> bytes:
        """A tagged update (``RequestTag`` with a client id and a sequence number) gets a
        tag never sent before: the shard answers a repeated tag with the first answer
        without applying it again (exactly-once), which is not what is fuzzed here."""
        if method not in TAGGED:
            return payload
        try:
            request = METHODS[method][1].FromString(payload)
        except DecodeError:
            return payload
        if not (request.tag.client_id and request.tag.seq):
            return payload  # untagged: applied every time
        self.tags_sent += 1
        request.tag.client_id = self.client_id
        request.tag.seq = self.tags_sent
        return request.SerializeToString()

    def send(self, method: str, payload: bytes) -> None:
        """Send one request and check its outcome against the reference."""
        payload = self.fresh_tag(method, payload)
        before = self.fingerprint  # of the shard and of the reference: they are equal
        expected = self.expect(method, payload)
        if isinstance(expected, Skip):
            return
        t0 = time.perf_counter()
        try:
            answer = self.rpcs[method](payload, timeout=CALL_DEADLINE)
            code, details = Code.OK, ""
        except grpc.RpcError as err:
            call: Any = err
            code, details = call.code(), call.details() or ""
            answer = None
        STATS.seconds[method] += time.perf_counter() - t0
        STATS.outcomes[(method, code.name)] += 1
        where = f"{method} of {len(payload)} bytes {payload[:200]!r}"
        if code == Code.DEADLINE_EXCEEDED:
            STATS.hangs += 1
            raise AssertionError(f"{where}: no answer within {CALL_DEADLINE:g} s (a hang)")
        if code in CRASH_CODES:
            STATS.crashes += 1
            raise AssertionError(f"{where}: the shard crashed: {code.name}: {details}")
        after = shard_fingerprint(self.shard)
        if isinstance(expected, Reject):
            assert code in expected.codes, (
                f"{where}: expected one of {sorted(c.name for c in expected.codes)}, got "
                f"{code.name}: {details}")
            assert details, f"{where}: {code.name} without details"
            assert after == before, f"{where}: rejected ({code.name}) but changed state"
            assert shard_fingerprint(self.ref) == before, f"{where}: the reference changed"
            return
        assert code == Code.OK, f"{where}: expected OK, got {code.name}: {details}"
        _, _, response_type = METHODS[method]
        got = response_type.FromString(answer)
        assert same_answer(method, got, expected.response), (
            f"{where}: answer differs from the reference\n got  {got}\n want "
            f"{expected.response}")
        if method in ("CreateHashFilter", "RestoreHashFilter", "Admin.RestoreCheckpoint"):
            self.sync_new_random_filters()
            after = shard_fingerprint(self.shard)
        ref_after = shard_fingerprint(self.ref)
        assert after == ref_after, f"{where}: accepted, but the shard differs from the reference"
        self.fingerprint = after

    # ------------------------------------------------------------ paths

    def resolve(self, path: str, *, prefix: bool = True) -> str | grpc.StatusCode:
        """The data-root rule: no NUL, under 4096 characters and 128 levels; relative
        paths under the root, symlinks resolved, the result inside the root (strictly,
        for a file prefix)."""
        if not path or "\0" in path or len(path) >= 4096 or path.count("/") >= 128:
            return Code.INVALID_ARGUMENT  # empty, NUL, too long or too deep
        root = os.path.realpath(self.root)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root or (prefix and full == root):
            return Code.PERMISSION_DENIED
        return full


def _without_filler(message: Message) -> Message:
    """``message`` with the ``align`` filler of its tensors cleared: writers may put it
    before a payload (``protos/wire.py``); it carries no value."""
    clean = type(message)()
    clean.CopyFrom(message)
    for _, value in clean.ListFields():
        if isinstance(value, pb.Tensor):
            value.ClearField("align")
    return clean


def same_answer(method: str, got: Message, want: Message) -> bool:
    if method == "Admin.Stats":
        keep = ("shard_index", "num_shards", "version", "entries", "memory_bytes")
        if any(getattr(got, f) != getattr(want, f) for f in keep):
            return False
        tables = [(t.name, t.entries, t.memory_bytes, t.dim_size, t.hash_filter,
                   t.max_update_ts, t.feature_eviction) for t in got.tables]
        return tables == [(t.name, t.entries, t.memory_bytes, t.dim_size, t.hash_filter,
                           t.max_update_ts, t.feature_eviction) for t in want.tables] and list(
            got.hash_filters) == list(want.hash_filters)
    if method in ("Admin.SaveCheckpoint", "Admin.CommitCheckpoint", "Admin.RestoreCheckpoint"):
        return (got.prefix, sorted(got.files), got.entries, list(got.tables)) == (
            want.prefix, sorted(want.files), want.entries, list(want.tables))
    return _without_filler(got) == _without_filler(want)


def answer(response: Message) -> Expected:
    """Accept, unless the answer itself would exceed the shard's message limit."""
    if response.ByteSize() > MAX_MESSAGE:
        return Reject(frozenset({Code.RESOURCE_EXHAUSTED}))
    return Accept(response)


def rejected(codes: set[grpc.StatusCode]) -> Reject:
    return Reject(frozenset(codes))


# ---------------------------------------------------------------- analyzers (one per RPC)


def _table(h: Harness, name: str, codes: set[grpc.StatusCode], *, training: bool = False
           ) -> Any:
    slot = h.ref.tables.get(name)
    if slot is None:
        codes.add(Code.NOT_FOUND)
        return None
    if training and slot.table.layout.serving:
        codes.add(Code.FAILED_PRECONDITION)
    return slot.table


def a_lookup(h: Harness, m: pb.LookupRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes)
    ids = decode_ids(m.ids)
    if ids is None or m.values_wire not in WIRE_BYTES:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    return answer(pb.LookupResponse(values=tensor(table.lookup(ids), m.values_wire)))


def a_lookup_entry(h: Harness, m: pb.LookupEntryRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes, training=True)
    ids = decode_ids(m.ids)
    if ids is None:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    return answer(pb.LookupEntryResponse(entries=lookup_entry(table, ids)))


def _assign(h: Harness, m: pb.AssignRequest, add: bool) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes)
    ids = decode_ids(m.ids)
    values = None if ids is None else decode_floats(m.values, rows=ids.shape[0])
    if values is None or (table is not None and not fits_rows(values, ids.size, table.dim)):
        codes.add(Code.INVALID_ARGUMENT)
    if m.req_time < 0:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    # Through the reference shard, which refuses NaN and infinity as the live one does.
    op = h.ref.assign_add if add else h.ref.assign
    ok, status = attempt(lambda: op(m.table, ids, values, m.req_time))
    return answer(pb.UpdateResponse()) if ok else rejected({status})


def a_apply_gradients(h: Harness, m: pb.ApplyGradientsRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes, training=True)
    ids = decode_ids(m.ids)
    grads = None if ids is None else decode_floats(m.grads, rows=ids.shape[0],
                                                   wire=m.grads_wire)
    if grads is None or (table is not None and not fits_rows(grads, ids.size, table.dim)):
        codes.add(Code.INVALID_ARGUMENT)
    if table is not None and len(m.learning_rates) != table.num_segments:
        codes.add(Code.INVALID_ARGUMENT)
    if m.req_time < 0:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    lrs = np.array(m.learning_rates, dtype=np.float32)
    ok, status = attempt(lambda: h.ref.apply_gradients(
        m.table, ids, grads, lrs, m.global_step, enable_dedup=m.enable_dedup,
        req_time=m.req_time))
    return answer(pb.UpdateResponse()) if ok else rejected({status})


def _fused_common(h: Harness, tables: Any, blocks: Any, ids: np.ndarray | None,
                  codes: set[grpc.StatusCode]) -> list[Any]:
    found = [_table(h, name, codes) for name in tables]
    for b in blocks:
        if not 0 <= b.table_index < len(found) or b.num_ids < 0:
            codes.add(Code.INVALID_ARGUMENT)
    if ids is None or sum(b.num_ids for b in blocks) != ids.size:
        codes.add(Code.INVALID_ARGUMENT)
    return found


def a_fused_lookup(h: Harness, m: pb.FusedLookupRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    ids = decode_ids(m.ids)
    _fused_common(h, m.tables, m.blocks, ids, codes)
    if m.values_wire not in WIRE_BYTES:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    blocks = [(b.table_index, b.num_ids) for b in m.blocks]
    ok, values = attempt(lambda: h.ref.fused_lookup(list(m.tables), blocks, ids))
    if not ok:
        return rejected({values})
    return answer(pb.FusedLookupResponse(values=tensor(values, m.values_wire)))


def a_fused_optimize(h: Harness, m: pb.FusedOptimizeRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    ids = decode_ids(m.ids)
    found = _fused_common(h, m.tables, m.blocks, ids, codes)
    grads = decode_floats(m.grads, wire=m.grads_wire)
    if grads is None:
        codes.add(Code.INVALID_ARGUMENT)
    if m.req_time < 0:
        codes.add(Code.INVALID_ARGUMENT)
    if all(t is not None for t in found):
        if len(m.learning_rates) != sum(t.num_segments for t in found):
            codes.add(Code.INVALID_ARGUMENT)
        usable = [b for b in m.blocks if 0 <= b.table_index < len(found)]
        if any(found[b.table_index].layout.serving for b in usable):
            codes.add(Code.FAILED_PRECONDITION)
        if grads is not None and len(usable) == len(m.blocks) and grads.size != sum(
                b.num_ids * found[b.table_index].dim for b in m.blocks):
            codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    blocks = [(b.table_index, b.num_ids) for b in m.blocks]
    ok, status = attempt(lambda: h.ref.fused_optimize(
        list(m.tables), blocks, ids, grads, np.array(m.learning_rates, dtype=np.float32),
        m.global_step, enable_grad_accumulation=m.enable_grad_accumulation,
        req_time=m.req_time))
    return answer(pb.UpdateResponse()) if ok else rejected({status})


def a_intercept(h: Harness, m: pb.InterceptGradientRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    if m.hash_filter not in h.ref.filters:
        codes.add(Code.NOT_FOUND)
    ids = decode_ids(m.ids)
    grads = None if ids is None else decode_floats(m.grads, rows=ids.shape[0])
    if grads is None:
        codes.add(Code.INVALID_ARGUMENT)
    if codes:
        return rejected(codes)
    ok, out = attempt(lambda: h.ref.intercept_gradient(m.hash_filter, ids, grads))
    if not ok:
        return rejected({out})
    return answer(pb.InterceptGradientResponse(grads=tensor(out)))


def a_size(h: Harness, m: pb.SizeRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes)
    return rejected(codes) if codes else answer(pb.SizeResponse(size=table.size()))


def a_save_as_tensor(h: Harness, m: pb.SaveAsTensorRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    table = _table(h, m.table, codes, training=True)
    if codes:
        return rejected(codes)
    ok, out = attempt(lambda: save_as_tensor(table, m.shard_idx, m.num_shards, m.limit,
                                                   m.offset))
    if not ok:
        return rejected({out})
    return answer(pb.SaveAsTensorResponse(offset=out[0], entries=out[1]))


def expected_shard_info(shard: Shard) -> pb.ShardInfo:
    info = pb.ShardInfo(shard_index=shard.shard_index, num_shards=shard.num_shards,
                        version=ps_server.__version__)
    for name, slot in sorted(shard.tables.items()):
        t = slot.table
        info.tables.append(pb.TableInfo(
            name=name, dim_size=t.dim, num_segments=t.num_segments, size=t.size(),
            config=slot.config_bytes, hash_filter=slot.hash_filter,
            extra_restore_names=slot.extra_restore_names, saver_parallel=slot.saver_parallel,
            max_update_ts=t.max_update_ts, memory_bytes=t.nbytes()))
    for name, fslot in sorted(shard.filters.items()):
        info.hash_filters.append(pb.HashFilterInfo(
            name=name, filter_type=fslot.options.filter_type,
            enabled=fslot.options.enable_hash_filter, split_num=fslot.hash_filter.split_num,
            **filter_numbers(fslot.hash_filter)))
    return info


def filter_numbers(flt: Any) -> dict[str, Any]:
    if isinstance(flt, SlidingHashFilter):
        return {"failure_count": int(flt.failure_count),
                "fill_ratio": float(flt.num_elements.sum()) / flt.capacity}
    return {"failure_count": 0, "fill_ratio": 0.0}


def a_shard_info(h: Harness, m: pb.ShardInfoRequest) -> Expected:
    info = expected_shard_info(h.ref)
    info.cluster_id = h.cluster_id
    return answer(info)


def a_join_cluster(h: Harness, m: pb.JoinClusterRequest) -> Expected:
    if not m.cluster_id or cluster_id_problem(m.cluster_id):
        return rejected({Code.INVALID_ARGUMENT})
    if (m.shard_index, m.num_shards) != (h.index, h.num) or h.cluster_id not in (
            "", m.cluster_id):
        return rejected({Code.FAILED_PRECONDITION})
    h.cluster_id = m.cluster_id
    return answer(pb.ShardInfo(shard_index=h.index, num_shards=h.num,
                               version=ps_server.__version__, cluster_id=h.cluster_id))


def a_list_tables(h: Harness, m: pb.ListTablesRequest) -> Expected:
    return answer(pb.ListTablesResponse(names=sorted(h.ref.tables)))


def a_create_filter(h: Harness, m: pb.CreateHashFilterRequest) -> Expected:
    options = FilterOptions(
        enable_hash_filter=m.enable_hash_filter,
        filter_type=m.filter_type or "sliding_hash_filter",
        occurrence_threshold_config=m.occurrence_threshold_config,
        capacity=m.capacity or DEFAULT_CAPACITY, split_num=m.split_num or DEFAULT_SPLIT,
        equal_probability=m.equal_probability)
    ok, out = attempt(lambda: h.ref.create_hash_filter(m.name, options))
    return answer(pb.CreateResponse(created=out)) if ok else rejected({out})


def a_create_table(h: Harness, m: pb.CreateTableRequest) -> Expected:
    ok, out = attempt(lambda: h.ref.create_table(
        m.name, m.config, hash_filter=m.hash_filter,
        extra_restore_names=list(m.extra_restore_names),
        saver_parallel=m.saver_parallel or -1, allow_existing=m.allow_existing))
    return answer(pb.CreateResponse(created=out)) if ok else rejected({out})


# ------------------------------------------------------------ files


def os_defects(files: list[str], dirs: list[str]) -> set[grpc.StatusCode]:
    """What writing ``files`` (their directories created) and creating ``dirs`` must
    fail with: a name too long (INVALID_ARGUMENT), a file where a directory must be
    (FAILED_PRECONDITION)."""
    codes: set[grpc.StatusCode] = set()
    for path in files + dirs:
        if len(path.encode()) >= 4096 or any(len(c.encode()) > 255 for c in path.split("/")):
            codes.add(Code.INVALID_ARGUMENT)
    for path in [os.path.dirname(f) for f in files] + dirs:
        probe = path
        while probe and probe != "/":
            with contextlib.suppress(OSError):
                if os.path.lexists(probe) and not os.path.isdir(probe):
                    codes.add(Code.FAILED_PRECONDITION)
            probe = os.path.dirname(probe)
    return codes


def _path(h: Harness, path: str, codes: set[grpc.StatusCode], *, prefix: bool = True
          ) -> str | None:
    full = h.resolve(path, prefix=prefix)
    if isinstance(full, grpc.StatusCode):
        codes.add(full)
        return None
    return full


_TMP = "-tmp-0123456789abcdef"


def a_save(h: Harness, m: pb.SaveRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, m.basename, codes)
    table = _table(h, m.table, codes, training=True)
    if full is not None and table is not None:
        slot = h.ref.tables[m.table]
        count = (max(1, slot.saver_parallel) if slot.saver_parallel >= 0
                 else table_files.default_nshards(table.size()))
        files = [table_files.part_name(full, h.index, k, count) for k in range(count)]
        codes |= os_defects([f + _TMP for f in files], [])
    if codes:
        return rejected(codes)
    entries = table.size() - expired_count(table)
    return answer(pb.SaveResponse(files=files, entries=entries))


def expired_count(table: Any) -> int:
    probe = copy.deepcopy(table)
    return evict_expired(probe)


def a_restore(h: Harness, m: pb.RestoreRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, m.basename, codes)
    table = _table(h, m.table, codes)
    if codes:
        return rejected(codes)
    ok, out = attempt(lambda: table_files.restore_table(
        table, full, shard_index=h.index, num_shards=h.num,
        validate_only=m.validate_only))
    if not ok:
        return rejected({out})
    return answer(pb.RestoreResponse(entries=out.entries, files=out.files))


def a_save_filter(h: Harness, m: pb.HashFilterFilesRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, m.basename, codes)
    slot = h.ref.filters.get(m.hash_filter)
    if slot is None:
        codes.add(Code.NOT_FOUND)
    files: list[str] = []
    if full is not None and slot is not None:
        n = slot.hash_filter.split_num
        files = [filter_dump.filter_file_name(full, i, n) for i in range(n)]
        codes |= os_defects([f + _TMP for f in files], [])
    if codes:
        return rejected(codes)
    return answer(pb.HashFilterFilesResponse(files=files))


def a_restore_filter(h: Harness, m: pb.HashFilterFilesRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, m.basename, codes)
    slot = h.ref.filters.get(m.hash_filter)
    if slot is None:
        codes.add(Code.NOT_FOUND)
    if codes:
        return rejected(codes)
    ok, out = attempt(lambda: filter_dump.restore_filter(
        slot.hash_filter, full, validate_only=m.validate_only))
    return answer(pb.HashFilterFilesResponse(files=out)) if ok else rejected({out})


def _checkpoint_save(h: Harness, model_dir: str, step: int) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, model_dir, codes, prefix=False)
    if step < 0:
        codes.add(Code.INVALID_ARGUMENT)
    if any(s.table.layout.serving for s in h.ref.tables.values()):
        codes.add(Code.FAILED_PRECONDITION)
    if full is not None:
        codes |= os_defects([], [os.path.join(full, f"model.ckpt-{step}.assets")])
    if codes:
        return rejected(codes)
    prefix = checkpoints.checkpoint_prefix(full, step)
    files, entries = saved_files(h.ref, prefix)
    return answer(pb.AdminCheckpointResponse(prefix=prefix, files=files, entries=entries,
                                             tables=sorted(h.ref.tables)))


def saved_files(shard: Shard, prefix: str) -> tuple[list[str], int]:
    """The files and entries a whole-shard save of the reference writes."""
    assets = checkpoints.asset_dir(prefix)
    files: list[str] = []
    entries = 0
    for name, slot in sorted(shard.tables.items()):
        t = slot.table
        count = (max(1, slot.saver_parallel) if slot.saver_parallel >= 0
                 else table_files.default_nshards(t.size()))
        base = os.path.join(assets, checkpoints.file_stem(name))
        files += [table_files.part_name(base, shard.shard_index, k, count)
                  for k in range(count)]
        entries += t.size() - expired_count(t)
    used = sorted({s.hash_filter for s in shard.tables.values() if s.hash_filter})
    saving = [n for n in used if shard.hash_filter(n).hash_filter.split_num > 0]
    for name in saving:
        stem = "hash_filter" if len(saving) == 1 else f"hash_filter_{checkpoints.file_stem(name)}"
        n = shard.hash_filter(name).hash_filter.split_num
        base = os.path.join(assets, f"{stem}_{shard.shard_index}")
        files += [filter_dump.filter_file_name(base, i, n) for i in range(n)]
    return files, entries


def _checkpoint_commit(h: Harness, model_dir: str, step: int, keep: int) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, model_dir, codes, prefix=False)
    if step < 0 or keep < 0:
        codes.add(Code.INVALID_ARGUMENT)
    if full is not None:
        codes |= os_defects([os.path.join(full, "checkpoint" + _TMP)],
                            [os.path.join(full, f"model.ckpt-{step}.assets")])
        if not _saved(checkpoints.checkpoint_prefix(full, step)):
            codes.add(Code.FAILED_PRECONDITION)  # nothing was saved at this step
    if codes:
        return rejected(codes)
    prefix = checkpoints.checkpoint_prefix(full, step)
    with contextlib.suppress(errors.CheckpointCorruptError):
        _, listed = checkpoints.read_checkpoint_index(full)
        steps = {int(os.path.basename(p).rpartition("-")[2]) for p in listed
                 if os.path.basename(p).rpartition("-")[2].isdigit()} | {step}
        if keep and step not in sorted(steps)[-keep:]:
            return rejected({Code.FAILED_PRECONDITION})  # below the kept steps
    files = [os.path.join(checkpoints.asset_dir(prefix), "manifest.json"),
             os.path.join(full, "checkpoint")]
    return answer(pb.AdminCheckpointResponse(prefix=prefix, files=files, entries=0,
                                             tables=sorted(h.ref.tables)))


def _saved(prefix: str) -> bool:
    """A commit of ``prefix`` has something to commit: the (one) shard's part list, or
    a committed manifest with file lists."""
    if os.path.exists(prefix + ".parts-0.json"):
        return True
    try:
        with open(os.path.join(checkpoints.asset_dir(prefix), "manifest.json"), "rb") as f:
            return "files" in json.loads(f.read())
    except (OSError, ValueError):
        return False


def _checkpoint_restore(h: Harness, model_dir: str, prefix: str, validate: bool,
                        missing_ok: bool) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, model_dir, codes, prefix=False)
    if prefix and not os.path.dirname(prefix):
        prefix = os.path.join(model_dir, prefix)  # a bare model.ckpt-N is in model_dir
    resolved = _path(h, prefix, codes) if prefix else None
    if codes:
        return rejected(codes)
    if resolved is None:
        # The latest: the checkpoint the index names must lie in the data root too.
        ok, latest = attempt(lambda: checkpoints.latest_checkpoint(full))
        if not ok:
            return rejected({latest})
        if latest is not None:
            resolved = _path(h, latest, codes)
            if codes:
                return rejected(codes)
    ok, out = attempt(lambda: checkpoints.restore_shard_checkpoint(
        h.ref, full, resolved, validate))
    if not ok:
        return rejected({out})
    if not out.prefix and not missing_ok:
        return rejected({Code.NOT_FOUND})
    return answer(pb.AdminCheckpointResponse(prefix=out.prefix, files=out.files,
                                             entries=out.entries, tables=out.tables))


def a_evict(h: Harness, m: pb.EvictRequest) -> Expected:
    if m.table and m.table not in h.ref.tables:
        return rejected({Code.NOT_FOUND})
    names = [m.table] if m.table else sorted(h.ref.tables)
    response = pb.EvictResponse()
    for name in names:
        t = h.ref.table(name)
        n = evict_expired(t)
        response.tables.append(pb.TableEviction(table=name, evicted=n, remaining=t.size()))
        response.evicted += n
    return answer(response)


def a_stats(h: Harness, m: pb.StatsRequest) -> Expected:
    response = pb.StatsResponse(shard_index=h.index, num_shards=h.num,
                                version=ps_server.__version__, cluster_id=h.cluster_id)
    for name, slot in sorted(h.ref.tables.items()):
        t = slot.table
        response.tables.append(pb.TableStats(
            name=name, entries=t.size(), memory_bytes=t.nbytes(), dim_size=t.dim,
            hash_filter=slot.hash_filter, max_update_ts=t.max_update_ts,
            feature_eviction=t.config.enable_feature_eviction))
        response.entries += t.size()
        response.memory_bytes += t.nbytes()
    for name, fslot in sorted(h.ref.filters.items()):
        flt = fslot.hash_filter
        numbers = filter_numbers(flt)
        response.hash_filters.append(pb.HashFilterStats(
            name=name, filter_type=fslot.options.filter_type,
            enabled=fslot.options.enable_hash_filter, fill_ratio=numbers["fill_ratio"],
            failure_count=numbers["failure_count"],
            capacity=flt.capacity if isinstance(flt, SlidingHashFilter) else 0))
    return answer(response)


def a_drain(h: Harness, m: pb.DrainRequest) -> Expected:
    if not m.grace_seconds >= 0:
        return rejected({Code.INVALID_ARGUMENT})
    return Skip()


def a_export(h: Harness, m: pb.AdminExportRequest) -> Expected:
    codes: set[grpc.StatusCode] = set()
    full = _path(h, m.model_dir, codes, prefix=False)
    valid = (m.global_step >= 0 and m.layout in monolith_export.LAYOUTS
             and 0 <= m.num_ps <= monolith_export.MAX_NUM_PS)
    if not valid:
        codes.add(Code.INVALID_ARGUMENT)
    if full is not None:
        assets = os.path.join(full, f"model.ckpt-{m.global_step}.assets")
        codes |= os_defects([], [assets])
        if os.path.exists(os.path.join(assets, "manifest.json")):
            codes.add(Code.FAILED_PRECONDITION)  # our own checkpoint is there
        if not m.commit and any(s.table.layout.serving for s in h.ref.tables.values()):
            codes.add(Code.FAILED_PRECONDITION)
        if m.commit and valid and not _exported(h, assets, m.layout, m.num_ps):
            codes.add(Code.FAILED_PRECONDITION)  # the shards' files are not there
    return rejected(codes) if codes else Skip()


def _exported(h: Harness, assets: str, layout: str, num_ps: int) -> bool:
    """Every file an export's commit checks is in ``assets``."""
    multi = layout == "monolith-multi"
    for stem in monolith_export.resource_stems(layout, num_ps, sorted(h.ref.tables)):
        for k in range(h.num):
            names = [f"{stem}-{k:05d}-of-{h.num:05d}"]
            names += [f"{stem}.meta-{k:05d}-of-{h.num:05d}"] if multi else []
            if not all(os.path.isfile(os.path.join(assets, n)) for n in names):
                return False
    return True


ANALYZERS: dict[str, Callable[[Harness, Any], Expected]] = {
    "GetShardInfo": a_shard_info,
    "CreateHashFilter": a_create_filter,
    "CreateTable": a_create_table,
    "ListTables": a_list_tables,
    "Lookup": a_lookup,
    "LookupEntry": a_lookup_entry,
    "Assign": lambda h, m: _assign(h, m, add=False),
    "AssignAdd": lambda h, m: _assign(h, m, add=True),
    "ApplyGradients": a_apply_gradients,
    "FusedLookup": a_fused_lookup,
    "FusedOptimize": a_fused_optimize,
    "InterceptGradient": a_intercept,
    "Size": a_size,
    "SaveAsTensor": a_save_as_tensor,
    "JoinCluster": a_join_cluster,
    "SaveTable": a_save,
    "RestoreTable": a_restore,
    "SaveHashFilter": a_save_filter,
    "RestoreHashFilter": a_restore_filter,
    "Admin.SaveCheckpoint": lambda h, m: _checkpoint_save(h, m.model_dir, m.global_step),
    "Admin.CommitCheckpoint": lambda h, m: _checkpoint_commit(
        h, m.model_dir, m.global_step, m.max_to_keep),
    "Admin.RestoreCheckpoint": lambda h, m: _checkpoint_restore(
        h, m.model_dir, m.prefix, m.validate_only, m.missing_ok),
    "Admin.ExportCheckpoint": a_export,
    "Admin.Evict": a_evict,
    "Admin.Stats": a_stats,
    "Admin.Drain": a_drain,
}
assert set(ANALYZERS) == set(METHODS), set(METHODS) ^ set(ANALYZERS)


# ---------------------------------------------------------------- plain calls


def call(server: RunningServer, test: str, method: str, request: Message | bytes
         ) -> tuple[grpc.StatusCode, str, bytes | None]:
    """Send one request to ``server`` and count it in :data:`STATS` under ``test``:
    ``(code, details, answer bytes)``. A crash status or a hang fails the test."""
    path = METHODS[method][0]
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    t0 = time.perf_counter()
    try:
        answer_bytes: bytes | None = server.channel.unary_unary(path)(raw, timeout=CALL_DEADLINE)
        code, details = Code.OK, ""
    except grpc.RpcError as err:
        failure: Any = err
        code, details, answer_bytes = failure.code(), failure.details() or "", None
    STATS.seconds[method] += time.perf_counter() - t0
    STATS.outcomes[(method, code.name)] += 1
    STATS.by_test[test] += 1
    if code == Code.DEADLINE_EXCEEDED:
        STATS.hangs += 1
        raise AssertionError(f"{method} {request!r:.300}: no answer within {CALL_DEADLINE:g} s")
    if code in CRASH_CODES:
        STATS.crashes += 1
        raise AssertionError(f"{method} {request!r:.300}: the shard crashed: {code.name}: "
                             f"{details}")
    return code, details, answer_bytes
