"""The engine: one shard's tables, filters and math, pure numpy (no gRPC, no files).

The runtime and the service use only the names below; :class:`Shard` is the single
object they call (create, lookup, assign, apply_gradients, fused ops,
intercept_gradient, eviction and :meth:`Shard.describe`). The submodules are the
engine's own business (the checkpoint code, which persists engine state, also reads
their column layouts):

* ``hash_table`` — :class:`EmbeddingHashTable`, batch lookup / assign / apply_gradients;
* ``id_index`` — the vectorized id → dense row map;
* ``optimizers/`` — one module per Monolith optimizer, state kept as columns;
* ``filters/`` — sliding, probabilistic and dummy hash filters;
* ``initializers``, ``compressors``, ``entry_layout``, ``expiry``, ``rows``, ``types``;
* ``configs`` — builders of Monolith's table config protos (for tests, examples, users).
"""

from ps_server.engine import configs
from ps_server.engine.expiry import EvictionScheduler
from ps_server.engine.filters import FILTER_TYPES, HashFilter
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.shard import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT_NUM,
    MAX_FILES_PER_SAVE,
    MAX_FILTER_CAPACITY,
    MAX_NAME_BYTES,
    FilterDescription,
    FilterOptions,
    FilterSlot,
    Shard,
    ShardDescription,
    ShardLimits,
    TableDescription,
    TableSlot,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SPLIT_NUM",
    "FILTER_TYPES",
    "MAX_FILES_PER_SAVE",
    "MAX_FILTER_CAPACITY",
    "MAX_NAME_BYTES",
    "EmbeddingHashTable",
    "EvictionScheduler",
    "FilterDescription",
    "FilterOptions",
    "FilterSlot",
    "HashFilter",
    "Shard",
    "ShardDescription",
    "ShardLimits",
    "TableDescription",
    "TableSlot",
    "configs",
]
