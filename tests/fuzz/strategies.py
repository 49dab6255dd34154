"""Hypothesis strategies of the hostile-input fuzz suite: requests of every RPC,
mostly well formed with one thing wrong, as protobuf messages; and mangled bytes."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st

from protos import ps_service_pb2 as pb
from ps_server.engine import configs
from tests.faults.support import thresholds
from tests.fuzz.oracle import (
    DAY,
    FILTERS,
    I64_MAX,
    I64_MIN,
    LIMIT_IDS,
    METHODS,
    T0,
    TABLES,
    narrow_wire,
    tensor,
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices`` with the given weights (``st.one_of`` picks its branches far
    from uniformly, and a name drawn alone is soon exhausted)."""
    pool = [k for k, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda k: choices[k][1])


ids_elements = st.one_of(st.integers(-6, 8), st.sampled_from(LIMIT_IDS),
                         st.integers(I64_MIN, I64_MAX))
special_floats = st.sampled_from(
    [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45])
float_elements = st.one_of(
    st.floats(-4, 4, width=32),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-45]),
    st.floats(width=32),
)
_known_tables = st.sampled_from(TABLES[:4])
table_names = weighted((16, _known_tables),
                       (2, st.sampled_from(["new_t", "", "t" * 3000, "emb\0", "EMB"])),
                       (1, st.text(max_size=6)))
_known_filters = st.sampled_from(FILTERS[:2])
filter_names = weighted((12, _known_filters), (2, st.sampled_from(["new_f", "", "flt "])),
                        (1, st.text(max_size=6)))
req_times = weighted((2, st.just(0)), (8, st.integers(T0 - DAY, T0 + 3 * DAY)),
                     (1, st.sampled_from([-1, I64_MIN, I64_MAX, 2**32 + 5])))
MUTATIONS = ["none"] * 24 + ["flat", "flat", "truncate", "extend", "count", "negative", "huge",
                             "extra_dim", "no_shape", "unset", "empty"]


@st.composite
def id_arrays(draw: st.DrawFn, big_one_in: int = 0) -> np.ndarray:
    """A few ids; with ``big_one_in``, once in that many a batch of 6,000 to 8,000 (a
    request under the shard's 64 KiB limit whose answer may be over it)."""
    # (weighted: st.integers would draw 0 far more often than one in big_one_in)
    if big_one_in and draw(weighted((big_one_in - 1, st.just(False)), (1, st.just(True)))):
        seed = draw(st.integers(0, 2**32 - 1))
        n = draw(st.integers(6_000, 8_000))
        return np.random.default_rng(seed).integers(-50, 50, size=n).astype(np.int64)
    return np.array(draw(st.lists(ids_elements, max_size=10)), dtype=np.int64)


@st.composite
def float_arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """Random normal floats of a drawn scale with a few special values put in (NaN,
    infinities, -0, the largest and smallest floats); a few draws, however large."""
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, dtype=np.float32)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3, 0.0]))
    arr = (rng.normal(size=count) * scale).astype(np.float32)
    for at, value in draw(st.lists(st.tuples(st.integers(0, count - 1), special_floats),
                                   max_size=3)):
        arr[at] = value
    return arr.reshape(shape)


@st.composite
def wire(draw: st.DrawFn, arr: np.ndarray) -> pb.Tensor | None:
    """``arr`` as a Tensor, sometimes broken (None: the field left unset)."""
    t = tensor(arr)
    data, shape = t.data, list(t.shape)
    how = draw(st.sampled_from(MUTATIONS))
    if how == "flat":
        shape = [arr.size]
    elif how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=9))
    elif how == "count" and shape:
        shape[0] += draw(st.sampled_from([-2, -1, 1, 3]))
    elif how == "negative" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([-1, I64_MIN]))
    elif how == "huge" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(
            [2**31, 2**62, I64_MAX]))
    elif how == "extra_dim":
        shape = [*shape, draw(st.sampled_from([0, 1, 2]))]
    elif how == "no_shape":
        shape = []
    elif how == "unset":
        return None
    elif how == "empty":
        data, shape = b"", []
    return pb.Tensor(data=data, shape=shape)


def set_tensor(msg: Message, name: str, t: pb.Tensor | None) -> None:
    if t is not None:
        getattr(msg, name).CopyFrom(t)


