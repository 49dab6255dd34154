"""Per-context metadata registry: Monolith's ``graph_meta`` without a TF graph.

In Monolith, ``get_meta(key, factory)`` keeps one dict per TensorFlow graph and
returns ``dict[key]``, creating it with ``factory()`` on first use; hash tables keep
the set of names used in the graph under ``"hash_table_metadata"`` so a duplicate
name raises ``ValueError`` (docs/semantics.md §10).

Here the "graph" is a :class:`MetaContext`. Each :class:`ps_client.PsClient` owns one,
so table names are unique per client; while a client is used as a context manager
(``with PsClient(...) as client:``) its context is the *current* one and the
module-level :func:`get_meta` reads it. Outside any client the current context is a
process-wide default. The current context is held in a :mod:`contextvars` variable,
so threads and asyncio tasks each see the context they entered.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

HASH_TABLE_METADATA = "hash_table_metadata"
"""Key of the set of table names used in a context."""


class MetaContext:
    """One registry of metadata (Monolith's per-graph dict). Thread-safe."""

    def __init__(self) -> None:
        self._meta: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get_meta(self, key: Any, factory: Callable[[], T]) -> T:
        """``self[key]``, created with ``factory()`` the first time it is asked for."""
        with self._lock:
            if key not in self._meta:
                self._meta[key] = factory()
            value: T = self._meta[key]
            return value

    def clear(self) -> None:
        """Forget everything (a fresh graph)."""
        with self._lock:
            self._meta.clear()

    @contextlib.contextmanager
    def as_current(self) -> Iterator[MetaContext]:
        """Make this the context :func:`get_meta` uses inside the ``with`` block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


_default = MetaContext()
_current: contextvars.ContextVar[MetaContext] = contextvars.ContextVar(
    "ps_client_meta_context", default=_default
)


def current_context() -> MetaContext:
    """The context :func:`get_meta` uses right now."""
    return _current.get()


def get_meta(key: Any, factory: Callable[[], T]) -> T:
    """``current_context()[key]``, created with ``factory()`` on first use.

    Example: ``names = get_meta("hash_table_metadata", set)``.
    """
    return current_context().get_meta(key, factory)
