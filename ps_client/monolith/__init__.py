"""Monolith's Python op modules, over :class:`ps_client.PsClient`.

Code written against ByteDance Monolith's ``monolith.native_training.hash_table_ops``
and ``hash_filter_ops`` runs here with one change, the import::

    from ps_client.monolith import hash_filter_ops, hash_table_ops   # was monolith.native_training
    from ps_client.monolith import entry                             # HashTableConfigInstance

and one added line before the first op, naming the cluster::

    ps_client.monolith.connect(["host0:port", "host1:port"])         # or use_client(client)

The functions keep Monolith's names, positional order, keywords and defaults. What
differs, everywhere:

* **No graph.** Each call runs at once. Arguments Monolith takes as tensors take
  numpy arrays or anything array-like (lists, scalars); results are numpy arrays
  (``float32`` / ``int64`` / ``int32``), ``int`` or ``bytes``. Ops that change a table
  (``assign``, ``assign_add``, ``apply_gradients``, ``save``, ``restore``) perform the
  call and return the table handle, as Monolith returns the updated table; ``as_op()``
  returns the handle too, so ``sess.run(table.as_op())`` becomes nothing at all.
* **Which cluster.** Monolith's functions take no client. The factories
  (``hash_table_from_config``, ``create_hash_filters`` and the others) accept a
  keyword-only ``client=``; without it they use the default client set by
  :func:`connect` or :func:`use_client` (none set → ``RuntimeError``). Handles remember
  the client they were made with, so their methods and the fused ops need nothing more.
* **Thread tuning is ignored.** ``use_multi_threads`` (``lookup``, ``apply_gradients``)
  and ``random_sleep_ms`` (``save``) only tuned Monolith's in-process threads and disk
  pressure; they are accepted and have no effect: every batch is one vectorized pass
  on each shard, and the shards run in parallel. ``lookup``'s ``enable_dedup`` is
  accepted and ignored too (the client always deduplicates lookup ids, which changes
  no value); ``apply_gradients``'s ``enable_dedup`` is honoured.

See ``docs/monolith-migration.md`` ("Drop-in ops") for what is supported and what is not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ps_client.client import PsClient

__all__ = ["connect", "disconnect", "get_client", "use_client"]

_lock = threading.Lock()
_default: PsClient | None = None
_owned = False


def connect(addresses: Sequence[str], **client_options: Any) -> PsClient:
    """Open a :class:`PsClient` on ``addresses`` (shard order) and make it the default
    client of the drop-in ops; a default opened by an earlier :func:`connect` is closed.

    :param client_options: keywords of :class:`PsClient` (``timeout``, ``auth_token``, …).
    :returns: the new client.
    """
    global _default, _owned
    client = PsClient(addresses, **client_options)
    with _lock:
        previous, previous_owned = _default, _owned
        _default, _owned = client, True
    if previous is not None and previous_owned:
        previous.close()
    return client


def disconnect() -> None:
    """Forget the default client, closing it if :func:`connect` opened it."""
    global _default, _owned
    with _lock:
        previous, previous_owned = _default, _owned
        _default, _owned = None, False
    if previous is not None and previous_owned:
        previous.close()


@contextmanager
def use_client(client: PsClient) -> Iterator[PsClient]:
    """Make an existing ``client`` the default inside a ``with`` block (the previous
    default comes back on exit; the client is not closed)."""
    global _default, _owned
    with _lock:
        previous = (_default, _owned)
        _default, _owned = client, False
    try:
        yield client
    finally:
        with _lock:
            _default, _owned = previous


def get_client(client: PsClient | None = None) -> PsClient:
    """``client`` if given, else the default one.

    :raises RuntimeError: neither is set.
    """
    if client is not None:
        return client
    with _lock:
        current = _default
    if current is None:
        raise RuntimeError(
            "no PsClient for the Monolith drop-in ops: call ps_client.monolith.connect("
            "addresses), use `with ps_client.monolith.use_client(client):`, or pass client="
        )
    return current