def dim_of(name: str) -> int:
    return {"emb": 3, "two": 3, "exp": 2, "sv": 2}.get(name, 2)


@st.composite
def rows_for(draw: st.DrawFn, n: int, table: str) -> np.ndarray:
    dim = dim_of(table)
    if draw(st.integers(0, 9)) == 0:
        dim = draw(st.sampled_from([0, 1, 4, 7]))
    return draw(float_arrays((n, dim)))


def tag() -> st.SearchStrategy[pb.RequestTag]:
    return st.builds(pb.RequestTag, client_id=st.text(max_size=6),
                     seq=st.integers(0, 2**64 - 1))


#: A ``FloatWire`` for values or gradients: mostly float32 (unset), sometimes float16,
#: bfloat16 or a number the enum does not have.
float_wires = st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3])


def send_grads_as(m: Message, wire_number: int) -> None:
    """Set ``m.grads_wire`` and re-encode its float32 ``grads`` (when their byte count
    allows it) in that wire, so the half formats travel well-formed too."""
    m.grads_wire = wire_number
    if wire_number in (1, 2) and m.HasField("grads") and len(m.grads.data) % 4 == 0:
        m.grads.data = narrow_wire(np.frombuffer(m.grads.data, dtype="<f4"), wire_number)


@st.composite
def lookup_calls(draw: st.DrawFn) -> tuple[str, Message]:
    method = draw(st.sampled_from(["Lookup", "LookupEntry"]))
    m = METHODS[method][1](table=draw(table_names))
    set_tensor(m, "ids", draw(wire(draw(id_arrays(big_one_in=40)))))
    if method == "Lookup":
        m.values_wire = draw(float_wires)
    return method, m


@st.composite
def assign_calls(draw: st.DrawFn) -> tuple[str, Message]:
    name = draw(table_names)
    ids = draw(id_arrays())
    m = pb.AssignRequest(table=name, req_time=draw(req_times), tag=draw(tag()))
    set_tensor(m, "ids", draw(wire(ids)))
    set_tensor(m, "values", draw(wire(draw(rows_for(ids.size, name)))))
    return draw(st.sampled_from(["Assign", "AssignAdd"])), m


def rates(segments: int) -> st.SearchStrategy[list[float]]:
    """Learning rates: mostly one per segment."""
    return weighted((6, st.lists(float_elements, min_size=segments, max_size=segments)),
                    (1, st.lists(float_elements, max_size=4)))


@st.composite
def apply_calls(draw: st.DrawFn) -> tuple[str, Message]:
    name = draw(table_names)
    ids = draw(id_arrays())
    lrs = draw(rates(2 if name == "two" else 1))
    m = pb.ApplyGradientsRequest(
        table=name, learning_rates=lrs, global_step=draw(st.integers(I64_MIN, I64_MAX)),
        enable_dedup=draw(st.booleans()), req_time=draw(req_times), tag=draw(tag()))
    set_tensor(m, "ids", draw(wire(ids)))
    set_tensor(m, "grads", draw(wire(draw(rows_for(ids.size, name)))))
    send_grads_as(m, draw(float_wires))
    return "ApplyGradients", m


@st.composite
def fused_parts(draw: st.DrawFn, big_one_in: int = 0
                ) -> tuple[list[str], list[pb.FusedBlock], np.ndarray, np.ndarray]:
    tables = draw(st.lists(table_names, max_size=3))
    ids = draw(id_arrays(big_one_in))
    cuts = sorted(draw(st.lists(st.integers(0, ids.size), max_size=3)))
    sizes = np.diff([0, *cuts, ids.size]).tolist()
    blocks = [pb.FusedBlock(table_index=draw(st.integers(0, max(0, len(tables) - 1))),
                            num_ids=n) for n in sizes]
    if draw(st.integers(0, 5)) == 0 and blocks:  # a block that breaks the layout
        b = blocks[draw(st.integers(0, len(blocks) - 1))]
        b.num_ids = draw(st.sampled_from([-1, b.num_ids + 1, 2**62]))
        b.table_index = draw(st.sampled_from([b.table_index, -1, len(tables), 2**31 - 1]))
    dims = [dim_of(tables[b.table_index]) if 0 <= b.table_index < len(tables) else 1
            for b in blocks]
    grads = draw(float_arrays((sum(b.num_ids * d for b, d in zip(blocks, dims, strict=True)
                                   if b.num_ids >= 0 and b.num_ids < 10_000),)))
    return tables, blocks, ids, grads


