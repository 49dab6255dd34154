"""Builders for the Monolith table configs most users write by hand.

``table_config(32)`` is Monolith's ``test_hash_table`` default: one segment of
dim 32, SGD, zeros initializer, fp32 compressor, cuckoo table. Pass your own
sub-configs for anything else; the results are plain protobuf messages.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from protos import embedding_hash_table_pb2 as eht
from ps_server.errors import ConfigError


def sgd(learning_rate: float = 0.01) -> eht.OptimizerConfig:
    """An ``OptimizerConfig`` with SGD."""
    return eht.OptimizerConfig(sgd=eht.SgdOptimizerConfig(learning_rate=learning_rate))


def adagrad(initial_accumulator_value: float = 0.1, weight_decay_factor: float = 0.0
            ) -> eht.OptimizerConfig:
    """An ``OptimizerConfig`` with Adagrad."""
    return eht.OptimizerConfig(
        adagrad=eht.AdagradOptimizerConfig(
            initial_accumulator_value=initial_accumulator_value,
            weight_decay_factor=weight_decay_factor,
        )
    )


def zeros() -> eht.InitializerConfig:
    """An ``InitializerConfig`` filling zeros."""
    return eht.InitializerConfig(zeros=eht.ZerosInitializerConfig())


def fp32() -> eht.FloatCompressorConfig:
    """A ``FloatCompressorConfig`` storing raw float32."""
    return eht.FloatCompressorConfig(fp32=eht.FloatCompressorConfig.Fp32())


def segment(
    dim: int,
    optimizer: eht.OptimizerConfig | None = None,
    initializer: eht.InitializerConfig | None = None,
    compressor: eht.FloatCompressorConfig | None = None,
) -> eht.EntryConfig.Segment:
    """One entry segment (defaults: SGD, zeros, fp32)."""
    return eht.EntryConfig.Segment(
        dim_size=dim,
        opt_config=optimizer if optimizer is not None else sgd(),
        init_config=initializer if initializer is not None else zeros(),
        comp_config=compressor if compressor is not None else fp32(),
    )


def table_config(
    dim: int | None = None,
    *,
    segments: Sequence[eht.EntryConfig.Segment] = (),
    optimizer: eht.OptimizerConfig | None = None,
    initializer: eht.InitializerConfig | None = None,
    compressor: eht.FloatCompressorConfig | None = None,
    serving: bool = False,
    expire_days: int | None = None,
) -> eht.EmbeddingHashTableConfig:
    """A cuckoo ``EmbeddingHashTableConfig`` with one segment of ``dim`` or the given segments.

    :param dim: the segment's dim (None: 1); it must be a positive integer.
    :raises ConfigError: ``dim`` is not a positive integer (``table_config(0)`` made a
        dim-1 table once).
    """
    if dim is not None:
        try:
            size = -1 if isinstance(dim, bool) else operator.index(dim)
        except TypeError:
            size = -1
        if size < 1:
            raise ConfigError(f"table_config: dim must be a positive integer, got {dim!r}")
        dim = size
    segs = list(segments) or [segment(dim or 1, optimizer, initializer, compressor)]
    config = eht.EmbeddingHashTableConfig(
        entry_config=eht.EntryConfig(
            segments=segs,
            entry_type=eht.EntryConfig.SERVING if serving else eht.EntryConfig.TRAINING,
        ),
        cuckoo=eht.CuckooEmbeddingHashTableConfig(),
    )
    if expire_days is not None:
        config.slot_expire_time_config.default_expire_time = expire_days
    return config
