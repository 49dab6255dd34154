"""Optimizer steps run block by block over rows (ps_server.engine.rows.row_blocks) give
the bits of one step over all rows at once, and every row is stepped exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from protos import embedding_hash_table_pb2 as eht
from ps_server.engine import rows as rows_mod
from ps_server.engine.optimizers import optimizer_from_config
from ps_server.engine.rows import row_blocks

CONFIGS = {
    "adagrad": eht.OptimizerConfig(adagrad=eht.AdagradOptimizerConfig(
        initial_accumulator_value=0.1, weight_decay_factor=0.01)),
    "adam": eht.OptimizerConfig(adam=eht.AdamOptimizerConfig(
        use_nesterov=True, weight_decay_factor=0.01)),
    "amsgrad": eht.OptimizerConfig(amsgrad=eht.AmsgradOptimizerConfig()),
    "ftrl": eht.OptimizerConfig(ftrl=eht.FtrlOptimizerConfig(
        initial_accumulator_value=0.1, l1_regularization_strength=0.01,
        l2_regularization_strength=0.1, beta=0.5)),
    "momentum": eht.OptimizerConfig(momentum=eht.MomentumOptimizerConfig(
        momentum=0.9, use_nesterov=True, weight_decay_factor=0.1)),
    "adadelta": eht.OptimizerConfig(adadelta=eht.AdadeltaOptimizerConfig(
        weight_decay_factor=0.1)),
    "moving_average": eht.OptimizerConfig(moving_average=eht.MovingAverageOptimizerConfig(
        momentum=0.7)),
    "rmsprop": eht.OptimizerConfig(rmsprop=eht.RmspropOptimizerConfig(momentum=0.9)),
    "rmspropv2": eht.OptimizerConfig(rmspropv2=eht.RmspropV2OptimizerConfig(momentum=0.9)),
}


def test_row_blocks_cover_every_row_once() -> None:
    for rows, width in ((0, 8), (1, 8), (10, 1 << 20), (5000, 32), (4096, 32), (4097, 32)):
        covered = np.concatenate([np.arange(rows)[b] for b in row_blocks(rows, width)])
        assert np.array_equal(covered, np.arange(rows))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_blocked_step_is_bit_identical_to_one_pass(kind: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    m, dim = 300, 8
    opt = optimizer_from_config(CONFIGS[kind], dim)
    params = rng.standard_normal((m, dim)).astype(np.float32)
    state = opt.init_state(m)
    grads_list = [rng.standard_normal((m, dim)).astype(np.float32) for _ in range(3)]

    def steps(block: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        monkeypatch.setattr(rows_mod, "STEP_BLOCK", block)
        p = params.copy()
        st = {k: v.copy() for k, v in state.items()}
        for g in grads_list:
            opt.apply(p, st, g, 0.01, 1)
        return p, st

    whole_p, whole_st = steps(1 << 20)
    assert len(row_blocks(m, dim)) == 1
    for block in (dim * 7, dim * 64, dim * 299):  # uneven last blocks, one row short
        p, st = steps(block)
        assert len(row_blocks(m, dim)) > 1
        assert p.tobytes() == whole_p.tobytes()
        for k in whole_st:
            assert st[k].tobytes() == whole_st[k].tobytes()


@pytest.mark.parametrize("kind", [*sorted(CONFIGS), "sgd"])
def test_blocked_gather_step_scatter_is_bit_identical(kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Optimizer._apply_rows gathers, steps and scatters distinct rows of the storage one
    # row block at a time through reused buffers: same bits as the whole batch at once,
    # untouched rows untouched, on a strided storage view (one segment of a wider table).
    rng = np.random.default_rng(12)
    cap, m, dim = 900, 300, 8
    config = CONFIGS.get(kind) or eht.OptimizerConfig(sgd=eht.SgdOptimizerConfig())
    opt = optimizer_from_config(config, dim)
    wide = rng.standard_normal((cap, dim + 3)).astype(np.float32)
    state = opt.init_state(cap)
    for v in state.values():
        if v.dtype == np.float32:
            v[...] = np.abs(rng.standard_normal(v.shape)).astype(np.float32)
    rows = rng.permutation(cap)[:m].astype(np.int64)
    grads = [rng.standard_normal((m, dim)).astype(np.float32) for _ in range(2)]

    def run(block: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        monkeypatch.setattr(rows_mod, "STEP_BLOCK", block)
        w = wide.copy()
        st = {k: v.copy() for k, v in state.items()}
        for step, g in enumerate(grads, start=1):
            opt.apply_sequential(w[:, 1 : dim + 1], st, rows, g, 0.01, step)
        return w, st

    whole_w, whole_st = run(1 << 20)
    for block in (dim * 7, dim * 64):
        w, st = run(block)
        assert w.tobytes() == whole_w.tobytes()
        for k in whole_st:
            assert st[k].tobytes() == whole_st[k].tobytes()
    untouched = np.setdiff1d(np.arange(cap), rows)
    assert whole_w[untouched].tobytes() == wide[untouched].tobytes()