@st.composite
def fused_calls(draw: st.DrawFn) -> tuple[str, Message]:
    lookup = draw(st.booleans())
    tables, blocks, ids, grads = draw(fused_parts(big_one_in=40 if lookup else 0))
    if lookup:
        m = pb.FusedLookupRequest(tables=tables, blocks=blocks, values_wire=draw(float_wires))
        set_tensor(m, "ids", draw(wire(ids)))
        return "FusedLookup", m
    lrs = draw(rates(sum(2 if t == "two" else 1 for t in tables)))
    m = pb.FusedOptimizeRequest(
        tables=tables, blocks=blocks, learning_rates=lrs,
        global_step=draw(st.integers(-5, 5)), enable_grad_accumulation=draw(st.booleans()),
        req_time=draw(req_times), tag=draw(tag()))
    set_tensor(m, "ids", draw(wire(ids)))
    set_tensor(m, "grads", draw(wire(grads)))
    send_grads_as(m, draw(float_wires))
    return "FusedOptimize", m


@st.composite
def intercept_calls(draw: st.DrawFn) -> tuple[str, Message]:
    ids = draw(id_arrays())
    m = pb.InterceptGradientRequest(hash_filter=draw(filter_names), tag=draw(tag()))
    set_tensor(m, "ids", draw(wire(ids)))
    set_tensor(m, "grads", draw(wire(draw(float_arrays((ids.size, draw(st.integers(0, 3))))))))
    return "InterceptGradient", m


@st.composite
def small_calls(draw: st.DrawFn) -> tuple[str, Message]:
    which = draw(st.sampled_from(["Size", "SaveAsTensor", "GetShardInfo", "ListTables"]))
    if which == "Size":
        return which, pb.SizeRequest(table=draw(table_names))
    if which == "SaveAsTensor":
        odd32 = st.sampled_from([-1, -(2**31), 2**31 - 1])
        odd64 = st.sampled_from([-1, I64_MIN, I64_MAX, 2**40])
        return which, pb.SaveAsTensorRequest(
            table=draw(table_names),
            shard_idx=draw(weighted((6, st.integers(0, 3)), (1, odd32))),
            num_shards=draw(weighted((6, st.integers(1, 4)), (1, odd32), (1, st.just(0)))),
            limit=draw(weighted((6, st.integers(0, 20)), (1, odd64))),
            offset=draw(weighted((6, st.integers(0, 20)), (1, odd64))))
    return which, METHODS[which][1]()


def table_configs() -> st.SearchStrategy[bytes]:
    good = [
        configs.table_config(1),
        configs.table_config(4, optimizer=configs.adagrad()),
        configs.table_config(2, serving=True),
        configs.table_config(3, expire_days=2),
    ]
    bad_dim = configs.table_config(2)
    bad_dim.entry_config.segments[0].dim_size = -3
    no_opt = configs.table_config(2)
    no_opt.entry_config.segments[0].ClearField("opt_config")
    wide = configs.table_config(2)
    wide.initial_capacity = 2**62  # capped by the table
    return weighted(
        (6, st.sampled_from([c.SerializeToString() for c in [*good, wide]])),
        (1, st.sampled_from([bad_dim.SerializeToString(), no_opt.SerializeToString(), b""])),
        (1, st.binary(max_size=24)),
    )


