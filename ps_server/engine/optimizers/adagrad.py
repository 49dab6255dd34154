"""Adagrad (docs/semantics.md §5.1).

Per element, with ``g' = g + wd * w``::

    norm += g'^2
    w    -= (lr / sqrt(norm)) * g'

Float arithmetic is Monolith's build (docs/semantics.md §5.4: ``-D_ENABLE_AVX -mfma``),
checked bit for bit against its compiled C++ (tests/data/monolith_vectors): full blocks
of 8 dims run ``_mm256_fmadd_ps`` and the tail dims scalar code that g++ contracts the
same way, so every dim computes ``g' = fma(wd, w, g)``, ``norm = fma(g', g', norm)``,
``w = fma(-(lr / sqrt(norm)), g', w)``: one rounding per multiply-add.

State ``norm`` starts at ``initial_accumulator_value``; the dump is
``SingleOptimizerDump.adagrad`` (field 1) with ``norm`` (field 1, repeated float).

With weight decay, Monolith's AVX blocks move ``w`` with the raw ``g``, not ``g'``, in
every full block of 8 dims (its scalar tail uses ``g'``). We do the same, so the numbers
are Monolith's (docs/semantics.md §5.1, §12); without weight decay both are ``g``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from protos import optimizer_pb2 as opt_pb
from ps_server.engine.fpmath import fma32, fma_chain
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    float_slot,
    sequence_ends,
)
from ps_server.engine.rows import apply_in_row_blocks
from ps_server.engine.types import Floats

#: Dims per AVX block of Monolith's Adagrad (8 float32 lanes); the rest run scalar code.
AVX_BLOCK = 8


class AdagradOptimizer(Optimizer):
    """``norm += g'^2; w -= lr / sqrt(norm) * g'`` with ``g' = g + wd*w`` (float32).

    Slots: ``norm`` [dim] (dump field 1). Dump: ``adagrad`` (field 1).
    ``hessian_compression_times`` and ``warmup_steps`` are ignored.
    """

    dump_field: ClassVar[int | None] = 1

    def __init__(self, config: opt_pb.AdagradOptimizerConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.initial_accumulator_value = np.float32(config.initial_accumulator_value)
        self.weight_decay = np.float32(config.weight_decay_factor)

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("norm", self.dim, 1),)

    def init_state(self, n: int) -> State:
        return {"norm": np.full((n, self.dim), self.initial_accumulator_value, np.float32)}

    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        apply_in_row_blocks(self._apply_block, params, state, grads, lr, global_step)

    def _apply_block(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        norm = state["norm"]
        g = fma32(self.weight_decay, params, grads) if self.weight_decay else grads
        norm[...] = fma32(g, g, norm)
        # A zero accumulator gives inf/NaN, as in Monolith; no warning for it.
        with np.errstate(divide="ignore", invalid="ignore"):
            neg_lr = np.sqrt(norm)
            np.divide(-np.float32(lr), neg_lr, out=neg_lr)
        step = g
        blocked = self.dim - self.dim % AVX_BLOCK
        if self.weight_decay and blocked:
            step = g.copy()
            step[:, :blocked] = grads[:, :blocked]  # Monolith's AVX blocks: the raw g
        params[...] = fma32(neg_lr, step, params)

    #: Two FMA chains per occurrence (accumulator, then weight) and a rate pass.
    run_step_cost: ClassVar[int] = 128

    def has_run_form(self) -> bool:
        # With weight decay the gradient reads w, so each step needs the previous one.
        return not self.weight_decay

    def apply_run(
        self,
        params: Floats,
        state: State,
        grads: Floats,
        ends: npt.NDArray[np.intp],
        lr: float,
        global_step: int,
    ) -> None:
        """Without weight decay ``norm_k = fma(g_k, g_k, norm_{k-1})`` does not read
        ``w``: the accumulators of every rank come first (one FMA chain,
        :func:`~ps_server.engine.fpmath.fma_chain`), then all the rates ``-lr /
        sqrt(norm_k)`` in one pass, then ``w_k = fma(rate_k, g_k, w_{k-1})`` (another):
        the same operations, in the same order, as one :meth:`apply` per occurrence.
        Padding after an entry's last occurrence is never read (:func:`sequence_ends`)."""
        norm = state["norm"]
        c = grads.shape[0]
        norms = np.empty((c + 1, *norm.shape), dtype=np.float32)
        norms[0] = norm
        norms[1:] = fma_chain(grads, grads, norm)
        with np.errstate(divide="ignore", invalid="ignore"):
            rates = np.sqrt(norms[1:])
            np.divide(-np.float32(lr), rates, out=rates)
        seq = np.empty((c + 1, *params.shape), dtype=np.float32)
        seq[0] = params
        seq[1:] = fma_chain(rates, grads, params)
        params[...] = sequence_ends(seq, ends)
        norm[...] = sequence_ends(norms, ends)
