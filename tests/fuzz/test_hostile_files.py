"""Hostile files under the data root: symbolic links and damaged manifests (issue 12,
items 2 and 3).

**Symbolic links.** Hypothesis plants links at random places inside ``--data_root``
(the model directory, an assets directory, a part file, the ``checkpoint`` index, a
part list, the manifest, a table-file directory or part) pointing outside the root
(at a directory holding a secret file and a valid checkpoint of other values) or
inside it, then runs checkpoint saves, commits and restores and table-file saves and
restores. Every call either succeeds or fails with a precise status; a
PERMISSION_DENIED names a planted link's path; nothing outside the root is created,
written or deleted (it stays byte for byte as it was), no message quotes the secret,
a successful restore restores what was saved inside the root (never the outside
checkpoint's values), a failed one changes nothing, and the shard keeps serving.

**Manifests.** A valid committed checkpoint whose ``manifest.json`` (JSON fields
deleted, retyped, renamed, huge numbers, ``..`` and absolute paths; its checksum
recomputed or not; a listed file redirected through a symlink to an identical copy
outside the root; or bytes truncated, flipped, appended, random), ``checkpoint``
index, part list (before the commit) or a part file is damaged. Restore (over live
tables, into an empty shard, or validate-only) either succeeds with exactly the
checkpoint's entries, or fails with DATA_LOSS, FAILED_PRECONDITION, NOT_FOUND,
INVALID_ARGUMENT or PERMISSION_DENIED naming the file, never INTERNAL/UNKNOWN, and
leaves the shard exactly as it was.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from tests.faults.support import shard_fingerprint
from tests.fuzz.oracle import (
    DEFAULT_CAPACITY,
    DEFAULT_SPLIT,
    FUZZ,
    MAX_MESSAGE,
    STATS,
    T0,
    baseline,
    call,
    examples,
    scratch_dir,
    tensor,
)
from tests.fuzz.strategies import (
    HOSTILE_INDEXES,
    byte_mutations,
    json_mutations,
    symlink_plans,
)
from tests.integration.conftest import RunningServer, start_inprocess_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Code = grpc.StatusCode
SECRET = "s3cr3t-0f-the-0utside-7c1d"
#: What a damaged or hostile file may get (besides OK).
PRECISE = frozenset({Code.DATA_LOSS, Code.FAILED_PRECONDITION, Code.NOT_FOUND,
                     Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED})
CK = "ck"
ASSETS = "ck/model.ckpt-1.assets"


def snapshot(directory: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry below ``directory`` (links not followed): kind and content."""
    found: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path).encode())
            elif os.path.isdir(path):
                found[rel] = ("dir", b"")
            else:
                found[rel] = ("file", Path(path).read_bytes())
    return found