@st.composite
def create_calls(draw: st.DrawFn) -> tuple[str, Message]:
    if draw(st.booleans()):
        return "CreateTable", pb.CreateTableRequest(
            name=draw(weighted((4, st.sampled_from(["new_t", "emb"])), (1, st.text(max_size=5)),
                               (1, st.sampled_from(["", "new\0t", "n" * 200, "n" * 201])))),
            config=draw(table_configs()),
            hash_filter=draw(st.sampled_from(["", "", "flt", "prob", "nope"])),
            extra_restore_names=draw(st.lists(st.text(max_size=4), max_size=2)),
            saver_parallel=draw(weighted(
                (6, st.integers(-2, 3)), (1, st.sampled_from([2**31 - 1, -(2**31), 5000])))),
            allow_existing=draw(st.booleans()))
    return "CreateHashFilter", pb.CreateHashFilterRequest(
        name=draw(st.sampled_from(["new_f", "flt", ""]) | st.text(max_size=5)),
        enable_hash_filter=draw(st.booleans()),
        occurrence_threshold_config=draw(st.sampled_from([b"", thresholds(2)])
                                         | st.binary(max_size=12)),
        capacity=draw(st.one_of(st.integers(0, 5000),
                                st.integers(2**41, 2**64 - 1))),
        split_num=draw(st.one_of(st.integers(0, 9), st.sampled_from([2000, 2**31, 2**32 - 1]))),
        equal_probability=draw(st.booleans()),
        filter_type=draw(st.sampled_from(["", "sliding_hash_filter", "probabilistic_filter",
                                          "no_filter", "bloom", "SLIDING_HASH_FILTER"])))


@st.composite
def oversized_calls(draw: st.DrawFn) -> tuple[str, Message]:
    """An update over the shard's 64 KiB message limit (gRPC refuses it before the
    service sees it; it takes gRPC about 0.2 s, so these are rare)."""
    n = draw(st.integers(6_000, 8_000))
    ids = np.arange(n, dtype=np.int64)
    m = pb.AssignRequest(table=draw(table_names), ids=tensor(ids),
                         values=tensor(np.ones((n, 3), np.float32)))
    return draw(st.sampled_from(["Assign", "AssignAdd"])), m


# Weights in thousandths of the calls.
DATA_CALLS = weighted((180, lookup_calls()), (180, assign_calls()), (180, apply_calls()),
                      (180, fused_calls()), (120, intercept_calls()), (100, small_calls()),
                      (59, create_calls()), (1, oversized_calls()))

GOOD_PATHS = ("ck/a", "ck/b", "ck", "d/e/f", "emb", "ck/./a", "ck/../ck/b", "x.y")
#: The few paths save/restore cycles use, so a restore finds what a save wrote.
CYCLE_PATHS = ("ck/a", "ck/b", "ck/./a")
HOSTILE_PATHS = (
    "../../etc", "../../etc/passwd", "/etc/passwd", "/etc", "..", "../", "link/x", "link",
    "ck/../../..", "./../x", ".", "", "a\0b", "ck/\0", "x" * 300, "d/" + "y" * 300,
    "z/" * 2100 + "t", "plain_file/x", "plain_file", "~/x", "%2e%2e/etc", "..\\..\\etc",
    "ck/" + "é" * 10, "/", "//", "link/../../x",
)
paths = weighted((3, st.sampled_from(GOOD_PATHS)), (3, st.sampled_from(HOSTILE_PATHS)),
                 (1, st.text(max_size=10)))


def prefixes(model_dir: str) -> st.SearchStrategy[str]:
    """RestoreCheckpoint prefixes: the latest (""), a step of ``model_dir`` (bare, taken
    in model_dir, or under it), or a hostile path."""
    steps = [f"model.ckpt-{s}" for s in range(3)]
    return weighted((3, st.just("")), (2, st.sampled_from(steps)),
                    (1, st.sampled_from([f"{model_dir}/{s}" for s in steps])),
                    (2, st.sampled_from(HOSTILE_PATHS)))


