"""Where each id goes and how answers come back: pure numpy, no gRPC.

Routing is Monolith's (docs/semantics.md §8): the owner of id ``x`` among ``n`` shards is
``floormod(x, n)`` on int64, so negative ids land in ``[0, n)`` too
(``-1 -> n - 1``). Every helper works on whole batches; none loops over ids.

The fused ops (docs/semantics.md §7) describe a *logical* layout of ``N = num_of_shards``
sending workers and ``K`` tables: block ``i = s * K + t`` holds the ids table ``t``
received from worker ``s``. :class:`FusedLayout` computes Monolith's offsets for it
and :class:`FusedRoute` maps its ids onto the *real* shards of a cluster, which may
be a different number: every real shard gets its own ids of every block, in block
order, and the answers are put back where Monolith's single process would put them.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from protos import wire
from protos.wire import row_items
from ps_client.errors import PsInvalidArgument

Ids = npt.NDArray[np.int64]
Positions = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float32]
Int32s = npt.NDArray[np.int32]

_EMPTY_POS: Positions = np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- conversion


_ERRORS = wire.Errors(PsInvalidArgument, PsInvalidArgument)


def as_ids(ids: Any, what: str = "ids") -> Ids:
    """``ids`` as a 1-D ``int64`` array (a scalar becomes one id).

    :raises PsInvalidArgument: not 1-D, not integral, or outside the int64 range.
    """
    return wire.as_ids(ids, what, _ERRORS)


def as_rows(values: Any, n: int, dim: int, what: str = "values") -> Floats:
    """``values`` as C-contiguous ``float32[n, dim]``; a flat ``n * dim`` array is reshaped.

    :raises PsInvalidArgument: not float32-convertible, complex, a finite value beyond
        float32's range (see :func:`as_float32`) or the wrong shape (the message gives
        the expected and the actual shape).
    """
    arr = as_float32(values, what, row_width=dim)
    return np.ascontiguousarray(wire.as_rows(arr, n, dim, what, _ERRORS))


#: Largest finite float32; a wider float beyond it would reach the shards as infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(values: Any, what: str, *, row_width: int | None = None) -> Any:
    """``values`` narrowed to float32 (any shape) when that loses nothing but precision.

    float32 input passes untouched. NaN and infinity pass too (the shards refuse them
    unless started with ``--allow_non_finite``). Input that does not convert at all is
    returned as given, for the caller's conversion to say why.

    :param row_width: floats per row of a flat input, to name the bad row.
    :raises PsInvalidArgument: complex numbers (their imaginary part would be dropped),
        or a finite value that float32 cannot hold (it would become infinity), naming
        the first such row.
    """
    if isinstance(values, np.ndarray) and values.dtype == np.float32:
        return values
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        return values
    kind = arr.dtype.kind
    if kind == "c":
        raise PsInvalidArgument(
            f"{what} are complex ({arr.dtype}); tables hold float32, so pass real numbers "
            "(numpy.real(...) if the imaginary part is meant to be dropped)"
        )
    if not (kind == "O" or (kind == "f" and arr.dtype.itemsize > 4)):
        return arr  # ints, bools and narrower floats always fit
    try:
        wide = arr.astype(np.float64) if kind == "O" else arr
        with np.errstate(over="ignore"):
            narrow = wide.astype(np.float32)
    except OverflowError as e:
        raise PsInvalidArgument(f"{what}: a value is beyond float32's range: {e}") from e
    except (TypeError, ValueError):
        return values
    over = np.isinf(narrow) & np.isfinite(wide)
    if not over.any():
        return narrow
    first = int(np.argmax(over.reshape(-1)))
    if arr.ndim >= 2:
        where = f"row {int(np.unravel_index(first, arr.shape)[0])}"
    elif row_width:
        where = f"row {first // row_width}"
    else:
        where = f"element {first}"
    raise PsInvalidArgument(
        f"{what} {where} holds {float(wide.reshape(-1)[first])!r}, beyond float32's range "
        f"(±{FLOAT32_MAX:.7g}): it would reach the shard as infinity "
        f"({int(over.sum())} value(s) overflow); nothing was sent"
    )


#: Largest int64: ``global_step`` travels as one.
INT64_MAX = 2**63 - 1


def as_global_step(global_step: Any) -> int:
    """``global_step`` checked: an integer (``int``, a numpy integer, anything with
    ``__index__``) in ``[0, 2**63 - 1]``, the range checkpoints and the wire hold.

    The one check of every ``global_step`` the client sends (``apply_gradients``,
    ``fused_apply_gradient``, ``save_checkpoint``), before any RPC.

    :raises PsInvalidArgument: naming ``global_step``: not an integer (``1.5`` would be
        truncated), negative, or beyond int64.
    """
    if isinstance(global_step, bool | np.bool_):
        raise PsInvalidArgument(f"global_step must be an integer, got {global_step!r}")
    try:
        step = operator.index(global_step)
    except TypeError:
        raise PsInvalidArgument(
            f"global_step must be an integer (an int64 >= 0), got {global_step!r} "
            f"({type(global_step).__name__})"
        ) from None
    if not 0 <= step <= INT64_MAX:
        raise PsInvalidArgument(
            f"global_step must be in [0, 2**63 - 1] (an int64 >= 0), got {step}"
        )
    return step


# ---------------------------------------------------------------- routing


def shard_of(ids: Any, num_shards: int) -> Ids:
    """Owner shard of every id: ``floormod(ids, num_shards)`` as ``int64[len(ids)]``.

    :raises PsInvalidArgument: ``num_shards < 1`` or ids not int64-convertible.
    """
    if num_shards < 1:
        raise PsInvalidArgument(f"num_shards must be >= 1, got {num_shards}")
    arr = as_ids(ids)
    if num_shards & (num_shards - 1) == 0:
        # floormod by a power of two is the low bits of the two's complement: no
        # int64 division (4x faster), and -1 -> n - 1 as floormod wants.
        return np.bitwise_and(arr, np.int64(num_shards - 1))
    return np.mod(arr, np.int64(num_shards))


def dedup(ids: Ids) -> tuple[Ids, Positions | None]:
    """The distinct ids of a batch and the inverse map.

    :returns: ``(unique int64[u], inverse int64[n])`` with ``unique[inverse] == ids``
        and ``unique`` sorted; or, when no id repeats, ``(ids, None)``: ``ids`` itself,
        nothing to expand.
    """
    n = ids.shape[0]
    if n == 0:
        return ids[:0], None
    if not _may_repeat(ids):  # no duplicates (as a trainer's unique ids): nothing to fold
        return ids, None
    sorted_ids = np.sort(ids)
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=starts[1:])
    if bool(starts.all()):
        return ids, None
    order = np.argsort(ids)  # ids[order] == sorted_ids, ties in any order
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return sorted_ids[starts], inverse


_FIB_HASH: Final = np.uint64(0x9E3779B97F4A7C15)
"""2**64 / golden ratio: Fibonacci hashing spreads any id pattern over the top bits."""

_scratch = threading.local()

#: Largest scratch array (elements) a thread keeps between calls: 4 MiB of bucket
#: table, enough for batches of up to 131,072 ids; bigger batches take fresh memory.
_REUSE_MAX: Final = 1 << 20


def _reused(name: str, size: int, dtype: type[Any]) -> Any:
    """This thread's reusable array ``name`` cut to ``size`` elements (contents
    undefined), or a fresh one beyond :data:`_REUSE_MAX`. Kept between calls: fresh
    arrays of a big batch's size cost more in page faults (memory new to the process
    each time) than the whole check in warm ones.
    """
    if size > _REUSE_MAX:
        return np.empty(size, dtype=dtype)
    array: npt.NDArray[Any] | None = getattr(_scratch, name, None)
    if array is None or array.shape[0] < size:
        array = np.empty(size, dtype=dtype)
        setattr(_scratch, name, array)
    return array[:size]


def _positions(n: int) -> npt.NDArray[np.int32]:
    """``arange(n)`` as int32, this thread's copy when reused."""
    if n > _REUSE_MAX:
        return np.arange(n, dtype=np.int32)
    cached: npt.NDArray[np.int32] | None = getattr(_scratch, "positions", None)
    if cached is None or cached.shape[0] < n:
        cached = np.arange(n, dtype=np.int32)
        _scratch.positions = cached
    return cached[:n]