def empty_dir(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class Files:
    """The live shard (0 of 1), its data root, and a watched directory outside it
    holding a secret and a valid checkpoint of other values (``outside/ck``)."""

    def __init__(self, server: RunningServer, root: Path, outside: Path, test: str) -> None:
        self.server = server
        self.root = root
        self.outside = outside
        self.test = test
        self.reset()
        # The outside checkpoint: the baseline with other values, saved inside, moved out.
        self.change_values()
        save = pb.AdminSaveRequest(model_dir=CK, global_step=1)
        for method in ("Admin.SaveCheckpoint", "Admin.CommitCheckpoint"):
            assert self.send(method, save)[0] == Code.OK
        shutil.move(str(root / CK), str(outside / "ck"))
        (outside / "secret.txt").write_text(SECRET)
        (outside / "dir").mkdir()
        (outside / "dir" / "secret2.txt").write_text(SECRET)
        self.outside_before = snapshot(outside)
        self.reset()
        self.baseline = shard_fingerprint(server.shard)

    def reset(self) -> None:
        """The shard back to the baseline; the data root emptied."""
        fresh = copy.deepcopy(baseline(False, 0, 1))
        self.server.shard.tables.clear()
        self.server.shard.tables.update(fresh.tables)
        self.server.shard.filters.clear()
        self.server.shard.filters.update(fresh.filters)
        empty_dir(self.root)

    def change_values(self) -> None:
        ids = np.array([-4, -1, 0, 1, 2, 7], dtype=np.int64)
        code, details, _ = self.send("Assign", pb.AssignRequest(
            table="emb", ids=tensor(ids), values=tensor(np.full((6, 3), 9.5, np.float32)),
            req_time=T0 + 5))
        assert code == Code.OK, details

    def send(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, bytes | None]:
        return call(self.server, self.test, method, request)

    def save_and_commit(self, step: int = 1) -> None:
        save = pb.AdminSaveRequest(model_dir=CK, global_step=step)
        for method in ("Admin.SaveCheckpoint", "Admin.CommitCheckpoint"):
            code, details, _ = self.send(method, save)
            assert code == Code.OK, details

    def check_outside(self, details: str = "") -> None:
        assert snapshot(self.outside) == self.outside_before, "the outside directory changed"
        assert SECRET not in details, f"a message quotes an outside file: {details}"

    def still_serving(self) -> None:
        assert self.send("ListTables", pb.ListTablesRequest())[0] == Code.OK


@pytest.fixture(scope="module")
def files_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with scratch_dir(tmp_path_factory, "hostile-files") as base:
        yield base


@contextlib.contextmanager
def live(base: Path, test: str) -> Iterator[Files]:
    root, outside = base / test / "root", base / test / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    with start_inprocess_server(
        shard=copy.deepcopy(baseline(False, 0, 1)), shard_index=0, num_shards=1,
        data_root=str(root), max_message_bytes=MAX_MESSAGE,
        default_filter_capacity=DEFAULT_CAPACITY, default_filter_split_num=DEFAULT_SPLIT,
    ) as server:
        files = Files(server, root, outside, test)
        yield files
        assert (STATS.crashes, STATS.hangs) == (0, 0), STATS.report()
        files.check_outside()
        files.still_serving()


@pytest.fixture(scope="module")
def links(files_base: Path) -> Iterator[Files]:
    with live(files_base, "symlinks") as files:
        yield files


@pytest.fixture(scope="module")
def manifests(files_base: Path) -> Iterator[Files]:
    with live(files_base, "manifests") as files:
        yield files


# ---------------------------------------------------------------- symbolic links


def plant(h: Files, place: str, target: str) -> list[str]:
    """A link at ``place`` (replacing what is there) to ``target``; the link's full
    path, and where it really is when an earlier link leads its directory elsewhere in
    the root (a shard may name either); none when its directory already leads out of
    the root (not planted)."""
    link = h.root / place
    real_parent = os.path.realpath(link.parent)
    if os.path.commonpath([str(h.root), real_parent]) != str(h.root):
        return []
    where = h.outside if target.startswith("@out/") else h.root
    dest = where / target.split("/", 1)[1]
    if target == "@in/other/file":
        (h.root / "other").mkdir(exist_ok=True)
        dest.write_bytes(b"inside")
    elif target == "@in/other":
        dest.mkdir(exist_ok=True)
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(dest)
    except OSError:
        return []  # an earlier link made the place a file, or a loop
    return sorted({str(link), os.path.join(real_parent, link.name)})


def run_op(h: Files, op: tuple[Any, ...]) -> tuple[str, grpc.StatusCode, str]:
    kind = op[0]
    if kind == "save":
        method, req = "Admin.SaveCheckpoint", pb.AdminSaveRequest(model_dir=CK, global_step=op[1])
    elif kind == "commit":
        method, req = "Admin.CommitCheckpoint", pb.AdminSaveRequest(
            model_dir=CK, global_step=op[1], max_to_keep=op[2])
    elif kind == "restore":
        method, req = "Admin.RestoreCheckpoint", pb.AdminRestoreRequest(
            model_dir=CK, prefix=op[1], validate_only=op[2])
    elif kind == "save_table":
        method, req = "SaveTable", pb.SaveRequest(table="emb", basename="pt/emb")
    else:
        method, req = "RestoreTable", pb.RestoreRequest(table="emb", basename="pt/emb")
    code, details, _ = h.send(method, req)
    return method, code, details


@settings(FUZZ, max_examples=examples(90))
@given(plan=symlink_plans())
def test_symlinks_never_lead_out_of_the_data_root(
    links: Files, plan: tuple[bool, list[tuple[str, str]], list[tuple[Any, ...]]]
) -> None:
    h = links
    h.reset()
    prepared, placements, ops = plan
    if prepared:
        h.save_and_commit(1)
        assert h.send("SaveTable", pb.SaveRequest(table="emb", basename="pt/emb"))[0] == Code.OK
    planted = [p for place, target in placements for p in plant(h, place, target)]
    h.change_values()
    changed = shard_fingerprint(h.server.shard)
    for op in ops:
        before = shard_fingerprint(h.server.shard)
        method, code, details = run_op(h, op)
        where = f"{method} {op} with links {placements}"
        h.check_outside(details)
        assert code == Code.OK or code in PRECISE, f"{where}: {code.name}: {details}"
        after = shard_fingerprint(h.server.shard)
        if code != Code.OK:
            assert details, where
            assert after == before, f"{where}: failed ({code.name}) but changed the shard"
        if code == Code.PERMISSION_DENIED:
            assert any(p in details or os.path.relpath(p, h.root) in details
                       for p in planted), f"{where}: names no planted link: {details}"
        if code == Code.OK and method in ("Admin.RestoreCheckpoint", "RestoreTable"):
            # Everything saved inside the root holds the baseline or the changed values;
            # the outside checkpoint's emb holds 9.5 everywhere with another clock.
            # (a restore never lowers a table's clock: entries only)
            def entries(fp: Any) -> Any:
                size, _clock, digest = fp["tables"]["emb"][-1]
                return size, digest
            assert entries(after) in (entries(h.baseline), entries(changed),
                                      entries(before)), (
                f"{where}: restored values from outside the root")
    h.still_serving()


# ---------------------------------------------------------------- manifests


def crc_of_manifest(manifest: dict[str, Any]) -> int:
    """docs/semantics.md §13.6: CRC-32C of the canonical JSON without the checksum."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32c"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return int(google_crc32c.value(canonical.encode("ascii")))


def redirect(h: Files, manifest: dict[str, Any]) -> dict[str, Any]:
    """emb's listed part renamed to a link to an identical copy outside the root (same
    size, records and CRC), the checksum recomputed: only confinement refuses it."""
    original = manifest["tables"]["emb"]["files"][0]
    evil = "evil_0-00000-of-00001"
    copy_out = h.outside / "ck" / "model.ckpt-1.assets" / original
    (h.root / ASSETS / evil).symlink_to(copy_out)
    manifest["files"][evil] = dict(manifest["files"][original])
    outside_bytes = copy_out.read_bytes()
    manifest["files"][evil].update(size=len(outside_bytes),
                                   crc32c=int(google_crc32c.value(outside_bytes)))
    manifest["tables"]["emb"]["files"] = [evil]
    manifest["manifest_crc32c"] = crc_of_manifest(manifest)
    return manifest


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, str]:
    """``(what, how)``: the file damaged and the kind of damage."""
    what = draw(st.sampled_from(["manifest"] * 4 + ["index"] * 2 + ["parts"] * 2
                                + ["emb part", "filter part"]))
    if what in ("manifest", "parts"):
        how = draw(st.sampled_from(["json", "json", "json+crc", "json+crc", "bytes"]
                                   + (["redirect"] if what == "manifest" else [])))
    elif what == "index":
        how = draw(st.sampled_from(["text", "bytes"]))
    else:
        how = "bytes"
    return what, how


def damage_file(h: Files, data: st.DataObject, what: str, how: str) -> Path:
    """Damage the file and return its path."""
    path = {
        "manifest": h.root / ASSETS / "manifest.json",
        "index": h.root / CK / "checkpoint",
        "parts": h.root / CK / "model.ckpt-1.parts-0.json",
        "emb part": h.root / ASSETS / "emb_0-00000-of-00001",
        "filter part": h.root / ASSETS / "hash_filter_0-00000-of-00005",
    }[what]
    raw = path.read_bytes()
    if how == "bytes":
        path.write_bytes(data.draw(byte_mutations(raw), label="bytes"))
    elif how == "text":
        text = data.draw(st.sampled_from(HOSTILE_INDEXES), label="index")
        path.write_bytes(text.replace("{out}", str(h.outside)).encode("utf-8", "surrogateescape")
                         if text != "\xff\xfe" else b"\xff\xfe")
    elif how == "redirect":
        path.write_text(json.dumps(redirect(h, json.loads(raw))))
    else:
        tree = data.draw(json_mutations(json.loads(raw)), label="json")
        if how == "json+crc" and isinstance(tree, dict) and what == "manifest":
            tree["manifest_crc32c"] = crc_of_manifest(tree)
        path.write_text(json.dumps(tree))
    return path


def settled(fp: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without the random generators' states (a probabilistic filter a
    restore creates draws its generator from OS entropy)."""
    out = copy.deepcopy(fp)
    out["filters"] = {
        name: (options, tuple(x for x in state if not (isinstance(x, tuple) and len(x) == 2
                                                        and x[0] == "_rng")))
        for name, (options, state) in fp["filters"].items()}
    return out