@st.composite
def file_calls(draw: st.DrawFn) -> tuple[str, Message]:
    method = draw(st.sampled_from([
        "SaveTable", "SaveTable", "RestoreTable", "RestoreTable", "SaveHashFilter",
        "RestoreHashFilter", "Admin.SaveCheckpoint", "Admin.SaveCheckpoint",
        "Admin.CommitCheckpoint", "Admin.CommitCheckpoint", "Admin.RestoreCheckpoint",
        "Admin.RestoreCheckpoint", "Admin.Evict", "Admin.Stats", "Admin.Drain"]))
    step = draw(st.one_of(st.integers(0, 3), st.sampled_from([-1, I64_MAX])))
    if method in ("SaveTable", "RestoreTable"):
        return method, METHODS[method][1](table=draw(table_names), basename=draw(paths),
                                          **({"validate_only": draw(st.booleans())}
                                             if method == "RestoreTable" else {}))
    if method in ("SaveHashFilter", "RestoreHashFilter"):
        return method, pb.HashFilterFilesRequest(
            hash_filter=draw(filter_names), basename=draw(paths),
            validate_only=draw(st.booleans()))
    if method in ("Admin.SaveCheckpoint", "Admin.CommitCheckpoint"):
        return method, pb.AdminSaveRequest(model_dir=draw(paths), global_step=step,
                                           max_to_keep=draw(st.sampled_from([0, 1, 2, -1])))
    if method == "Admin.RestoreCheckpoint":
        model_dir = draw(paths)
        return method, pb.AdminRestoreRequest(
            model_dir=model_dir,
            prefix=draw(prefixes(model_dir)),
            validate_only=draw(st.booleans()),
            missing_ok=draw(st.booleans()))
    if method == "Admin.Evict":
        return method, pb.EvictRequest(table=draw(st.sampled_from(["", ""]) | table_names))
    if method == "Admin.Drain":
        return method, pb.DrainRequest(grace_seconds=draw(st.sampled_from(
            [-1.0, -1e-9, float("nan"), -float("inf")])))
    return method, pb.StatsRequest()


writes = st.one_of(assign_calls(), apply_calls(), intercept_calls())
cycle_paths = weighted((6, st.sampled_from(CYCLE_PATHS)), (1, paths))


@st.composite
def table_cycles(draw: st.DrawFn) -> list[tuple[str, Message]]:
    """Save a table, change things, restore it (or another table) from those files."""
    path = draw(cycle_paths)
    calls: list[tuple[str, Message]] = [
        ("SaveTable", pb.SaveRequest(table=draw(_known_tables), basename=path))]
    calls += draw(st.lists(writes, max_size=3))
    calls.append(("RestoreTable", pb.RestoreRequest(table=draw(_known_tables), basename=path,
                                               validate_only=draw(st.booleans()))))
    return calls


@st.composite
def filter_cycles(draw: st.DrawFn) -> list[tuple[str, Message]]:
    path = draw(cycle_paths)
    calls: list[tuple[str, Message]] = [("SaveHashFilter", pb.HashFilterFilesRequest(
        hash_filter=draw(_known_filters), basename=path))]
    calls += draw(st.lists(writes, max_size=3))
    calls.append(("RestoreHashFilter", pb.HashFilterFilesRequest(
        hash_filter=draw(filter_names), basename=path, validate_only=draw(st.booleans()))))
    return calls


@st.composite
def checkpoint_cycles(draw: st.DrawFn) -> list[tuple[str, Message]]:
    """Save and commit a whole checkpoint, change things, restore it."""
    model_dir = draw(weighted((6, st.sampled_from(["ck", "m", "."])), (1, paths)))
    step = draw(st.integers(0, 3))
    keep = draw(st.sampled_from([0, 0, 1, 2]))
    save = pb.AdminSaveRequest(model_dir=model_dir, global_step=step, max_to_keep=keep)
    calls: list[tuple[str, Message]] = [("Admin.SaveCheckpoint", save),
                                        ("Admin.CommitCheckpoint", save)]
    if draw(st.integers(0, 3)) == 0:
        calls.append(draw(create_calls()))
    calls += draw(st.lists(writes, max_size=3))
    prefix = draw(weighted((2, st.just("")), (2, st.just(f"model.ckpt-{step}")),
                           (1, st.just(f"{model_dir}/model.ckpt-{step}")),
                           (1, st.just("model.ckpt-9"))))
    validate = draw(st.booleans())
    calls.append(("Admin.RestoreCheckpoint", pb.AdminRestoreRequest(
        model_dir=model_dir, prefix=prefix, validate_only=validate,
        missing_ok=draw(st.booleans()))))
    return calls


FILE_CALLS = weighted(
    (4, file_calls().map(lambda c: [c])), (2, writes.map(lambda c: [c])),
    (2, table_cycles()), (1, filter_cycles()), (3, checkpoint_cycles()),
)


def encoded(calls: st.SearchStrategy[tuple[str, Message]]
            ) -> st.SearchStrategy[tuple[str, bytes]]:
    return calls.map(lambda c: (c[0], c[1].SerializeToString()))


