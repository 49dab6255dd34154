"""graph_meta: one registry per context, created lazily, current per thread/task."""

from __future__ import annotations

import threading

from ps_client.graph_meta import MetaContext, current_context, get_meta


def test_factory_runs_once_per_key() -> None:
    ctx = MetaContext()
    calls: list[int] = []

    def factory() -> set[str]:
        calls.append(1)
        return set()

    ctx.get_meta("names", factory).add("a")
    assert ctx.get_meta("names", factory) == {"a"}
    assert len(calls) == 1
    ctx.clear()
    assert ctx.get_meta("names", factory) == set()
    assert len(calls) == 2


def test_as_current_switches_and_restores() -> None:
    outer = current_context()
    mine = MetaContext()
    with mine.as_current():
        get_meta("k", list).append(1)
        assert current_context() is mine
    assert current_context() is outer
    assert mine.get_meta("k", list) == [1]
    assert get_meta("k", list) is not mine.get_meta("k", list)


def test_threads_start_in_the_default_context() -> None:
    mine = MetaContext()
    seen: list[MetaContext] = []
    with mine.as_current():
        t = threading.Thread(target=lambda: seen.append(current_context()))
        t.start()
        t.join()
    assert seen and seen[0] is not mine