@pytest.fixture(scope="module")
def restored(manifests: Files) -> dict[str, Any]:
    """The shard after restoring the undamaged checkpoint: over the changed tables,
    and into an empty shard."""
    h = manifests
    h.reset()
    h.save_and_commit(1)
    h.change_values()
    changed = shard_fingerprint(h.server.shard)
    request = pb.AdminRestoreRequest(model_dir=CK)
    assert h.send("Admin.RestoreCheckpoint", request)[0] == Code.OK
    over = shard_fingerprint(h.server.shard)
    h.server.shard.tables.clear()
    h.server.shard.filters.clear()
    assert h.send("Admin.RestoreCheckpoint", request)[0] == Code.OK
    return {"changed": changed, "over": over, "empty": shard_fingerprint(h.server.shard)}


@settings(FUZZ, max_examples=examples(150))
@given(target=damage(), into=st.sampled_from(["over", "over", "empty", "validate"]),
       prefix=st.sampled_from(["", "model.ckpt-1"]), data=st.data())
def test_damaged_manifests_restore_exactly_or_not_at_all(
    manifests: Files, restored: dict[str, Any], target: tuple[str, str], into: str, prefix: str,
    data: st.DataObject,
) -> None:
    h = manifests
    what, how = target
    h.reset()
    save = pb.AdminSaveRequest(model_dir=CK, global_step=1)
    assert h.send("Admin.SaveCheckpoint", save)[0] == Code.OK
    if what == "parts":
        damaged = damage_file(h, data, what, how)
        code, details, _ = h.send("Admin.CommitCheckpoint", save)
        h.check_outside(details)
        if code != Code.OK:
            assert code in PRECISE, f"commit after damaging {damaged}: {code.name}: {details}"
            assert damaged.name in details, f"commit: {details!r} does not name {damaged.name}"
            return
    else:
        assert h.send("Admin.CommitCheckpoint", save)[0] == Code.OK
        damaged = damage_file(h, data, what, how)
    h.change_values()
    if into == "empty":
        h.server.shard.tables.clear()
        h.server.shard.filters.clear()
    before = shard_fingerprint(h.server.shard)
    code, details, _ = h.send("Admin.RestoreCheckpoint", pb.AdminRestoreRequest(
        model_dir=CK, prefix=prefix, validate_only=into == "validate"))
    h.check_outside(details)
    after = shard_fingerprint(h.server.shard)
    where = f"restore ({into}, prefix {prefix!r}) after {how} damage to {damaged.name}"
    if code == Code.OK:
        want = settled(before if into == "validate" else restored[into])
        declared = json.loads((h.root / CK / "model.ckpt-1.assets" /
                               "manifest.json").read_text()) if what == "manifest" else {}
        consistent = how == "json+crc" or "manifest_crc32c" not in declared
        if what == "manifest" and consistent and into != "validate":
            # Rewritten consistently (checksum recomputed, or dropped with the file lists:
            # the form of a manifest written before either existed), a manifest can
            # describe a checkpoint of fewer tables or filters, their files dropped too:
            # what it declares must restore exactly, what it omits stays as it was.
            kept = settled(before)
            for section, key in (("tables", "tables"), ("filters", "hash_filters")):
                want[section] = {
                    n: v for n, v in want[section].items() if n in declared[key]
                } | {n: v for n, v in kept[section].items() if n not in declared[key]}
            # A declared table the restore creates is declared as the manifest says (a
            # consistent rewrite may change its save-time settings, e.g. saver_parallel);
            # a table that exists keeps its own settings. Either way its entries are the
            # checkpoint's.
            for n, decl in declared["tables"].items():
                if n in want["tables"] and n not in before["tables"]:
                    want["tables"][n] = (
                        base64.b64decode(decl["config"]), decl["hash_filter"],
                        tuple(decl["extra_restore_names"]), decl["saver_parallel"],
                        want["tables"][n][4])
        assert settled(after) == want, (
            f"{where}: succeeded with other entries than the checkpoint's")
    else:
        assert code in PRECISE, f"{where}: {code.name}: {details}"
        assert after == before, f"{where}: failed ({code.name}) but changed the shard"
        assert str(h.root) in details or damaged.name in details, (
            f"{where}: {code.name}: the message names no file: {details}")
    h.still_serving()
