"""The sync face (PsClient, Table, HashFilters) and the async one take the same calls.

The sync classes are written out by hand (they return sync handles, ``self`` from
table updates, and carry the user-facing docstrings); this test keeps them from
drifting: every public method of an async class exists on its sync twin with the
same parameters (names, kinds, defaults), and the other way round. Return types
differ by design (a value vs an awaitable of it; sync vs async handles).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from ps_client import (
    AsyncHashFilters,
    AsyncPsClient,
    AsyncTable,
    HashFilters,
    PsClient,
    Table,
)

PAIRS = [(AsyncPsClient, PsClient), (AsyncTable, Table), (AsyncHashFilters, HashFilters)]


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def parameters(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """``(name, kind, default)`` of each parameter but ``self``; annotations aside."""
    return [
        (p.name, p.kind, p.default)
        for p in list(inspect.signature(fn).parameters.values())[1:]
    ]


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_public_methods(async_cls: type, sync_cls: type) -> None:
    assert sorted(public_methods(async_cls)) == sorted(public_methods(sync_cls))


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_parameters_and_defaults(async_cls: type, sync_cls: type) -> None:
    sync_methods = public_methods(sync_cls)
    for name, async_fn in public_methods(async_cls).items():
        sync_fn = sync_methods[name]
        assert parameters(sync_fn) == parameters(async_fn), f"{sync_cls.__name__}.{name}"
        assert not inspect.iscoroutinefunction(sync_fn), f"{sync_cls.__name__}.{name}"


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=lambda c: c.__name__)
def test_every_sync_method_is_documented(async_cls: type, sync_cls: type) -> None:
    for name, fn in public_methods(sync_cls).items():
        assert inspect.getdoc(fn), f"{sync_cls.__name__}.{name} has no docstring"
