"""Monolith's ``entry.HashTableConfigInstance``: a table config with its learning rates.

Only what :func:`ps_client.monolith.hash_table_ops.hash_table_from_config` reads is
kept: the config message, one learning rate per segment, and the extra restore names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protos import embedding_hash_table_pb2 as eht


class HashTableConfigInstance:
    """An ``EmbeddingHashTableConfig`` plus its per-segment learning rates.

    :param table_config: the config message (copied).
    :param learning_rate_fns: one per segment: a number, a zero-argument callable, or a
        callable of the global step (e.g. :class:`ps_client.PolynomialDecay`).
    :param extra_restore_names: other names the table's files may carry.
    """

    def __init__(
        self,
        table_config: eht.EmbeddingHashTableConfig,
        learning_rate_fns: Sequence[Any],
        extra_restore_names: Sequence[str] | None = None,
    ) -> None:
        self._table_config = eht.EmbeddingHashTableConfig()
        self._table_config.CopyFrom(table_config)
        self._learning_rate_fns = list(learning_rate_fns)
        self.extra_restore_names: list[str] = list(extra_restore_names or [])

    @property
    def table_config(self) -> eht.EmbeddingHashTableConfig:
        return self._table_config

    @property
    def learning_rate_fns(self) -> list[Any]:
        return self._learning_rate_fns

    def __str__(self) -> str:
        return (f"TableConfigPB: {self._table_config}, "
                f"LearningRateFns: [{', '.join(str(f) for f in self._learning_rate_fns)}]")