def encoded_runs(runs: st.SearchStrategy[list[tuple[str, Message]]], min_runs: int,
                 max_runs: int) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """Lists of runs of calls, flattened and serialized."""
    return st.lists(runs, min_size=min_runs, max_size=max_runs).map(
        lambda rs: [(m, msg.SerializeToString()) for run in rs for (m, msg) in run])


@st.composite
def mangled(draw: st.DrawFn) -> tuple[str, bytes]:
    """Garbage, or a real request's bytes cut, flipped, spliced or sent to another RPC."""
    target = draw(st.sampled_from(sorted(METHODS)))
    how = draw(st.sampled_from(["garbage", "cut", "flip", "splice", "other_rpc"]))
    if how == "garbage":
        return target, draw(st.binary(max_size=48))
    method, msg = draw(st.one_of(lookup_calls(), assign_calls(), apply_calls(),
                                 fused_calls(), file_calls()))
    raw = bytearray(msg.SerializeToString())
    if how == "other_rpc" or not raw:
        return target, bytes(raw)
    at = draw(st.integers(0, len(raw) - 1))
    if how == "cut":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= draw(st.integers(1, 255))
    else:
        raw[at:at] = draw(st.binary(min_size=1, max_size=6))
    return method, bytes(raw)


# ---------------------------------------------------------------- names (issue 12)

#: Table and filter names a hostile user tries: path syntax, the characters the
#: file-stem rule maps together (``:`` and ``/`` become ``-``), NUL, the length
#: limit (200 bytes) on either side, reserved filter stems, odd unicode.
NAME_ATOMS = (
    "x", "x_0", "x_1", "x_0_0", "a:b", "a/b", "a-b", "a//b", "..", ".", "/", "//", ":", "-",
    "../x", "../../etc/passwd", "/etc/passwd", "x/../y", "x\\y", "x\n", " ", "é", "表",
    "\u202eevil", "a\0b", "", "hash_filter", "hash_filter_x", "hash_filter-x",
    "n" * 200, "n" * 201, "é" * 100, "é" * 101, "x-00000-of-00001", "x_0-00000-of-00001",
    "MonolithHashTable_0", "manifest.json", "checkpoint", "model.ckpt-1.assets",
)


def name_variants(name: str) -> list[str]:
    """Names that differ from ``name`` only where the file-stem rule maps characters
    together, or by a ``_<i>`` saving-shard-like suffix."""
    swaps = [name.replace(a, b) for a, b in ((":", "/"), ("/", ":"), ("-", ":"), ("-", "/"),
                                              (":", "-"), ("/", "-"))]
    return [*swaps, name + "_0", name + "_1", name + "_0_0", name + "-00000-of-00001",
            name.upper()]


@st.composite
def hostile_names(draw: st.DrawFn, max_size: int = 5) -> list[str]:
    """A few names, later ones often a variant of an earlier one."""
    names: list[str] = []
    for _ in range(draw(st.integers(1, max_size))):
        if names and draw(st.integers(0, 2)) == 0:
            names.append(draw(st.sampled_from(name_variants(draw(st.sampled_from(names))))))
        else:
            names.append(draw(weighted((5, st.sampled_from(NAME_ATOMS)),
                                       (2, st.text(min_size=1, max_size=8)),
                                       (1, st.text(st.sampled_from("x_0:/-."), min_size=1,
                                                   max_size=6)))))
    return names


# ---------------------------------------------------------------- files (issue 12)

#: Where a symbolic link is planted, relative to the data root (checkpoint ``ck``,
#: steps 1 and 2, table files at ``pt/emb``).
LINK_PLACES = (
    "ck", "ck/model.ckpt-1.assets", "ck/model.ckpt-2.assets",
    "ck/model.ckpt-1.assets/emb_0-00000-of-00001",
    "ck/model.ckpt-1.assets/hash_filter_0-00000-of-00005",
    "ck/model.ckpt-2.assets/two_0-00000-of-00002",
    "ck/checkpoint", "ck/model.ckpt-2.parts-0.json", "ck/model.ckpt-1.assets/manifest.json",
    "ck/model.ckpt-2.assets/manifest.json", "pt", "pt/emb_0-00000-of-00001",
)
#: Where it points: outside the root (``@out/...``: a secret file, a directory, a
#: valid checkpoint of other values, a missing path) or inside it (``@in/...``).
LINK_TARGETS = (
    "@out/secret.txt", "@out/dir", "@out/ck", "@out/ck/model.ckpt-1.assets",
    "@out/ck/model.ckpt-1.assets/emb_0-00000-of-00001", "@out/ck/checkpoint",
    "@out/ck/model.ckpt-1.assets/manifest.json", "@out/missing", "@in/other", "@in/other/file",
    "@in/ck/model.ckpt-1.assets", "@in/ck/model.ckpt-1.assets/emb_0-00000-of-00001",
)


