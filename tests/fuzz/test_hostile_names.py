"""Hostile table and filter names through real creation, checkpoints and table files
(issue 12, item 1).

Hypothesis draws a few names (unicode, ``/``, ``:``, ``-``, ``..``, NUL, names at and
past the 200-byte limit, names that differ only in characters the file-stem rule
maps together, ``x`` next to ``x_0``-style suffixes, reserved filter stems) and
creates filters and tables under them on ONE live shard (shard 0 of 1, with a data
root). Every creation must get exactly what docs/api.md promises:

* an empty name, a NUL or more than 200 bytes: INVALID_ARGUMENT; a table whose file
  stem is ``hash_filter`` or starts with ``hash_filter_``: INVALID_ARGUMENT;
* a name whose file stem (``:`` and ``/`` written as ``-``) is another live
  table's (filter's): ALREADY_EXISTS naming that other table (filter);
* otherwise the table (filter) is created.

Each created table gets entries of its own. Then a whole checkpoint is saved,
committed and restored twice (over changed tables, and into an empty shard that
rebuilds everything from the manifest), and each table is saved and restored
through ``SaveTable`` / ``RestoreTable`` at ``pt/<name>``. The invariant: every table
restores exactly its own entries, no two tables (or filters) share a file, every
file lies in the data root, nothing appears outside it, and the shard keeps serving.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings

from protos import ps_service_pb2 as pb
from ps_server.engine import configs
from ps_server.engine.shard import Shard
from tests.faults.support import shard_fingerprint
from tests.fuzz.oracle import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT,
    FUZZ,
    MAX_MESSAGE,
    STATS,
    T0,
    call,
    examples,
    scratch_dir,
    tensor,
)
from tests.fuzz.strategies import hostile_names
from tests.integration.conftest import RunningServer, start_inprocess_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Code = grpc.StatusCode
TEST = "names"
MAX_NAME_BYTES = 200  # docs/api.md: names name checkpoint files
CONFIG = configs.table_config(2).SerializeToString()


def stem(name: str) -> str:
    """docs/semantics.md §6.5: ``:`` and ``/`` are written as ``-`` in file names."""
    return name.replace(":", "-").replace("/", "-")


class Names:
    """The live shard (0 of 1), its data root and a directory outside it."""

    def __init__(self, server: RunningServer, root: Path, outside: Path) -> None:
        self.server = server
        self.root = root
        self.outside = outside

    def reset(self) -> None:
        self.server.shard.tables.clear()
        self.server.shard.filters.clear()
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def send(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, bytes | None]:
        return call(self.server, TEST, method, request)


@pytest.fixture(scope="module")
def names_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Names]:
    with scratch_dir(tmp_path_factory, "hostile-names") as base:
        root, outside = base / "root", base / "outside"
        root.mkdir()
        outside.mkdir()
        with start_inprocess_server(
            shard=Shard(0, 1), shard_index=0, num_shards=1, data_root=str(root),
            max_message_bytes=MAX_MESSAGE, default_filter_capacity=DEFAULT_CAPACITY,
            default_filter_split_num=DEFAULT_SPLIT,
        ) as server:
            yield Names(server, root, outside)
            assert (STATS.crashes, STATS.hangs) == (0, 0), STATS.report()
            assert list(outside.iterdir()) == []
            assert server.stub.ListTables(pb.ListTablesRequest(), timeout=10) is not None


def expected_creation(name: str, live: list[str], *, table: bool
                      ) -> tuple[grpc.StatusCode, str | None]:
    """The status docs/api.md promises and the name the message must contain (a
    filter created again with the same options is not an error: it is not created)."""
    if not name or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        return Code.INVALID_ARGUMENT, None
    if table and (stem(name) == "hash_filter" or stem(name).startswith("hash_filter_")):
        return Code.INVALID_ARGUMENT, "hash_filter"
    if name in live:
        return (Code.ALREADY_EXISTS, repr(name)) if table else (Code.OK, None)
    clash = [other for other in live if stem(other) == stem(name)]
    if clash:
        return Code.ALREADY_EXISTS, repr(clash[0])
    return Code.OK, None


def create_all(h: Names, filters: list[str], tables: list[str]) -> tuple[list[str], list[str]]:
    """Create the filters, then the tables (each using a filter, in turn); the names
    created, checked against :func:`expected_creation`."""
    made_filters: list[str] = []
    for name in filters:
        want, naming = expected_creation(name, made_filters, table=False)
        code, details, _ = h.send("CreateHashFilter", pb.CreateHashFilterRequest(
            name=name, enable_hash_filter=True, filter_type="sliding_hash_filter",
            capacity=DEFAULT_CAPACITY, split_num=5))
        assert code == want, f"filter {name!r} (live {made_filters}): {code.name}: {details}"
        if naming is not None:
            assert naming in details, f"filter {name!r}: {details!r} does not name {naming}"
        if code == Code.OK and name not in made_filters:
            made_filters.append(name)
    made: list[str] = []
    for k, name in enumerate(tables):
        want, naming = expected_creation(name, made, table=True)
        flt = made_filters[k % len(made_filters)] if made_filters and k % 2 else ""
        code, details, _ = h.send("CreateTable", pb.CreateTableRequest(
            name=name, config=CONFIG, hash_filter=flt))
        assert code == want, f"table {name!r} (live {made}): {code.name}: {details}"
        if naming is not None:
            assert naming in details, f"table {name!r}: {details!r} does not name {naming}"
        if code == Code.OK:
            made.append(name)
    return made_filters, made


def fill(h: Names, tables: list[str], scale: float) -> None:
    """Table ``k`` holds ids ``1000 k + j`` with values ``scale * (k + 1)``: whose
    entries a table holds is visible."""
    for k, name in enumerate(tables):
        ids = np.arange(1000 * k, 1000 * k + 3, dtype=np.int64)
        values = np.full((3, 2), scale * (k + 1), dtype=np.float32)
        code, details, _ = h.send("Assign", pb.AssignRequest(
            table=name, ids=tensor(ids), values=tensor(values), req_time=T0))
        assert code == Code.OK, f"{name!r}: {details}"


def files_in(root: Path) -> list[Path]:
    """Every file below ``root``; none is a symbolic link (nothing was planted)."""
    found = [p for p in root.rglob("*") if not p.is_dir()]
    assert not [p for p in root.rglob("*") if p.is_symlink()]
    return found


def assert_served(h: Names, tables: list[str]) -> None:
    code, details, raw = h.send("ListTables", pb.ListTablesRequest())
    assert code == Code.OK, details
    assert raw is not None
    assert list(pb.ListTablesResponse.FromString(raw).names) == sorted(tables)


def checkpoint_round_trip(h: Names, filters: list[str], tables: list[str]) -> None:
    saved = shard_fingerprint(h.server.shard)
    save = pb.AdminSaveRequest(model_dir="ck", global_step=1)
    code, details, _ = h.send("Admin.SaveCheckpoint", save)
    assert code == Code.OK, details
    code, details, _ = h.send("Admin.CommitCheckpoint", save)
    assert code == Code.OK, details
    assets = h.root / "ck" / "model.ckpt-1.assets"
    manifest = json.loads((assets / "manifest.json").read_text("utf-8"))
    assert sorted(manifest["tables"]) == sorted(tables)
    owners: dict[str, str] = {}
    for what in ("tables", "hash_filters"):
        for name, decl in manifest[what].items():
            for f in decl.get("files", []):
                assert f not in owners, f"{f} belongs to {owners[f]!r} and {name!r}"
                owners[f] = name
                assert (assets / f).is_file() and (assets / f).parent == assets
    files_in(h.root)

    fill(h, tables, -1.0)  # every entry changed
    restore = pb.AdminRestoreRequest(model_dir="ck")
    code, details, _ = h.send("Admin.RestoreCheckpoint", restore)
    assert code == Code.OK, details
    assert shard_fingerprint(h.server.shard) == saved, "a table restored other entries"

    # An empty shard rebuilds every table and filter from the manifest.
    h.server.shard.tables.clear()
    h.server.shard.filters.clear()
    code, details, _ = h.send("Admin.RestoreCheckpoint", restore)
    assert code == Code.OK, details
    rebuilt = shard_fingerprint(h.server.shard)
    used = {s.hash_filter for s in h.server.shard.tables.values() if s.hash_filter}
    want = copy.deepcopy(saved)
    want["filters"] = {n: f for n, f in saved["filters"].items() if n in used}
    assert rebuilt == want, "the rebuilt shard differs from the one saved"
    assert_served(h, tables)


def table_files_round_trip(h: Names, tables: list[str]) -> None:
    """``SaveTable``/``RestoreTable`` at ``pt/<name>``: a name leading out of the data
    root is PERMISSION_DENIED; the others each restore their own entries."""
    saved = shard_fingerprint(h.server.shard)
    saved_ok: list[str] = []
    owners: dict[str, str] = {}
    paths: set[str] = set()
    for name in tables:
        basename = f"pt/{name}"
        full = os.path.realpath(os.path.join(h.root, basename))
        if full in paths:
            continue  # 'a/b' and 'a//b': one path, the user's choice
        paths.add(full)
        inside = os.path.commonpath([str(h.root), full]) == str(h.root) and full != str(h.root)
        code, details, raw = h.send("SaveTable", pb.SaveRequest(table=name, basename=basename))
        if not inside:
            assert code == Code.PERMISSION_DENIED, f"{basename!r}: {code.name}: {details}"
            continue
        if len(os.path.basename(full).encode()) + len("_0-00000-of-00001-tmp-") + 16 > 255:
            assert code == Code.INVALID_ARGUMENT, f"{basename!r}: {code.name}: {details}"
            continue
        if code == Code.FAILED_PRECONDITION:
            # A directory of the path is another table's file ('x' then 'x/y').
            assert any(p.is_file() for p in Path(full).parents), details
            continue
        assert code == Code.OK, f"{basename!r}: {code.name}: {details}"
        assert raw is not None
        for f in pb.SaveResponse.FromString(raw).files:
            assert f not in owners, f"SaveTable wrote {f} for {owners[f]!r} and {name!r}"
            owners[f] = name
            assert os.path.commonpath([str(h.root), os.path.realpath(f)]) == str(h.root)
        saved_ok.append(name)
    files_in(h.root)
    fill(h, tables, -2.0)
    for name in saved_ok:
        code, details, _ = h.send("RestoreTable", pb.RestoreRequest(
            table=name, basename=f"pt/{name}"))
        assert code == Code.OK, f"{name!r}: {code.name}: {details}"
        got = shard_fingerprint(h.server.shard)["tables"][name]
        assert got == saved["tables"][name], f"table {name!r} restored other entries"
    assert_served(h, tables)


@settings(FUZZ, max_examples=examples(60))
@given(filters=hostile_names(max_size=3), tables=hostile_names(max_size=5))
def test_hostile_names_round_trip(names_shard: Names, filters: list[str],
                                  tables: list[str]) -> None:
    h = names_shard
    h.reset()
    made_filters, made = create_all(h, filters, tables)
    fill(h, made, 1.0)
    if made:
        checkpoint_round_trip(h, made_filters, made)
        table_files_round_trip(h, made)
    assert list(h.outside.iterdir()) == []
