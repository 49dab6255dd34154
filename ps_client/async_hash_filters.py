"""The async handle on one set of hash filters: one filter per shard, all of one name.

:class:`ps_client.HashFilters` is its synchronous face (the user-facing contract).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import ps_service_pb2 as pb
from ps_client._codec import Gather, encode_request, read_rows
from ps_client.errors import PsInvalidArgument
from ps_client.routing import RowAssembly, as_float32, as_ids, partition
from ps_client.transport import Transport


class AsyncHashFilters:
    """The hash filters of every shard, one per shard, all named :attr:`name`.

    :ivar name: the filter's name on each shard.
    :ivar enabled: False for dummy filters (disabled or ``no_filter``).
    :ivar filter_type: as created.
    """

    def __init__(
        self, transport: Transport, name: str, enabled: bool, filter_type: str
    ) -> None:
        self._transport = transport
        self.name = name
        self.enabled = enabled
        self.filter_type = filter_type

    def __repr__(self) -> str:
        return f"AsyncHashFilters({self.name!r}, {self.filter_type}, enabled={self.enabled})"

    async def intercept_gradient(self, ids: Any, grads: Any) -> npt.NDArray[np.float32]:
        """Count every id (in order) on its owner shard's filter; return ``grads`` with
        the rows of not-yet-admitted ids zeroed, in the shape given.

        :param grads: ``[len(ids), m]``, or flat with a multiple of ``len(ids)`` values.
        """
        ids_ = as_ids(ids)
        g = np.asarray(as_float32(grads, "grads"), dtype=np.float32)
        n = ids_.shape[0]
        if n == 0 or g.size % n:
            if n == 0 and g.size == 0:
                return g.copy()
            raise PsInvalidArgument(
                f"grads of shape {g.shape} cannot be viewed as one row per id ({n} ids)"
            )
        width = g.size // n
        rows = np.ascontiguousarray(g.reshape(n, width))
        positions = partition(ids_, self._transport.num_shards)
        requests = [
            encode_request(
                pb.InterceptGradientRequest(hash_filter=self.name, tag=self._transport.next_tag()),
                ids=Gather(ids_, p), grads=Gather(rows, p),
            )
            if p.size else None
            for p in positions
        ]
        out = RowAssembly(positions, None, width)

        def place(shard: int, answer: bytes) -> None:
            out.add(shard, read_rows(answer, pb.InterceptGradientResponse, "grads",
                                     positions[shard].size, width, "InterceptGradient"))

        await self._transport.write_each("InterceptGradient", requests, on_answer=place)
        return out.out.reshape(g.shape)

    async def save(self, asset_dir: str) -> list[str]:
        """Shard ``i`` writes ``<asset_dir>/hash_filter_<i>-%05d-of-%05d`` (dummies: nothing)."""
        answers = await self._transport.each(
            "SaveHashFilter", self._requests(asset_dir, validate_only=False), file_op=True
        )
        return [f for a in answers for f in a.files]

    async def restore(self, asset_dir: str) -> None:
        """Load every shard's filter from ``asset_dir``; if any shard's files are missing
        or bad, no filter changes."""
        for validate_only in (True, False):
            await self._transport.each(
                "RestoreHashFilter", self._requests(asset_dir, validate_only), file_op=True
            )

    async def save_files(self, basenames: Sequence[str | None]) -> list[str]:
        """Shard ``i`` writes ``<basenames[i]>-%05d-of-%05d`` (None: shard ``i`` writes
        nothing); returns every file written."""
        answers = await self._transport.each(
            "SaveHashFilter", self._requests_for(basenames, validate_only=False), file_op=True
        )
        return [f for a in answers if a is not None for f in a.files]

    async def restore_files(self, basenames: Sequence[str | None]) -> None:
        """Shard ``i`` loads its filter from ``<basenames[i]>-…`` (None: left as is); if
        any shard's files are missing or bad, no filter changes."""
        for validate_only in (True, False):
            await self._transport.each(
                "RestoreHashFilter", self._requests_for(basenames, validate_only), file_op=True
            )

    def _requests(self, asset_dir: str, validate_only: bool) -> list[Any]:
        return self._requests_for(
            [posixpath.join(asset_dir, f"hash_filter_{i}")
             for i in range(self._transport.num_shards)],
            validate_only,
        )

    def _requests_for(self, basenames: Sequence[str | None], validate_only: bool) -> list[Any]:
        if isinstance(basenames, str) or len(basenames) != self._transport.num_shards:
            raise PsInvalidArgument(
                f"give one basename (or None) per shard: {self._transport.num_shards}, got "
                f"{basenames!r}"
            )
        return [
            None if b is None else pb.HashFilterFilesRequest(
                hash_filter=self.name, basename=str(b), validate_only=validate_only)
            for b in basenames
        ]