@st.composite
def symlink_plans(draw: st.DrawFn) -> tuple[bool, list[tuple[str, str]], list[tuple[Any, ...]]]:
    """``(save first, links, operations)``: whether a good checkpoint (step 1) and
    table files exist before the links are planted, the links, then checkpoint and
    table-file operations (``("save", step)``, ``("commit", step, keep)``,
    ``("restore", prefix, validate)``, ``("save_table",)``, ``("restore_table",)``)."""
    links = draw(st.lists(st.tuples(st.sampled_from(LINK_PLACES), st.sampled_from(LINK_TARGETS)),
                          min_size=1, max_size=3, unique_by=lambda t: t[0]))
    op = st.one_of(
        st.tuples(st.just("save"), st.sampled_from([1, 2])),
        st.tuples(st.just("commit"), st.sampled_from([1, 2]), st.sampled_from([0, 1])),
        st.tuples(st.just("restore"), st.sampled_from(["", "model.ckpt-1", "model.ckpt-2"]),
                  st.booleans()),
        st.tuples(st.just("save_table")), st.tuples(st.just("restore_table")))
    return draw(st.booleans()), links, draw(st.lists(op, min_size=1, max_size=4))


#: JSON values a hostile operator writes into a manifest or part list.
HOSTILE_JSON = (
    None, True, False, -1, 0, 1, 2**31, 2**63, 2**64 + 7, 10**40, -(2**63) - 1, 1e308, 3.5,
    "", "x", "..", "../x", "/etc/passwd", "../../outside/secret.txt", "emb_0-00000-of-00001",
    "two_0-00000-of-00002", "AAAA", "!!not base64!!", [], {}, [1], ["../x"], {"a": 1},
    {"size": 1, "records": 1, "crc32c": 1},
)


def json_paths(tree: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) to a node of a JSON tree, the root excluded."""
    found: list[tuple[Any, ...]] = []
    items = tree.items() if isinstance(tree, dict) else (
        enumerate(tree) if isinstance(tree, list) else [])
    for key, value in items:
        found.append((*at, key))
        found += json_paths(value, (*at, key))
    return found


@st.composite
def json_mutations(draw: st.DrawFn, tree: Any) -> Any:
    """``tree`` (a copy) with one to three nodes deleted, replaced by a value of
    another type or a hostile one, or renamed (dict keys)."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        paths = json_paths(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        how = draw(st.sampled_from(["delete", "replace", "replace", "replace", "rename"]))
        if how == "delete":
            del parent[key]
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["", "../x", "emb:x", "EMB", "hash_filter",
                                         "a/b", "flt2"]))] = parent.pop(key)
        else:
            parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE_JSON)))
    return tree


@st.composite
def byte_mutations(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` truncated, with a byte flipped, with bytes appended, emptied or
    replaced by random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "append", "empty", "random"]))
    if how == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=16))
    if how == "empty":
        return b""
    return draw(st.binary(max_size=64))


#: ``checkpoint`` index texts (``{out}``: the directory outside the data root).
HOSTILE_INDEXES = (
    'model_checkpoint_path: "../../outside/ck/model.ckpt-1"\n',
    'model_checkpoint_path: "{out}/ck/model.ckpt-1"\n',
    'model_checkpoint_path: "/etc/passwd"\n',
    'model_checkpoint_path: "model.ckpt-9"\n',
    'model_checkpoint_path: "model.ckpt-1.assets/../model.ckpt-1"\n',
    'model_checkpoint_path: ""\n',
    'model_checkpoint_path: "model.ckpt-1"\nall_model_checkpoint_paths: "../../x"\n',
    'model_checkpoint_path: "a\\"b"\n', "model_checkpoint_path: model.ckpt-1\n",
    "garbage\n", "\xff\xfe",
)
