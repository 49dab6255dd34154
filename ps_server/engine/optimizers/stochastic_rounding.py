"""Stochastic rounding of updated values to float16 neighbours (docs/semantics.md §5.1).

``OptimizerConfig.stochastic_rounding_float16 = true`` wraps the optimizer: after the
inner update (called with ``global_step`` 0) every value ``w`` becomes one of its two
float16 neighbours ``down <= w <= up``: ``up`` iff ``p <= (w - down) / (up - down)``
(float32), so an exactly representable ``w`` stays put. One ``p`` is drawn per element,
in row-major order over the batch.

``p`` comes from Monolith's multiply-with-carry pair ``(s0, s1) = (0, 1)``::

    s0 = 36969 * (s0 & 0xFFFF) + (s0 >> 16)      (stays 0 forever)
    s1 = 18000 * (s1 & 0xFFFF) + (s1 >> 16)
    p  = float32(((s0 & 0xFFFF) << 16) + s1) / 2^32  =  float32(s1) / 2^32

Vectorized: writing ``s1 = 2^16 * c + x``, one step maps it to ``18000 * x + c``, which
is ``s1 * 2^-16 mod M`` with ``M = 18000 * 2^16 - 1``; and ``2^-16 = 18000 (mod M)``.
So the k-th draw is ``18000^k mod M``: a batch is ``s * 18000^j mod M`` for consecutive
``j``, computed from a cached table of powers.

Choice (docs/semantics.md §5.1, §12): Monolith keeps one generator per thread shared by
every wrapped optimizer, and its wrapper of segment k rounds the entry from the
segment's offset to the END of the entry; we keep one generator per wrapper object
(thread-safe), so each segment's sequence is reproducible on its own, and round the
segment only. A table with ``monolith_quirks`` does what Monolith does instead: its
layout drives the wrappers' inner optimizers and rounds with :func:`stochastic_round`
and one :class:`MultiplyWithCarry` per table
(:meth:`~ps_server.engine.entry_layout.EntryLayout.optimize_entrywise`). The dump and
slots are the inner optimizer's.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from ps_server.engine.optimizers.base import Optimizer, State, StateSlot
from ps_server.engine.types import Floats

_MULTIPLIER = 18000
_MODULUS = _MULTIPLIER * (1 << 16) - 1  # < 2^31, so products fit in int64
_CHUNK = 1 << 16


def _power_table(n: int) -> npt.NDArray[np.int64]:
    """``[18000^1, ..., 18000^n] mod M`` as int64, by doubling."""
    table = np.array([_MULTIPLIER], dtype=np.int64)
    while table.size < n:
        table = np.concatenate([table, table * table[-1] % _MODULUS])
    return table[:n]


_POWERS = _power_table(_CHUNK)


class MultiplyWithCarry:
    """Monolith's stochastic-rounding generator, drawing whole batches at once."""

    def __init__(self) -> None:
        self._s1 = 1  # the state after the draws handed out so far
        self._lock = threading.Lock()

    def draw(self, k: int) -> Floats:
        """The next ``k`` values of ``p`` as ``float32[k]`` in ``[0, 1]``."""
        with self._lock:
            start = self._s1
            self._s1 = start * pow(_MULTIPLIER, k, _MODULUS) % _MODULUS
        out = np.empty(k, dtype=np.float32)
        for lo in range(0, k, _CHUNK):
            hi = min(lo + _CHUNK, k)
            base = start * pow(_MULTIPLIER, lo, _MODULUS) % _MODULUS
            s1 = base * _POWERS[: hi - lo] % _MODULUS
            out[lo:hi] = s1.astype(np.float32)
        out /= np.float32(2.0**32)
        return out


def stochastic_round(w: Floats, p: Floats) -> Floats:
    """Round each ``w`` to a float16 neighbour: up iff ``p <= (w - down) / (up - down)``.

    ``w`` and ``p`` are float32 of one shape; the result is float32 holding
    float16-representable values (or inf/NaN where ``w`` overflows or is NaN).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        half = w.astype(np.float16)  # nearest; beyond 65504 this is inf
        near = half.astype(np.float32)
        above = np.nextafter(half, np.float16(np.inf)).astype(np.float32)
        below = np.nextafter(half, np.float16(-np.inf)).astype(np.float32)
        up = np.where(near >= w, near, above)
        down = np.where(near <= w, near, below)
        # Exact values give 0/0 = NaN here, so the comparison is False and w stays.
        frac = (w - down) / (up - down)
        return np.where(p <= frac, up, down)


class StochasticRoundingFloat16(Optimizer):
    """Wraps ``inner``: its update, then stochastic rounding of ``w`` to float16.

    ``dump_field``, slots and state are the inner optimizer's (Monolith's decorator
    forwards them). The inner optimizer always sees ``global_step`` 0.
    """

    #: The random draws follow the order of the rows in each wave.
    rows_independent: ClassVar[bool] = False

    def __init__(self, inner: Optimizer) -> None:
        super().__init__(inner.config, inner.dim)
        self.inner = inner
        self.rng = MultiplyWithCarry()

    # The base declares dump_field a class constant; a wrapper can only forward it
    # per instance, hence the read-only property (read it from instances).
    @property
    def dump_field(self) -> int | None:  # type: ignore[override]
        """The inner optimizer's ``SingleOptimizerDump`` field."""
        return self.inner.dump_field

    def slots(self) -> tuple[StateSlot, ...]:
        return self.inner.slots()

    def init_state(self, n: int) -> State:
        return self.inner.init_state(n)

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        self.inner.apply(params, state, grads, lr, 0)
        p = self.rng.draw(params.size).reshape(params.shape)
        params[...] = stochastic_round(params, p)
