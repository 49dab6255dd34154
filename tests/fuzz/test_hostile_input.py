"""Hostile input against one live shard (issue 7, item 3; docs/architecture.md decision 6).

Hypothesis generates requests for every RPC of both services (data plane and admin)
and sends them as raw bytes to ONE in-process shard server: truncated and padded
tensor bytes, shapes that disagree with the payload, negative and huge dims, NaN/inf
values and learning rates, ids at the int64 limits, unknown tables and filters,
oversized batches and answers, paths that try to leave the data root
(``../../etc``, absolute paths, a symlink out), NUL bytes and overlong names, and
garbage or mangled bytes for whole messages.

The expected outcome of every request is worked out independently of the server:

* bytes over the message limit: ``RESOURCE_EXHAUSTED``; bytes that do not parse
  as the request type: ``INVALID_ARGUMENT``;
* otherwise the request is checked against the wire contract (``Tensor`` bytes and
  shape, ``ps_service.proto``) and the path rules (data root), and every defect
  found adds its status; a request without such defects is run on a reference
  :class:`Shard` (the engine in this process, fed numpy arrays decoded here) and
  takes the engine's error, if any (``ps_server.errors`` family → status, as
  docs/architecture.md decision 6 lists them).

A rejected request must get a status in that precise set (never ``UNKNOWN`` or
``INTERNAL``) and leave the shard exactly as it was (every entry, optimizer slot,
timestamp, clock and filter cell: :func:`tests.faults.support.shard_fingerprint`). An
accepted one must answer what the reference answers and leave the shard equal to
the reference. Each example starts from the same state (the shard and the reference
are reset in place), so a failure shrinks and replays.

Budget: ``PS_FUZZ_SCALE`` (default 1) multiplies every test's ``max_examples``;
at scale 1 the suite sends at least ``PS_FUZZ_MIN_REQUESTS`` (10,000) requests,
which :func:`test_zz_request_budget` checks when the whole module ran. The count is
printed in pytest's terminal summary (``tests/fuzz/conftest.py``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from tests.fuzz.oracle import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT,
    FUZZ,
    MAX_MESSAGE,
    SCALE,
    STATS,
    Harness,
    baseline,
    examples,
    scratch_dir,
)
from tests.fuzz.strategies import DATA_CALLS, FILE_CALLS, encoded, encoded_runs, mangled
from tests.integration.conftest import start_inprocess_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # NaN, infinities and float32's extremes are sent on purpose: numpy says so.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

MIN_REQUESTS = int(os.environ.get("PS_FUZZ_MIN_REQUESTS", "10000"))


# ---------------------------------------------------------------- the fuzz tests


@contextlib.contextmanager
def live_shard(base: Path, shard_index: int, num_shards: int) -> Iterator[Harness]:
    """One in-process shard with a data root (and a symlink out of it) and its twin."""
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    shard = copy.deepcopy(baseline(True, shard_index, num_shards))
    with start_inprocess_server(
        shard=shard, shard_index=shard_index, num_shards=num_shards, data_root=str(root),
        max_message_bytes=MAX_MESSAGE, default_filter_capacity=DEFAULT_CAPACITY,
        default_filter_split_num=DEFAULT_SPLIT,
    ) as server:
        yield Harness(server, root, outside)
        # No call crashed the shard or hung; nothing ever escaped the data root, and
        # the shard still serves.
        assert (STATS.crashes, STATS.hangs) == (0, 0), STATS.report()
        assert list(outside.iterdir()) == []
        assert server.stub.ListTables(pb.ListTablesRequest(), timeout=10).names


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Shard 1 of 3 (ids of other shards are not its own: restores skip them)."""
    with scratch_dir(tmp_path_factory, "hostile") as base, live_shard(base, 1, 3) as h:
        yield h


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Shard 0 of 1: its checkpoints are complete, so whole restores can succeed."""
    with scratch_dir(tmp_path_factory, "hostile-single") as base, live_shard(base, 0, 1) as h:
        yield h


def run_calls(test: str, h: Harness, calls: list[tuple[str, bytes]], *, serving: bool
              ) -> None:
    h.reset(serving)
    for method, payload in calls:
        h.send(method, payload)
        STATS.by_test[test] += 1


@settings(FUZZ, max_examples=examples(750))
@given(calls=st.lists(encoded(DATA_CALLS), min_size=5, max_size=16))
def test_data_plane_requests(harness: Harness, calls: list[tuple[str, bytes]]) -> None:
    run_calls("data", harness, calls, serving=True)


@settings(FUZZ, max_examples=examples(380))
@given(calls=encoded_runs(FILE_CALLS, min_runs=2, max_runs=6))
def test_file_checkpoint_and_admin_requests(single: Harness,
                                            calls: list[tuple[str, bytes]]) -> None:
    run_calls("files", single, calls, serving=False)


@settings(FUZZ, max_examples=examples(380))
@given(calls=st.lists(mangled(), min_size=5, max_size=16))
def test_garbage_and_mangled_bytes(harness: Harness, calls: list[tuple[str, bytes]]) -> None:
    run_calls("bytes", harness, calls, serving=True)


def test_zz_request_budget(harness: Harness) -> None:
    """At scale 1 the suite sent at least ``PS_FUZZ_MIN_REQUESTS`` requests."""
    if not {"data", "files", "bytes"} <= set(STATS.by_test) or SCALE < 1:
        pytest.skip("only meaningful after every fuzz test ran at full scale")
    assert STATS.total >= MIN_REQUESTS, STATS.report()