def _may_repeat(ids: Ids) -> bool:
    """False when no id of ``ids`` repeats; True when one does (or, under 1024 ids,
    may: the caller's sort decides).

    Every id writes its position into its bucket of a table of about ``8 * len(ids)``
    buckets (Fibonacci hashing); one position per bucket survives. Equal ids share a
    bucket, so a repeat is either an overwritten id equal to its bucket's survivor or
    two overwritten ids equal to each other: only the overwritten ids (about 6% of
    distinct ids) are compared and sorted. The table needs no clearing (every bucket
    read was written by this call), so it is reused, as are the hashes and positions:
    at 65,536 ids this is about twice as fast as counting buckets in fresh memory.
    """
    n = ids.shape[0]
    if n < 1024:
        return True  # a sort of so few costs less than the buckets
    if n >= 1 << 31:
        return True  # positions past int32: left to the sort
    bits = (8 * n - 1).bit_length()
    hashes: npt.NDArray[np.uint64] = _reused("hashes", n, np.uint64)
    np.multiply(ids.view(np.uint64), _FIB_HASH, out=hashes)
    np.right_shift(hashes, np.uint64(64 - bits), out=hashes)
    bucket = hashes.view(np.int64)  # < 2**bits: the same values as signed
    table: npt.NDArray[np.int32] = _reused("table", 1 << bits, np.int32)
    order = _positions(n)
    table[bucket] = order
    survivor = table[bucket]
    lost = np.flatnonzero(survivor != order)
    if lost.shape[0] == 0:
        return False
    lost_ids = ids[lost]
    if bool((lost_ids == ids[survivor[lost]]).any()):
        return True
    lost_ids.sort()
    return bool((lost_ids[1:] == lost_ids[:-1]).any())


