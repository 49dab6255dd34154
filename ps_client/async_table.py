"""The async handle on one logical table, which lives on every shard of the cluster.

:class:`AsyncTable` routes each id to its owner (``floormod(id, num_shards)``), calls
the shards concurrently through the :class:`ps_client.transport.Transport` and puts
the answers back in the caller's order. :class:`ps_client.Table` is its synchronous
face (the user-facing contract); these coroutines implement it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from protos import embedding_hash_table_pb2 as eht
from protos import ps_service_pb2 as pb
from protos.wire import FLOAT32, FLOAT_WIRES, narrow, widen, wire_of
from ps_client._codec import Gather, adopt, encode_request, read_half_rows, read_rows
from ps_client.errors import PsInvalidArgument
from ps_client.learning_rate_functions import LearningRate, evaluate_learning_rates
from ps_client.routing import (
    RowAssembly,
    as_global_step,
    as_ids,
    as_rows,
    dedup,
    partition,
    scatter_objects,
)
from ps_client.transport import Transport

WIRE_DTYPE_NAMES = tuple(FLOAT_WIRES)
"""The names ``wire_dtype`` takes: ``"float32"`` (the default), ``"float16"``, ``"bfloat16"``."""

CURSOR_SHARD_SHIFT = 40
"""``save_as_tensor`` cursors are ``real_shard << 40 | row offset on that shard``."""


@dataclass(frozen=True)
class TableSpec:
    """What the client knows of a table.

    :ivar name: the table's name on every shard.
    :ivar config: its ``EmbeddingHashTableConfig``.
    :ivar learning_rate_fns: one learning rate (or function of the step) per segment.
    :ivar hash_filter: name of the shards' filter it consults ("" = none).
    :ivar extra_restore_names: other names its files may have been saved under.
    :ivar saver_parallel: Monolith's saver parallelism hint, passed to the shards.
    """

    name: str
    config: eht.EmbeddingHashTableConfig
    learning_rate_fns: tuple[LearningRate, ...]
    hash_filter: str = ""
    extra_restore_names: tuple[str, ...] = ()
    saver_parallel: int = -1
    dim_size: int = field(init=False)
    num_segments: int = field(init=False)

    def __post_init__(self) -> None:
        segments = self.config.entry_config.segments
        object.__setattr__(self, "dim_size", sum(int(s.dim_size) for s in segments))
        object.__setattr__(self, "num_segments", len(segments))


def check_learning_rate_fns(fns: Sequence[LearningRate], num_segments: int, table: str) -> None:
    """:raises PsInvalidArgument: wrong count (one per segment) or an item that is
    neither a number nor a callable."""
    if len(fns) != num_segments:
        raise PsInvalidArgument(
            f"table {table!r} has {num_segments} segment(s), so it needs {num_segments} "
            f"learning rate(s), got {len(fns)}"
        )
    for i, fn in enumerate(fns):
        if isinstance(fn, bool) or not (isinstance(fn, int | float) or callable(fn)):
            raise PsInvalidArgument(
                f"table {table!r}: learning rate #{i} must be a number or a callable, "
                f"got {fn!r}"
            )


def float_wire(wire_dtype: Any) -> tuple[pb.FloatWire, np.dtype[Any]]:
    """``(FloatWire number, element dtype)`` of a ``wire_dtype`` name (or numpy dtype).

    :raises PsInvalidArgument: not one of :data:`WIRE_DTYPE_NAMES`.
    """
    name = wire_dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(wire_dtype).name
        except TypeError:
            name = None
    number = FLOAT_WIRES.get(name) if isinstance(name, str) else None
    if number is None:
        raise PsInvalidArgument(
            f"wire_dtype must be one of {', '.join(WIRE_DTYPE_NAMES)}, got {wire_dtype!r}"
        )
    return cast(pb.FloatWire, number), wire_of(number)


class _HalfRows:
    """Shards' half-wire answers put into the caller's order, widened to float32 once
    at the end: several shards' rows are joined and gathered as 2-byte items
    (:class:`ps_client.routing.RowAssembly`, half the bytes a float32 placement moves),
    and a single shard's answer is widened straight from the received bytes."""

    def __init__(self, positions: Sequence[npt.NDArray[np.int64]],
                 inverse: npt.NDArray[np.int64] | None, dim: int, wire: np.dtype[Any]) -> None:
        self.positions = positions
        self.inverse = inverse
        self.dim = dim
        self.wire = wire
        self.count = sum(int(p.shape[0]) for p in positions)
        self._joined: RowAssembly | None = None
        if len(positions) > 1:
            self._joined = RowAssembly(positions, inverse, dim, dtype=wire)
        self._only: npt.NDArray[Any] | None = None

    def add(self, shard: int, rows: npt.NDArray[Any], *, owned: bool = False) -> None:
        if self._joined is not None:
            self._joined.add(shard, rows, owned=owned)
        elif self.positions[shard].size and self.dim:
            self._only = rows  # one shard answered every unique id, in order

    def widened(self) -> npt.NDArray[np.float32]:
        if self._joined is not None:
            return widen(self._joined.out, self.wire)
        rows = self._only
        if rows is None:  # no rows, or rows of no floats
            rows = np.zeros((self.count, self.dim), dtype=self.wire)
        if self.inverse is not None:
            rows = np.take(rows, self.inverse, axis=0)
        return widen(rows, self.wire)


