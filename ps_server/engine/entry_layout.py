"""How an ``EntryConfig`` lays out one entry: segments, their columns and components.

An entry's values are the concatenation of its segments (``dim = sum(dim_k)``).
Segment k owns columns ``[offset_k, offset_k + dim_k)``, its own initializer,
optimizer (TRAINING) and compressor, and learning rate ``lr[k]``. The segment's
``dim_size`` overrides the ``dim_size`` of its sub-configs, as in Monolith.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine.compressors import (
    Compressor,
    RawRetriever,
    Retriever,
    compressor_from_config,
    retriever_from_config,
)
from ps_server.engine.initializers import (
    Initializer,
    RandomUniformInitializer,
    initializer_from_config,
)
from ps_server.engine.optimizers import optimizer_from_config
from ps_server.engine.optimizers.base import Optimizer
from ps_server.errors import ConfigError

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class Segment:
    """One segment of an entry.

    :param offset: first column of the segment in the entry's values.
    :param dim: number of columns.
    :param initializer: fills new entries' values.
    :param optimizer: update rule (None for SERVING entries).
    :param retriever: TRAINING lookup view and gradient transform.
    :param compressor: SERVING storage encoding (None for TRAINING entries).
    """

    offset: int
    dim: int
    initializer: Initializer
    optimizer: Optimizer | None
    retriever: Retriever
    compressor: Compressor | None

    @property
    def columns(self) -> slice:
        """The segment's columns in an entry's values."""
        return slice(self.offset, self.offset + self.dim)


@dataclass
class EntryLayout:
    """Segments of one table's entries and the entry type."""

    segments: list[Segment]
    serving: bool

    @property
    def dim(self) -> int:
        """Total values per entry."""
        return sum(s.dim for s in self.segments)

    @property
    def raw_view(self) -> bool:
        """True when lookups return stored values unchanged (no retriever transform)."""
        return self.serving or all(isinstance(s.retriever, RawRetriever) for s in self.segments)

    @classmethod
    def from_config(cls, config: eht.EntryConfig, seed: int | None = None) -> EntryLayout:
        """Build the layout; :class:`ConfigError` names the segment and the problem."""
        if not config.segments:
            raise ConfigError("entry_config has no segments; add at least one with a dim_size")
        serving = config.entry_type == eht.EntryConfig.SERVING
        if config.entry_type == eht.EntryConfig.UNKNOWN:
            raise ConfigError("entry_config.entry_type is UNKNOWN; use TRAINING or SERVING")
        segments: list[Segment] = []
        shared_rng: np.random.RandomState | None = None
        offset = 0
        for k, seg in enumerate(config.segments):
            where = f"entry_config.segments[{k}]"
            if seg.dim_size <= 0:
                raise ConfigError(f"{where}.dim_size must be positive, got {seg.dim_size}")
            dim = seg.dim_size
            if not seg.HasField("init_config"):
                if not serving:
                    raise ConfigError(f"{where} needs an init_config for TRAINING entries")
                init_cfg = eht.InitializerConfig(zeros=eht.ZerosInitializerConfig())
            else:
                init_cfg = seg.init_config
            initializer = _wrap(
                where + ".init_config", initializer_from_config, init_cfg, dim, seed
            )
            if isinstance(initializer, RandomUniformInitializer):
                # One generator per table, shared by its random segments in order, as
                # Monolith's thread_local mt19937 is shared by every initializer.
                if shared_rng is None:
                    shared_rng = np.random.RandomState(5489 if seed is None else seed)
                initializer.use_generator(shared_rng)
            optimizer: Optimizer | None = None
            compressor: Compressor | None = None
            comp_cfg = seg.comp_config if seg.HasField("comp_config") else None
            if serving:
                if comp_cfg is None:
                    raise ConfigError(f"{where} needs a comp_config for SERVING entries")
                compressor = _wrap(where + ".comp_config", compressor_from_config, comp_cfg, dim)
                retriever: Retriever = RawRetriever(dim)
            else:
                if not seg.HasField("opt_config"):
                    raise ConfigError(f"{where} needs an opt_config for TRAINING entries")
                optimizer = _wrap(where + ".opt_config", optimizer_from_config, seg.opt_config, dim)
                retriever = _wrap(where + ".comp_config", retriever_from_config, comp_cfg, dim)
            segments.append(Segment(offset, dim, initializer, optimizer, retriever, compressor))
            offset += dim
        return cls(segments, serving)


def _wrap(where: str, factory: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return factory(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