def partition(ids: Ids, num_shards: int) -> list[Positions]:
    """Positions of each shard's ids, in their original order.

    :returns: ``num_shards`` arrays; ``positions[s]`` indexes the ids owned by shard
        ``s`` in increasing position (so a shard sees its ids in the order given).
    """
    if num_shards == 1:
        return [np.arange(ids.shape[0], dtype=np.int64)]
    if num_shards <= _FEW_GROUPS and num_shards & (num_shards - 1) == 0:
        # The owner is the low bits, which survive the cast to one byte (two's
        # complement: -1 -> 255 -> n - 1): the per-shard compares then read 1 byte
        # per id instead of 8 (65,536 ids into 4 shards: ~20% faster).
        owners = as_ids(ids).astype(np.uint8)
        np.bitwise_and(owners, np.uint8(num_shards - 1), out=owners)
        return [np.flatnonzero(owners == g) for g in range(num_shards)]
    return partition_by(shard_of(ids, num_shards), num_shards)


#: Up to this many groups :func:`partition_by` makes one pass per group rather than a sort.
_FEW_GROUPS: Final = 4


def partition_by(owners: npt.NDArray[np.int64], num_groups: int) -> list[Positions]:
    """Positions of each group's members (``owners[i]`` in ``[0, num_groups)``), each
    in increasing order."""
    if num_groups <= _FEW_GROUPS:
        # One compare and one nonzero pass per group beats a sort for so few
        # (2 groups of 65,536: 3x faster).
        return [np.flatnonzero(owners == g) for g in range(num_groups)]
    # A stable sort of 16-bit keys is a radix sort in numpy: linear time.
    keys = owners.astype(np.uint16) if num_groups <= 1 << 16 else owners
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(owners, minlength=num_groups)
    return list(np.split(order, np.cumsum(counts)[:-1]))