class AsyncTable:
    """One logical table spread over all shards (async twin of :class:`ps_client.Table`)."""

    def __init__(self, transport: Transport, spec: TableSpec) -> None:
        self._transport = transport
        self.spec = spec
        self._wire_dtype = "float32"

    @property
    def wire_dtype(self) -> str:
        """How this handle's lookups and gradients travel when a call does not say:
        ``"float32"`` (the default, exact), ``"float16"`` or ``"bfloat16"`` (half the
        bytes; rounding in docs/api.md). Settable; shared by every handle of the table
        in this client."""
        return self._wire_dtype

    @wire_dtype.setter
    def wire_dtype(self, value: Any) -> None:
        number, _ = float_wire(value)
        self._wire_dtype = WIRE_DTYPE_NAMES[number]

    def _wire(self, wire_dtype: Any) -> tuple[pb.FloatWire, np.dtype[Any]]:
        return float_wire(self._wire_dtype if wire_dtype is None else wire_dtype)

    @property
    def name(self) -> str:
        """The table's name."""
        return self.spec.name

    @property
    def dim_size(self) -> int:
        """Sum of the segments' dims."""
        return self.spec.dim_size

    @property
    def extra_restore_names(self) -> tuple[str, ...]:
        """Other names this table's files may carry."""
        return self.spec.extra_restore_names

    def __repr__(self) -> str:
        return f"AsyncTable({self.name!r}, dim_size={self.dim_size})"

    # ------------------------------------------------------------ reads

    async def lookup(self, ids: Any, *, wire_dtype: str | None = None
                     ) -> npt.NDArray[np.float32]:
        """``float32[len(ids), dim_size]``; missing ids read as zeros.

        Ids are deduplicated before they are sent; duplicates share one row.

        :param wire_dtype: how the values travel (None: :attr:`wire_dtype`); with
            ``"float16"`` or ``"bfloat16"`` each shard rounds its float32 rows to that
            form and the client widens them back to float32 (exactly).
        """
        number, wire = self._wire(wire_dtype)
        ids_ = as_ids(ids)
        dim = self.dim_size
        uniq, inverse = dedup(ids_)
        positions = partition(uniq, self._transport.num_shards)
        requests = [
            encode_request(pb.LookupRequest(table=self.name, values_wire=number),
                           ids=Gather(uniq, p))
            if p.size else None
            for p in positions
        ]
        what = f"Lookup of {self.name!r}"
        if wire != FLOAT32:
            half = _HalfRows(positions, inverse, dim, wire)

            def place_half(shard: int, answer: bytes) -> None:
                got = read_half_rows(answer, pb.LookupResponse, "values",
                                     positions[shard].size, dim, what, wire)
                mine = adopt(got, answer) if inverse is None else None
                half.add(shard, got if mine is None else mine, owned=mine is not None)

            await self._transport.each("Lookup", requests, on_answer=place_half)
            return half.widened()
        rows = RowAssembly(positions, inverse, dim)

        def place(shard: int, answer: bytes) -> None:
            got = read_rows(answer, pb.LookupResponse, "values", positions[shard].size,
                            dim, what)
            # The answer's bytes are this call's alone: rows of unique ids are handed
            # over in place rather than copied (a lone shard's, already in order, become
            # the result: 8 MiB at 65,536 x 32; several shards' are scattered from them).
            mine = adopt(got, answer) if inverse is None else None
            if mine is None:
                rows.add(shard, got)
            else:
                rows.add(shard, mine, owned=True)

        await self._transport.each("Lookup", requests, on_answer=place)
        return rows.out

    async def lookup_entry(self, ids: Any) -> list[bytes]:
        """Serialized ``EntryDump`` per id (``id`` unset), ``b""`` where missing."""
        ids_ = as_ids(ids)
        uniq, inverse = dedup(ids_)
        positions = partition(uniq, self._transport.num_shards)
        requests = [
            encode_request(pb.LookupEntryRequest(table=self.name), ids=Gather(uniq, p))
            if p.size else None
            for p in positions
        ]
        answers = await self._transport.each("LookupEntry", requests)
        parts: list[Sequence[bytes]] = []
        for a, p in zip(answers, positions, strict=True):
            got: Sequence[bytes] = (
                pb.LookupEntryResponse.FromString(a).entries if a is not None else []
            )
            if len(got) != p.size:
                raise PsInvalidArgument(
                    f"LookupEntry of {self.name!r}: {p.size} ids sent, {len(got)} entries back"
                )
            parts.append(got)
        entries = scatter_objects(parts, positions, uniq.shape[0])
        out: list[bytes] = (entries if inverse is None else entries[inverse]).tolist()
        return out

    async def size(self) -> int:
        """Number of entries over all shards."""
        answers = await self._transport.each("Size", pb.SizeRequest(table=self.name))
        return sum(int(a.size) for a in answers)

    async def save_as_tensor(
        self, shard_idx: int, num_shards: int, limit: int, offset: int
    ) -> tuple[int, list[bytes]]:
        """Up to ``limit`` entries (``EntryDump`` with ``id`` set) of part ``shard_idx``.

        Part ``i`` of ``num_shards`` is every entry of the *cluster* whose id has
        ``floormod(id, num_shards) == i``, whatever real shard holds it. The cursor
        (``offset``; 0 = start) is opaque: it encodes the real shard being read and
        that shard's own cursor (``real_shard << 40 | shard cursor``). Real shards
        that cannot hold part ``i`` (``(r - i) mod gcd(num_shards, cluster size) != 0``)
        are skipped. Fewer than ``limit`` entries back means the part is exhausted
        (exactly ``limit`` may be followed by an empty batch).

        :raises PsInvalidArgument: bad part, limit, or a cursor this method did not make.
        """
        n_real = self._transport.num_shards
        if num_shards <= 0 or not 0 <= shard_idx < num_shards:
            raise PsInvalidArgument(
                f"save_as_tensor needs 0 <= shard_idx < num_shards, got {shard_idx}/{num_shards}"
            )
        if limit < 0 or offset < 0:
            raise PsInvalidArgument(f"limit and offset must be >= 0, got {limit}, {offset}")
        real, pos = divmod(int(offset), 1 << CURSOR_SHARD_SHIFT)
        if real > n_real:
            raise PsInvalidArgument(
                f"save_as_tensor cursor {offset} names real shard {real}, but the cluster has "
                f"{n_real}"
            )
        step = math.gcd(num_shards, n_real)
        out: list[bytes] = []
        while real < n_real and len(out) < limit:
            if (real - shard_idx) % step:
                real, pos = real + 1, 0
                continue
            want = limit - len(out)
            answer = await self._transport.call(
                real,
                "SaveAsTensor",
                pb.SaveAsTensorRequest(
                    table=self.name, shard_idx=shard_idx, num_shards=num_shards,
                    limit=want, offset=pos,
                ),
            )
            out.extend(answer.entries)
            if len(answer.entries) < want:
                real, pos = real + 1, 0
            else:
                pos = int(answer.offset)
        return (real << CURSOR_SHARD_SHIFT) | pos, out

    # ------------------------------------------------------------ writes

    async def assign(self, ids: Any, values: Any, req_time: int = 0) -> None:
        """Overwrite (or create) the rows of ``ids``; a later duplicate wins."""
        await self._write("Assign", ids, values, req_time)

    async def assign_add(self, ids: Any, values: Any, req_time: int = 0) -> None:
        """Add ``values`` to the rows of ``ids`` (creating missing ones); duplicates add up."""
        await self._write("AssignAdd", ids, values, req_time)

    async def _write(self, method: str, ids: Any, values: Any, req_time: int) -> None:
        ids_ = as_ids(ids)
        vals = as_rows(values, ids_.shape[0], self.dim_size)
        positions = partition(ids_, self._transport.num_shards)
        requests = [
            encode_request(
                pb.AssignRequest(
                    table=self.name, req_time=req_time, tag=self._transport.next_tag()
                ),
                ids=Gather(ids_, p), values=Gather(vals, p),
            )
            if p.size or req_time > 0 else None
            for p in positions
        ]
        await self._transport.write_each(method, requests)

    async def apply_gradients(
        self, ids: Any, grads: Any, global_step: int, *, enable_dedup: bool = False,
        req_time: int = 0, wire_dtype: str | None = None,
    ) -> None:
        """Run the optimizer on every ``(id, grad)`` in order, each on its owner shard.

        Learning rates are evaluated here at ``global_step``. With ``enable_dedup`` each
        owner shard sums its duplicates and makes one step per id. With ``wire_dtype``
        ``"float16"`` or ``"bfloat16"`` (None: :attr:`wire_dtype`) the grads are rounded
        to that form here and widened back to float32 by each shard, whose optimizer
        math stays float32.

        :raises PsInvalidArgument: before any call: an unknown ``wire_dtype``,
            ``global_step`` not an int64 >= 0, grads complex or beyond float32's range,
            or of the wrong shape. A shard refuses NaN or infinite grads and rates
            (INVALID_ARGUMENT) unless started with ``--allow_non_finite``; a float16
            wire turns finite grads of magnitude 65520 or more into infinities.
        """
        number, wire = self._wire(wire_dtype)
        step = as_global_step(global_step)
        ids_ = as_ids(ids)
        g: npt.NDArray[Any] = as_rows(grads, ids_.shape[0], self.dim_size, "grads")
        if wire != FLOAT32:
            g = narrow(g, wire)
        lrs = evaluate_learning_rates(self.spec.learning_rate_fns, step)
        positions = partition(ids_, self._transport.num_shards)
        requests = [
            encode_request(
                pb.ApplyGradientsRequest(
                    table=self.name, learning_rates=lrs.tolist(), global_step=step,
                    enable_dedup=enable_dedup, req_time=req_time, grads_wire=number,
                    tag=self._transport.next_tag(),
                ),
                ids=Gather(ids_, p), grads=Gather(g, p),
            )
            # An empty batch still moves a shard's table clock to req_time.
            if p.size or req_time > 0 else None
            for p in positions
        ]
        await self._transport.write_each("ApplyGradients", requests)

    # ------------------------------------------------------------ files

    async def save(self, basename: str) -> list[str]:
        """Every shard ``i`` writes ``<basename>_<i>-%05d-of-%05d``; returns all files."""
        answers = await self._transport.each(
            "SaveTable", pb.SaveRequest(table=self.name, basename=basename), file_op=True
        )
        return [f for a in answers for f in a.files]

    async def restore(self, basename: str) -> int:
        """Replace the table with the files of ``basename`` (all-or-nothing across shards).

        Every shard first checks the files without touching its table; only if all
        agree do they restore. Returns the number of entries restored.
        """
        for validate_only in (True, False):
            answers = await self._transport.each(
                "RestoreTable",
                pb.RestoreRequest(table=self.name, basename=basename,
                                  validate_only=validate_only),
                file_op=True,
            )
        return sum(int(a.entries) for a in answers)
