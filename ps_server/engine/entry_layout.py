"""How an ``EntryConfig`` lays out one entry: segments, their columns and components.

An entry's values are the concatenation of its segments (``dim = sum(dim_k)``).
Segment k owns columns ``[offset_k, offset_k + dim_k)``, its own initializer,
optimizer (TRAINING) and compressor, and learning rate ``lr[k]``. The segment's
``dim_size`` overrides the ``dim_size`` of its sub-configs, as in Monolith.

``monolith_quirks`` (a table option, docs/semantics.md §12) reproduces three things
Monolith's C++ does that we deliberately do not by default:

* stochastic rounding: the decorator of segment k rounds ``values[off_k:]`` (to the
  END of the entry, so later segments' columns too, before their optimizers run),
  and every decorator of the table draws from one generator that starts at
  ``(0, 1)``. Entries are optimized as Monolith's one thread does: per occurrence in
  request order, segment by segment (:meth:`EntryLayout.optimize_entrywise`);
* Group AdaGrad stores ``0/0 = NaN`` for a zero norm (the optimizer's option);
* Adam's restore puts the dumped ``beta2_power`` into ``beta1_power`` and leaves
  ``beta2_power`` at ``beta2`` (:meth:`EntryLayout.restored_states`).
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
from ps_server.engine.optimizers.adam import AdamOptimizer
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    has_duplicates,
    occurrence_waves,
)
from ps_server.engine.optimizers.stochastic_rounding import (
    MultiplyWithCarry,
    StochasticRoundingFloat16,
    stochastic_round,
)
from ps_server.engine.rows import put_rows
from ps_server.engine.types import Floats, Rows
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
    """Segments of one table's entries and the entry type.

    :param monolith_quirks: behave as Monolith's C++ where we deliberately differ
        (see the module docstring).
    """

    segments: list[Segment]
    serving: bool
    monolith_quirks: bool = False

    def __post_init__(self) -> None:
        #: The one stochastic-rounding generator of every decorator (Monolith's
        #: thread_local state, here one per table), with ``monolith_quirks``.
        self.shared_rng: MultiplyWithCarry | None = None
        if self.monolith_quirks and self._rounded():
            self.shared_rng = MultiplyWithCarry()

    def _rounded(self) -> list[int]:
        """Indices of the segments whose optimizer rounds stochastically."""
        return [k for k, s in enumerate(self.segments)
                if isinstance(s.optimizer, StochasticRoundingFloat16)]

    @property
    def entrywise(self) -> bool:
        """Whether apply_gradients must go through :meth:`optimize_entrywise`."""
        return self.shared_rng is not None

    def optimize_entrywise(
        self,
        values: Floats,
        states: list[State],
        rows: Rows,
        grads: Floats,
        learning_rates: Floats,
        global_step: int,
    ) -> None:
        """Monolith's order with ``monolith_quirks`` and stochastic rounding: each
        occurrence (in request order) runs segment 0, 1, ... of its entry, and the
        decorator of segment k rounds ``values[off_k:]`` with ``dim - off_k`` draws of
        the table's one generator (occurrence i's draws come before occurrence
        i+1's). Batched: waves of distinct rows, the draws cut from one block.

        :param values: the table's value storage ``[capacity, dim]``; ``states`` its
            per-segment state storage; ``rows`` may repeat; ``grads`` ``[n, dim]``.
        """
        assert self.shared_rng is not None
        n = rows.size
        rounded = self._rounded()
        starts: dict[int, int] = {}
        width = 0
        for k in rounded:
            starts[k] = width
            width += self.dim - self.segments[k].offset
        draws = self.shared_rng.draw(n * width).reshape(n, width)
        waves = occurrence_waves(rows) if has_duplicates(rows) else [np.arange(n)]
        for wave in waves:
            r = rows[wave]
            params = np.take(values, r, axis=0)
            gathered = [{name: np.take(a, r, axis=0) for name, a in st.items()} for st in states]
            wave_grads = np.take(grads, wave, axis=0)
            for k, seg in enumerate(self.segments):
                opt = seg.optimizer
                if opt is None:
                    continue
                cols = seg.columns
                g = np.ascontiguousarray(wave_grads[:, cols])
                if not isinstance(seg.retriever, RawRetriever):
                    g = seg.retriever.backward(params[:, cols], g, global_step)
                seg_params = np.ascontiguousarray(params[:, cols])
                if isinstance(opt, StochasticRoundingFloat16):
                    # The decorator calls its optimizer with global_step 0.
                    opt.inner.apply(seg_params, gathered[k], g, float(learning_rates[k]), 0)
                    params[:, cols] = seg_params
                    p = draws[wave, starts[k] : starts[k] + self.dim - seg.offset]
                    params[:, seg.offset :] = stochastic_round(
                        np.ascontiguousarray(params[:, seg.offset :]), p
                    )
                else:
                    opt.apply(seg_params, gathered[k], g, float(learning_rates[k]), global_step)
                    params[:, cols] = seg_params
            put_rows(values, r, params)
            for st, got in zip(states, gathered, strict=True):
                for name, arr in st.items():
                    put_rows(arr, r, got[name])

    def restored_states(self, given: list[State], n: int) -> list[State]:
        """The per-segment state a restore writes for ``n`` dumped rows: ``given``,
        except that with ``monolith_quirks`` an Adam segment gets Monolith's swap
        (:meth:`~ps_server.engine.optimizers.adam.AdamOptimizer.monolith_restored_state`;
        AMSGrad restores correctly in Monolith too)."""
        if not self.monolith_quirks:
            return given
        out: list[State] = []
        for seg, st in zip(self.segments, given, strict=True):
            opt = seg.optimizer
            if isinstance(opt, StochasticRoundingFloat16):
                opt = opt.inner  # the decorator forwards Restore
            if type(opt) is AdamOptimizer:
                st = opt.monolith_restored_state(st, n)
            out.append(st)
        return out

    @property
    def dim(self) -> int:
        """Total values per entry."""
        return sum(s.dim for s in self.segments)

    @property
    def raw_view(self) -> bool:
        """True when lookups return stored values unchanged (no retriever transform)."""
        return self.serving or all(isinstance(s.retriever, RawRetriever) for s in self.segments)

    @classmethod
    def from_config(
        cls, config: eht.EntryConfig, seed: int | None = None, *, monolith_quirks: bool = False
    ) -> EntryLayout:
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
                optimizer = _wrap(where + ".opt_config", optimizer_from_config, seg.opt_config,
                                  dim, monolith_quirks=monolith_quirks)
                retriever = _wrap(where + ".comp_config", retriever_from_config, comp_cfg, dim)
            segments.append(Segment(offset, dim, initializer, optimizer, retriever, compressor))
            offset += dim
        return cls(segments, serving, monolith_quirks)


def _wrap(where: str, factory: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return factory(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