#: Output bytes :class:`RowAssembly` fills per block when it scatters several shards'
#: answers: about half this machine class's L2, so a block's rows are written in cache.
_SCATTER_BLOCK_BYTES: Final = 1 << 20


class RowAssembly:
    """Shards' row answers put into the caller's order.

    One shard's answer is already in order (at most expanded by the inverse map).
    Several shards' answers are kept as they arrive and placed once all are in:

    * unique ids (no inverse): the output is filled block by block (about 1 MiB of
      rows each), every shard putting its rows of the block; the scattered writes stay
      in cache instead of each shard's pass sweeping all of the output;
    * duplicates: each answer is copied into its own contiguous slice of one joined
      buffer, and ONE gather takes every output row from it, the inverse map folded
      into the gather's index (no intermediate unique rows).

    A put per shard over the whole output (the former way) took ~1.7-2 ms for
    65,536 x 32 float32 from 4 shards, ~0.5 ms of it copying the read-only answers
    (numpy's ``put`` wants writable values: hand answers over with ``owned=True``).

    :param positions: as :func:`partition` gives them for the unique ids: together they
        hold every unique row ``0 .. u-1`` once, each shard's in increasing order.
    :param inverse: from :func:`dedup` (output row ``i`` is unique id ``inverse[i]``), or
        None when the ids were unique (output row ``positions[s][j]`` is row ``j`` of
        shard ``s``'s answer).
    :param dim: items per row.
    :param dtype: of the rows (float32 unless the answers travel in a half-size form).
    :ivar out: ``dtype[len(inverse) or u, dim]``, complete once every shard with
        positions has been :meth:`add`-ed (read it only then).
    """

    def __init__(self, positions: Sequence[Positions], inverse: Positions | None,
                 dim: int, dtype: Any = np.float32) -> None:
        self.positions = positions
        self.inverse = inverse
        self.dim = dim
        self.dtype = np.dtype(dtype)
        sizes = [int(p.shape[0]) for p in positions]
        unique = sum(sizes)
        self._n = unique if inverse is None else int(inverse.shape[0])
        self._out: npt.NDArray[Any] | None = None
        self._joined: npt.NDArray[Any] | None = None
        self._answers: list[npt.NDArray[Any] | None] = [None] * len(positions)
        self._starts: list[int] = []
        if len(positions) == 1:
            self._out = np.empty((self._n, dim), dtype=self.dtype)
        elif inverse is not None:
            self._joined = np.empty((unique, dim), dtype=self.dtype)
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    @property
    def out(self) -> npt.NDArray[Any]:
        """The rows in the caller's order (placed at the first read)."""
        if self._out is None:
            self._out = self._gather() if self._joined is not None else self._scatter()
        return self._out

    def add(self, shard: int, rows: npt.NDArray[Any], *, owned: bool = False) -> None:
        """Take ``rows`` (``[len(positions[shard]), dim]``), shard ``shard``'s answer.

        :param owned: ``rows`` is the caller's to give away (writable, C-contiguous,
            referenced nowhere else): when it is the whole answer already in order (one
            shard, no duplicates) it becomes :attr:`out` as it is, with no copy; among
            several shards it is placed without a defensive copy.
        :raises ValueError: ``rows`` is not of that shape.
        """
        pos = self.positions[shard]
        if rows.shape != (pos.shape[0], self.dim):
            raise ValueError(
                f"shard {shard}: {rows.shape} rows for {pos.shape[0]} ids of dim {self.dim}"
            )
        if pos.size == 0 or self.dim == 0:
            return
        if self._joined is not None:
            start = self._starts[shard]
            np.copyto(self._joined[start : start + pos.shape[0]], rows)
            return
        if self._out is None:  # several shards, unique ids: placed by _scatter
            self._answers[shard] = rows if owned else np.ascontiguousarray(rows)
            return
        if self.inverse is None:  # one shard answered every unique id, in order
            if owned and rows.shape == self._out.shape and rows.dtype == self.dtype:
                self._out = rows
            else:
                np.copyto(self._out, rows)
        else:
            np.take(rows, self.inverse, axis=0, out=self._out, mode="wrap")

    def _scatter(self) -> npt.NDArray[Any]:
        out = np.empty((self._n, self.dim), dtype=self.dtype)
        out_items = row_items(out)
        if out_items is None:  # no rows, or rows of nothing
            return out
        block = max(1, _SCATTER_BLOCK_BYTES // (self.dim * self.dtype.itemsize))
        bounds = np.arange(0, self._n + block, block)
        parts = []
        for pos, rows in zip(self.positions, self._answers, strict=True):
            if rows is not None:
                items = row_items(rows.astype(self.dtype, copy=False))
                assert items is not None
                parts.append((pos, items, np.searchsorted(pos, bounds).tolist()))
        for b in range(bounds.shape[0] - 1):
            for pos, items, cuts in parts:
                lo, hi = cuts[b], cuts[b + 1]
                if hi > lo:
                    # mode="wrap": every position is a valid row (partition made
                    # them), so numpy's per-index bounds check is dead weight.
                    np.put(out_items, pos[lo:hi], items[lo:hi], mode="wrap")
        self._answers = [None] * len(self.positions)
        return out

    def _gather(self) -> npt.NDArray[Any]:
        joined = self._joined
        assert joined is not None and self.inverse is not None
        items = row_items(joined)
        if items is None:  # no rows, or rows of nothing
            return np.empty((self._n, self.dim), dtype=self.dtype)
        # where[u]: the joined row of unique row u (shard s's slice holds positions[s]).
        where = np.empty(joined.shape[0], dtype=np.int64)
        for pos, start in zip(self.positions, self._starts, strict=False):
            where[pos] = np.arange(start, start + pos.shape[0], dtype=np.int64)
        # mode="wrap": every index is a valid row, so numpy's bounds check is dead weight.
        rows = np.take(items, np.take(where, self.inverse), mode="wrap")
        out: npt.NDArray[Any] = rows.view(self.dtype).reshape(self._n, self.dim)
        return out


def scatter_objects(
    parts: Sequence[Sequence[bytes]], positions: Sequence[Positions], n: int
) -> npt.NDArray[np.object_]:
    """Inverse of :func:`partition` for per-id ``bytes`` answers (an object array)."""
    out = np.empty(n, dtype=object)
    for part, pos in zip(parts, positions, strict=True):
        if pos.size:
            column = np.empty(pos.size, dtype=object)
            column[:] = list(part)
            out[pos] = column
    return out


# ---------------------------------------------------------------- fused layout


@dataclass(frozen=True)
class FusedLayout:
    """Monolith's shard-major layout of a fused request (docs/semantics.md §7).

    For ``N`` logical shards and ``K`` tables, block ``i = s * K + t`` holds
    ``sizes[i]`` ids of table ``t`` from shard ``s``. With ``key_off[0] = emb_off[0] = 0``::

        key_off[i + 1] = key_off[i] + sizes[i]
        emb_off[i + 1] = emb_off[i] + dims[t] * sizes[i]
        recv_splits[s] = sum over t of dims[t] * sizes[s * K + t]

    :ivar sizes: ``int64[K*N]`` ids per block.
    :ivar dims: ``int64[K]`` embedding dim of each table.
    :ivar key_off: ``int64[K*N+1]`` first id of each block (id offsets).
    :ivar emb_off: ``int64[K*N+1]`` first float of each block (embedding offsets).
    :ivar recv_splits: ``int64[N]`` floats per logical shard.
    :ivar block_tables: ``int64[K*N]`` table index of each block (``i mod K``).
    :ivar block_of: ``int64[num_ids]`` block of each id position.
    :ivar within: ``int64[num_ids]`` index of each id position inside its block.
    :ivar row_dim: ``int64[num_ids]`` dim of each id's row.
    """

    sizes: npt.NDArray[np.int64]
    dims: npt.NDArray[np.int64]
    key_off: npt.NDArray[np.int64]
    emb_off: npt.NDArray[np.int64]
    recv_splits: npt.NDArray[np.int64]
    block_tables: npt.NDArray[np.int64]
    block_of: npt.NDArray[np.int64]
    within: npt.NDArray[np.int64]
    row_dim: npt.NDArray[np.int64]

    @property
    def num_blocks(self) -> int:
        """K * N."""
        return int(self.sizes.shape[0])

    @property
    def num_ids(self) -> int:
        """Sum of the block sizes."""
        return int(self.key_off[-1])

    def check_offsets(self, offsets: Any, per_id: npt.NDArray[np.int64], length: int,
                      what: str) -> npt.NDArray[np.int64]:
        """Validate caller-given block offsets (``K*N+1`` of them) against the layout.

        :param per_id: elements per id of each block (1 for ids, ``dim_t`` for floats).
        :param length: size of the buffer the offsets index.
        :raises PsInvalidArgument: wrong count, a block span that disagrees with
            ``fused_slot_size``, or a span outside the buffer.
        """
        off = np.asarray(offsets).reshape(-1)
        if off.size and off.dtype.kind not in "iu":
            raise PsInvalidArgument(f"{what} must be integers, got dtype {off.dtype}")
        off = off.astype(np.int64)
        if off.shape[0] != self.num_blocks + 1:
            raise PsInvalidArgument(
                f"{what} must have K*N+1 = {self.num_blocks + 1} entries, got {off.shape[0]}"
            )
        want = self.sizes * per_id
        got = np.diff(off)
        bad = np.flatnonzero(got != want)
        if bad.size:
            i = int(bad[0])
            raise PsInvalidArgument(
                f"{what} give block {i} a span of {int(got[i])}, but fused_slot_size and the "
                f"table dims make it {int(want[i])}"
            )
        if off.size and (int(off.min()) < 0 or int(off.max()) > length):
            raise PsInvalidArgument(
                f"{what} reach outside the buffer of {length} elements ({off.tolist()})"
            )
        return off


def fused_layout(fused_slot_size: Any, dims: Sequence[int], num_of_shards: int) -> FusedLayout:
    """The :class:`FusedLayout` of ``fused_slot_size`` for tables of ``dims``.

    :raises PsInvalidArgument: ``num_of_shards < 1``, no tables, a negative size, or
        ``len(fused_slot_size) != len(dims) * num_of_shards``.
    """
    if num_of_shards < 1:
        raise PsInvalidArgument(f"num_of_shards must be >= 1, got {num_of_shards}")
    k = len(dims)
    if k == 0:
        raise PsInvalidArgument("fused ops need at least one table")
    sizes = np.asarray(fused_slot_size).reshape(-1)
    if sizes.size and sizes.dtype.kind not in "iu":
        raise PsInvalidArgument(f"fused_slot_size must be integers, got dtype {sizes.dtype}")
    sizes = sizes.astype(np.int64)
    if sizes.shape[0] != k * num_of_shards:
        raise PsInvalidArgument(
            f"fused_slot_size must have K*N = {k}*{num_of_shards} = {k * num_of_shards} "
            f"entries (one per shard and table), got {sizes.shape[0]}"
        )
    if bool((sizes < 0).any()):
        raise PsInvalidArgument(f"fused_slot_size must be >= 0, got {sizes.tolist()}")
    dims_ = np.asarray(dims, dtype=np.int64)
    floats = sizes.reshape(num_of_shards, k) * dims_[None, :]
    zero = np.zeros(1, dtype=np.int64)
    key_off = np.concatenate([zero, np.cumsum(sizes)])
    block_tables = np.tile(np.arange(k, dtype=np.int64), num_of_shards)
    block_of = np.repeat(np.arange(sizes.shape[0], dtype=np.int64), sizes)
    return FusedLayout(
        sizes=sizes,
        dims=dims_,
        key_off=key_off,
        emb_off=np.concatenate([zero, np.cumsum(floats.reshape(-1))]),
        recv_splits=floats.sum(axis=1),
        block_tables=block_tables,
        block_of=block_of,
        within=np.arange(block_of.shape[0], dtype=np.int64) - key_off[block_of],
        row_dim=dims_[block_tables][block_of],
    )


@dataclass(frozen=True)
class OwnerBlocks:
    """What one real shard receives of a fused request.

    :ivar shard: the real shard index.
    :ivar positions: ``int64[m]`` logical positions (``0 .. num_ids-1``) of the ids this
        shard owns, in block order and, within a block, in the order given.
    :ivar blocks: ``(table_index, num_ids)`` of each non-empty sub-block, in block order.
    :ivar floats: number of floats (``sum num_ids * dim``) of its rows.
    """

    shard: int
    positions: Positions
    blocks: list[tuple[int, int]]
    floats: int


class FusedRoute:
    """The ids of a :class:`FusedLayout` routed to their owners among ``num_real`` shards.

    A real shard's share is the concatenation, in block order, of its ids of each
    block. A shard that applies its sub-blocks in order therefore performs, for every
    id it owns, exactly the steps Monolith's single process would, in the same order;
    ids owned elsewhere never interact with it.

    :param ids: ``int64[num_ids]`` in logical order (block ``i`` at ``key_off[i]``).
    :raises PsInvalidArgument: ``len(ids)`` differs from the sum of the block sizes.
    """

    def __init__(self, layout: FusedLayout, ids: Ids, num_real: int) -> None:
        if ids.shape[0] != layout.num_ids:
            raise PsInvalidArgument(
                f"fused ops got {ids.shape[0]} ids but fused_slot_size adds up to "
                f"{layout.num_ids}"
            )
        self.layout = layout
        nb = layout.num_blocks
        owners = shard_of(ids, num_real) if num_real > 1 else np.zeros_like(ids)
        order = np.argsort(owners, kind="stable")
        counts = np.bincount(owners * nb + layout.block_of, minlength=num_real * nb).reshape(
            num_real, nb
        )
        bounds = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
        block_dims = layout.dims[layout.block_tables]
        self.owners: list[OwnerBlocks] = []
        for r in range(num_real):
            nz = np.flatnonzero(counts[r])
            self.owners.append(
                OwnerBlocks(
                    shard=r,
                    positions=order[bounds[r] : bounds[r + 1]],
                    blocks=list(
                        zip(layout.block_tables[nz].tolist(), counts[r, nz].tolist(),
                            strict=True)
                    ),
                    floats=int((counts[r] * block_dims).sum()),
                )
            )

    def float_index(self, positions: Positions, offsets: npt.NDArray[np.int64]) -> Positions:
        """Flat indices of the floats of the rows at ``positions``, row after row.

        :param offsets: first float of each block in the flat buffer (``K*N+1``).
        """
        lay = self.layout
        d = lay.row_dim[positions]
        total = int(d.sum())
        if total == 0:
            return _EMPTY_POS
        starts = offsets[lay.block_of[positions]] + lay.within[positions] * d
        row_first = np.concatenate([[0], np.cumsum(d)[:-1]])
        return np.repeat(starts - row_first, d) + np.arange(total, dtype=np.int64)

    def scatter_floats(self, answers: Sequence[Floats]) -> Floats:
        """Monolith's flat embeddings from every owner's flat answer (in shard order).

        :raises PsInvalidArgument: an answer has the wrong number of floats.
        """
        out = np.zeros(int(self.layout.emb_off[-1]), dtype=np.float32)
        for owner, flat in zip(self.owners, answers, strict=True):
            if flat.shape[0] != owner.floats:
                raise PsInvalidArgument(
                    f"shard {owner.shard} answered {flat.shape[0]} floats for a fused "
                    f"lookup, expected {owner.floats}"
                )
            if owner.floats:
                out[self.float_index(owner.positions, self.layout.emb_off)] = flat
        return out


def to_int32(values: npt.NDArray[np.int64], what: str) -> Int32s:
    """``values`` as ``int32``; :class:`PsInvalidArgument` if any does not fit."""
    if values.size and (int(values.max()) > np.iinfo(np.int32).max or int(values.min()) < 0):
        raise PsInvalidArgument(f"{what} do not fit in int32 (largest {int(values.max())})")
    return values.astype(np.int32)
