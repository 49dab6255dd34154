"""Monolith's fused ops over logical tables (docs/semantics.md §7), routed to the real shards.

Block ``i = s * K + t`` of the logical layout holds ``fused_slot_size[i]`` ids of
``tables[t]`` sent by worker ``s`` of ``num_of_shards``; every id is read or updated
on the real shard that owns it (:class:`ps_client.routing.FusedRoute`), however many
real shards the cluster has, and the answers are put back where Monolith's single
process would put them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import ps_service_pb2 as pb
from protos.wire import FLOAT32, narrow
from ps_client._codec import Gather, encode_request, read_floats
from ps_client.async_table import AsyncTable, float_wire
from ps_client.errors import PsInvalidArgument
from ps_client.routing import (
    FusedRoute,
    as_float32,
    as_global_step,
    as_ids,
    fused_layout,
    to_int32,
)
from ps_client.transport import Transport

FusedLookupResult = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.int32],
    npt.NDArray[np.int32], npt.NDArray[np.int64],
]
"""``(embeddings, recv_splits, id_offsets, emb_offsets, indices)``, Monolith's five outputs."""


def _on_wire(floats: npt.NDArray[np.float32], wire: np.dtype[Any]) -> npt.NDArray[Any]:
    return floats if wire == FLOAT32 else narrow(floats, wire)


def fused_wire(tables: Sequence[AsyncTable], wire_dtype: Any) -> tuple[Any, np.dtype[Any]]:
    """``(FloatWire number, element dtype)`` of a fused op: ``wire_dtype``, or when None
    the tables' common ``wire_dtype``.

    :raises PsInvalidArgument: an unknown name, or None for tables whose defaults differ.
    """
    if wire_dtype is None:
        defaults = sorted({t.wire_dtype for t in tables}) or ["float32"]
        if len(defaults) > 1:
            raise PsInvalidArgument(
                f"the tables' wire_dtype defaults differ ({', '.join(defaults)}): pass "
                "wire_dtype to the fused op"
            )
        wire_dtype = defaults[0]
    return float_wire(wire_dtype)


async def fused_lookup(
    transport: Transport, tables: Sequence[AsyncTable], ids: Any, fused_slot_size: Any,
    num_of_shards: int, wire_dtype: str | None = None,
) -> FusedLookupResult:
    """Monolith's ``fused_lookup``; the values travel as ``wire_dtype`` (None: the
    tables' common default, :func:`fused_wire`) and come back widened to float32.

    :returns: ``(embeddings float32[emb_offsets[-1]], recv_splits int32[N],
        id_offsets int32[K*N+1], emb_offsets int32[K*N+1], indices int64[len(ids)])``;
        ``indices`` is ``ids`` passed through (as int64, values unchanged), for
        ``fused_apply_gradient``.
    :raises PsInvalidArgument: sizes that do not match ``ids`` or the tables.
    """
    number, wire = fused_wire(tables, wire_dtype)
    ids_ = as_ids(ids)
    names = [t.name for t in tables]
    layout = fused_layout(fused_slot_size, [t.dim_size for t in tables], num_of_shards)
    route = FusedRoute(layout, ids_, transport.num_shards)
    requests = [
        encode_request(
            pb.FusedLookupRequest(
                tables=names,
                blocks=[pb.FusedBlock(table_index=t, num_ids=c) for t, c in o.blocks],
                values_wire=number,
            ),
            ids=Gather(ids_, o.positions),
        )
        if o.positions.size else None
        for o in route.owners
    ]
    answers = await transport.each("FusedLookup", requests)
    flats = [
        read_floats(a, pb.FusedLookupResponse, "values", o.floats, "FusedLookup", wire)
        if a is not None
        else np.zeros(0, dtype=np.float32)
        for a, o in zip(answers, route.owners, strict=True)
    ]
    return (
        route.scatter_floats(flats),
        to_int32(layout.recv_splits, "recv_splits"),
        to_int32(layout.key_off, "id_offsets"),
        to_int32(layout.emb_off, "emb_offsets"),
        # Monolith's op passes ``ids`` through as ``indices``; copied when it is the
        # caller's own array, so changing one later does not change the other.
        ids_.copy() if isinstance(ids, np.ndarray) and np.may_share_memory(ids_, ids)
        else ids_,
    )


async def fused_apply_gradient(
    transport: Transport, tables: Sequence[AsyncTable], ids: Any, fused_slot_size: Any,
    id_grads: Any, id_offsets: Any, grad_offsets: Any, learning_rate_tensors: Any,
    req_time: int, global_step: int, num_of_shards: int, enable_grad_accumulation: bool,
    wire_dtype: str | None = None,
) -> None:
    """Monolith's ``fused_apply_gradient``; the grads travel as ``wire_dtype`` (None:
    the tables' common default, :func:`fused_wire`), rounded here and widened by the
    shards, whose math stays float32.

    Block ``i`` (worker ``s``, table ``t``) applies ``id_grads[grad_offsets[i]:
    grad_offsets[i+1]]`` to ``ids[id_offsets[i]:id_offsets[i+1]]`` of ``tables[t]``
    with that table's rates from ``learning_rate_tensors`` (the concatenation of
    every table's per-segment rates). Blocks run in order on each owner shard; with
    ``enable_grad_accumulation`` duplicates inside one block are summed first.

    :raises PsInvalidArgument: offsets, sizes, grads or rates that do not fit; grads or
        rates complex or beyond float32's range; ``global_step`` not an int64 >= 0.
    """
    number, wire = fused_wire(tables, wire_dtype)
    step = as_global_step(global_step)
    ids_ = as_ids(ids)
    names = [t.name for t in tables]
    layout = fused_layout(fused_slot_size, [t.dim_size for t in tables], num_of_shards)
    id_off = layout.check_offsets(
        id_offsets, np.ones_like(layout.sizes), ids_.shape[0], "id_offsets"
    )
    grads = np.ascontiguousarray(
        np.asarray(as_float32(id_grads, "id_grads"), dtype=np.float32).reshape(-1)
    )
    grad_off = layout.check_offsets(
        grad_offsets, layout.dims[layout.block_tables], grads.shape[0], "grad_offsets"
    )
    lrs = np.asarray(
        as_float32(learning_rate_tensors, "learning_rate_tensors"), dtype=np.float32
    ).reshape(-1)
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
    route = FusedRoute(layout, logical_ids, transport.num_shards)
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
                    learning_rates=lrs.tolist(), global_step=step,
                    enable_grad_accumulation=bool(enable_grad_accumulation),
                    req_time=int(req_time), grads_wire=number, tag=transport.next_tag(),
                ),
                ids=Gather(logical_ids, o.positions),
                grads=_on_wire(grads[route.float_index(o.positions, grad_off)], wire),
            )
        )
    await transport.write_each("FusedOptimize", requests)
