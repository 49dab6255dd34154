"""Bit-exact agreement with Monolith's compiled C++ (tests/data/monolith_vectors/).

The vectors were produced by Monolith's own sources compiled unmodified with g++ 12 and
Monolith's build flags (the ``monolith`` variant of the README there: ``-O3 -mavx -mavx2
-mfma``, so g++ fuses ``a*b+c`` into FMAs, and ``-D_ENABLE_AVX`` for Adagrad). Every
case compares float32 bit patterns, never a tolerance. Cases the engine does not match
yet are marked ``xfail(strict=True)`` with what differs, so a fix shows up as XPASS.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from protos import embedding_hash_table_pb2 as eht
from protos import float_compressor_pb2 as fcfg
from protos import initializer_config_pb2 as icfg
from ps_server.engine.compressors import compressor_from_config, retriever_from_config
from ps_server.engine.filters.probabilistic import ProbabilisticFilter
from ps_server.engine.filters.sliding import SlidingHashFilter
from ps_server.engine.hash_table import EmbeddingHashTable
from ps_server.engine.initializers import initializer_from_config
from ps_server.errors import ConfigError

DATA = Path(__file__).resolve().parents[2] / "data" / "monolith_vectors"
ENTRY_ID = 12345


@cache
def load(name: str) -> Any:
    with open(DATA / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def bits(x: Any) -> np.ndarray:
    """uint32 bit patterns of a vector's ``hex`` (a list or a single string)."""
    h = x["hex"]
    return np.array([int(v, 16) for v in ([h] if isinstance(h, str) else h)], dtype=np.uint32)


def floats(x: Any) -> np.ndarray:
    return bits(x).view(np.float32)


def same_bits(actual: Any, expected: Any, what: str) -> None:
    got = np.ascontiguousarray(np.asarray(actual, dtype=np.float32)).reshape(-1).view(np.uint32)
    want = bits(expected)
    if not np.array_equal(got, want):
        raise AssertionError(
            f"{what}: bits differ\n got  {[f'{v:08x}' for v in got]}"
            f"\n want {[f'{v:08x}' for v in want]}"
        )


# Known gaps: what differs -> the cases it affects. strict=True, so a fix shows as XPASS.
_GAPS: list[tuple[str, list[str]]] = []
KNOWN_GAPS: dict[str, str] = {case: why for why, cases in _GAPS for case in cases}


def param(case_id: str, value: Any) -> Any:
    marks = []
    if case_id in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[case_id]))
    return pytest.param(value, id=case_id, marks=marks)


# ------------------------------------------------------------------------- optimizers


def optimizer_params() -> list[Any]:
    return [param(f"optimizers/{c['name']}", c) for c in load("optimizers")["cases"]]


#: Cases where Monolith's C++ does what we deliberately do not by default (its bugs,
#: docs/semantics.md §12): they run on a table with ``monolith_quirks=True``, which
#: reproduces them. The default's behaviour is pinned by the tests named for each bug
#: (tests/unit/engine/test_monolith_quirks.py and the end of this file).
MONOLITH_QUIRK_CASES = frozenset({
    # Group AdaGrad stores 0/0 = NaN for zero weights and a zero gradient.
    "group_adagrad_zero_grad_zero_w",
    # The SR decorator of segment k rounds num[off_k:] to the end of the entry, and all
    # decorators share one generator.
    "combo_sr_first",
    "combo_sr_both",
})


def _table(entry_config_hex: str, monolith_quirks: bool = False) -> EmbeddingHashTable:
    entry = eht.EntryConfig.FromString(bytes.fromhex(entry_config_hex))
    return EmbeddingHashTable(eht.EmbeddingHashTableConfig(entry_config=entry),
                              monolith_quirks=monolith_quirks)


def _check_opt(table: EmbeddingHashTable, expected: list[Any], what: str) -> None:
    sel = table.select_entries([ENTRY_ID])
    dumped = [(opt, st) for opt, st in sel.segments if opt.dump_field is not None]
    assert len(dumped) == len(expected), what
    for (_, state), exp in zip(dumped, expected, strict=True):
        for field, val in exp["fields"].items():
            if isinstance(val, dict):
                same_bits(state[field][0], val, f"{what} {exp['type']}.{field}")
            else:
                assert int(state[field][0].reshape(-1)[0]) == val, f"{what} {exp['type']}.{field}"


@pytest.mark.parametrize("case", optimizer_params())
def test_optimizer_case(case: Any) -> None:
    if "error" in case:
        with pytest.raises(ConfigError):
            _table(case["entry_config_hex"])
        return
    _run_optimizer_case(case, monolith_quirks=case["name"] in MONOLITH_QUIRK_CASES)


def _run_optimizer_case(case: Any, monolith_quirks: bool) -> None:
    table = _table(case["entry_config_hex"], monolith_quirks)
    std = load("optimizers")["standard_inputs"][str(case["dim"])]
    lrs = floats(case["learning_rates"])
    if case["assigned_w0"]:
        table.assign([ENTRY_ID], floats(std["w0"])[None, :])
        _check_opt(table, case["after_init"]["opt"], "after_init")
    for s, step in enumerate(case["steps"]):
        grad = floats(step["grad"] if "grad" in step else std["grads"][s])
        table.apply_gradients([ENTRY_ID], grad[None, :], lrs, step["global_step"])
        what = f"step {s} (global_step {step['global_step']})"
        same_bits(table.select_entries([ENTRY_ID]).values[0], step["num"], what + " num")
        _check_opt(table, step["opt"], what)
        if "lookup" in step:
            same_bits(table.lookup([ENTRY_ID])[0], step["lookup"], what + " lookup")


# ----------------------------------------------------------------------- initializers


def initializer_params() -> list[Any]:
    data = load("initializers")
    return [param(f"initializers/{g['name']}", g) for g in data["groups"]] + [
        param(f"initializers/{e['name']}", e) for e in data["entries"]
    ]


@pytest.mark.parametrize("group", initializer_params())
def test_initializer_case(group: Any) -> None:
    if "calls" in group:
        # One fresh thread: every random_uniform initializer shares its generator.
        rng = np.random.RandomState(5489)
        for k, call in enumerate(group["calls"]):
            cfg = text_format.Parse(call["initializer_config_text"], icfg.InitializerConfig())
            kind = cfg.WhichOneof("type")
            init = initializer_from_config(cfg, getattr(cfg, kind).dim_size)
            if hasattr(init, "use_generator"):
                init.use_generator(rng)
            same_bits(init.init(1)[0], call["values"], f"call {k}")
        return
    entry = text_format.Parse(group["entry_config_text"], eht.EntryConfig())
    table = EmbeddingHashTable(eht.EmbeddingHashTableConfig(entry_config=entry))
    dim = table.dim
    for k, exp in enumerate(group["entries"]):
        table.assign_add([k + 1], np.zeros((1, dim), np.float32))
        same_bits(table.select_entries([k + 1]).values[0], exp["num"], f"entry {k}")


def test_mt19937_stream_is_numpys_legacy_random_state() -> None:
    data = load("initializers")
    raw = np.random.RandomState(5489).randint(0, 2**32, size=64, dtype=np.uint64)
    assert raw.tolist() == data["mt19937_default_seed_first64"]


# ------------------------------------------------------------------------ compressors


def compressor_params() -> list[Any]:
    data = load("compressors")
    out = [param(f"compressors/{c['name']}", ("compressor", c)) for c in data["compressors"]]
    out.append(param("compressors/combined", ("combined", data["combined"])))
    out += [param(f"compressors/fake_quantizer/r{c['r']['dec']}", ("fake", c))
            for c in data["fake_quantizer"]]
    out += [param(f"compressors/hash_net_quantizer/{i}", ("hash_net", c))
            for i, c in enumerate(data["hash_net_quantizer"])]
    out.append(param("compressors/serving_entry", ("serving", data["serving_entry"])))
    return out


def _encode_bytes(comp: Any, values: np.ndarray) -> bytes:
    enc = np.asarray(comp.encode(values[None, :]))
    if enc.dtype == np.float16:
        return enc.astype("<f2").tobytes()
    return np.ascontiguousarray(enc).tobytes()


@pytest.mark.parametrize("case", compressor_params())
def test_compressor_case(case: Any) -> None:
    kind, c = case
    if kind == "compressor":
        cfg = text_format.Parse(c["compressor_config_text"], fcfg.FloatCompressorConfig())
        comp = compressor_from_config(cfg, 1)
        x = floats(c["inputs"])
        enc = b"".join(_encode_bytes(comp, x[i : i + 1]) for i in range(x.size))
        assert enc.hex() == c["encoded_hex"]
        same_bits(comp.roundtrip(x[:, None])[:, 0], c["decoded"], "decoded")
    elif kind == "combined":
        x = floats(c["inputs"])
        parts = [part.strip() for part in c["layout"].split("|")]
        enc, dec, off = b"", [], 0
        for part in parts:
            cfg = text_format.Parse(part, fcfg.FloatCompressorConfig())
            dim = getattr(cfg, cfg.WhichOneof("type")).dim_size
            comp = compressor_from_config(cfg, dim)
            enc += _encode_bytes(comp, x[off : off + dim])
            dec.append(comp.roundtrip(x[None, off : off + dim])[0])
            off += dim
        assert enc.hex() == c["encoded_hex"]
        same_bits(np.concatenate(dec), c["decoded"], "decoded")
    elif kind == "fake":
        r = float(floats(c["r"])[0])
        cfg = fcfg.FloatCompressorConfig(fixed_r8=fcfg.FloatCompressorConfig.FixedR8(r=r))
        ret = retriever_from_config(cfg, 1)
        x = floats(c["inputs"])
        same_bits(ret.forward(x[:, None])[:, 0], c["quantize"], "quantize")
    elif kind == "hash_net":
        ob = text_format.Parse(c["one_bit_config_text"], fcfg.FloatCompressorConfig.OneBit())
        ret = retriever_from_config(fcfg.FloatCompressorConfig(one_bit=ob), 1)
        x = floats(c["inputs"])
        same_bits(ret.forward(x[:, None])[:, 0], c["forward_initial_scale"], "forward")
        for k, b in enumerate(c["backward"]):
            num = floats(b["num"])[None, :]
            out = ret.backward(num, floats(b["grad_in"])[None, :], b["global_step"])
            same_bits(out, b["grad_out"], f"backward {k} grad")
            same_bits(ret.scale, b["scale_after"], f"backward {k} scale")  # type: ignore[attr-defined]
            same_bits(ret.forward(num), b["forward_num_after"], f"backward {k} forward")
    else:
        entry = text_format.Parse(c["entry_config_text"], eht.EntryConfig())
        table = EmbeddingHashTable(eht.EmbeddingHashTableConfig(entry_config=entry))
        for k, op in enumerate(c["ops"]):
            arg = floats(op["arg"])[None, :]
            getattr(table, op["op"])([ENTRY_ID], arg)
            got = table.lookup([ENTRY_ID])[0]
            same_bits(got, op["lookup"], f"op {k} lookup")
            stored = b"".join(
                _encode_bytes(seg.compressor, got[seg.columns]) for seg in table.layout.segments
            )
            assert stored.hex() == op["stored_hex"], f"op {k} stored"


# ---------------------------------------------------------------------------- filters


def filter_params() -> list[Any]:
    data = load("filters")
    out = [param(f"filters/sliding/{s['name']}", ("sliding", s)) for s in data["sliding"]]
    out += [param(f"filters/probabilistic/{r['name']}", ("probabilistic", r))
            for r in data["probabilistic"]["runs"]]
    return out


@pytest.mark.parametrize("case", filter_params())
def test_filter_case(case: Any) -> None:
    kind, c = case
    if kind == "sliding":
        # Monolith accepts split_num < 5 (allocating 5 splits); ours only when asked.
        f = SlidingHashFilter(c["capacity"], c["split_num"], allow_small_split_num=True)
        counts = c.get("counts") or [1] * len(c["ids"])
        returns, gets = [], []
        for i, fid in enumerate(c["ids"]):
            one = np.array([fid], np.int64)
            returns.append(int(f.add(one, np.array([counts[i]], np.uint32))[0]))
            gets.append(int(f.peek(np.array([fid], np.int64))[0]))
        assert returns == c["add_returns"]
        assert gets == c["get_after"]
        assert [int(r < c["threshold"]) for r in returns] == c["filtered"]
        assert f.failure_count == c["failure_count"]
        assert f.split_num == c.get("split_num_reported", c["split_num"])
        assert len(f.export_splits()) == f.split_num  # what a save writes
        for exp in c["splits"]:
            got = f.export_splits(allocated=True)[exp["split"]]
            meta = got.meta
            sm = meta.sliding_hash_filter_meta
            assert (meta.failure_count, meta.total_size, meta.num_elements) == (
                exp["failure_count"], exp["total_size"], exp["num_elements"])
            assert (sm.split_num, sm.head, sm.head_increment) == (
                exp["sliding_meta"]["split_num"], exp["sliding_meta"]["head"],
                exp["sliding_meta"]["head_increment"])
            assert got.cells.size == exp["num_cells"]
            if "nonzero_cells" in exp:
                nz = np.flatnonzero(got.cells)
                assert [[int(i), int(got.cells[i])] for i in nz] == exp["nonzero_cells"]
        return
    prob = load("filters")["probabilistic"]
    seed = prob["fixed_time"]  # the driver's time(): Monolith's srand seed
    # Each Monolith run starts on a fresh thread, i.e. a fresh generator: a new filter.
    if "filtered_first64" in c:
        f = ProbabilisticFilter(c["equal_probability"], _thresholds(c["threshold"]), seed)
        ids = np.arange(64, dtype=np.int64)  # all in slot 0: the default threshold
        got = f.should_be_filtered(ids, np.full(64, c["count"], np.uint32), with_table=True)
        assert got.astype(int).tolist() == c["filtered_first64"]
    elif c["name"] == "null_table":
        f = ProbabilisticFilter(False, _thresholds(7), seed)
        got = f.should_be_filtered(np.arange(100, dtype=np.int64), None, with_table=False)
        assert int(got.sum()) == c["filtered_of_100"]
        # No table, no draw: the stream is still at its start.
        (first,) = [r for r in prob["runs"] if r["name"] == "unequal_c1_t7"]
        got = f.should_be_filtered(np.arange(64, dtype=np.int64), None, with_table=True)
        assert got.astype(int).tolist() == first["filtered_first64"]
    else:
        assert c["name"] == "present_ids_0_2_4_6_unequal_c1_t7"
        table = _table(_PLAIN_ENTRY_HEX)
        table.assign([0, 2, 4, 6], np.ones((4, table.dim), np.float32))
        table.hash_filter = ProbabilisticFilter(False, _thresholds(7), seed)
        ids = np.arange(8, dtype=np.int64)
        table.assign(ids, np.ones((8, table.dim), np.float32))
        assert (~table.contains(ids)).astype(int).tolist() == c["filtered_ids_0_to_7"]


def _thresholds(default: int) -> eht.SlotOccurrenceThresholdConfig:
    return eht.SlotOccurrenceThresholdConfig(default_occurrence_threshold=default)


#: A one-segment (dim 1, SGD) entry: the present-ids case only needs a table.
_PLAIN_ENTRY_HEX = text_format.Parse(
    "segments { dim_size: 1 opt_config { sgd {} } init_config { zeros {} } "
    "comp_config { fp32 {} } }", eht.EntryConfig()).SerializeToString().hex()


def test_monolith_bug_group_adagrad_zero_weights_and_gradient_store_nan_we_store_zero() -> None:
    """Monolith's Group AdaGrad divides 0 by 0 when a row's weights and gradient are all
    zero and stores NaN in the row, for good (every later step of the case stays NaN);
    we store 0 (docs/semantics.md §5.1, §12) and the row keeps training."""
    (case,) = [c for c in load("optimizers")["cases"]
               if c["name"] == "group_adagrad_zero_grad_zero_w"]
    table = _table(case["entry_config_hex"])
    std = load("optimizers")["standard_inputs"][str(case["dim"])]
    lrs = floats(case["learning_rates"])
    for s, step in enumerate(case["steps"]):
        grad = floats(step["grad"] if "grad" in step else std["grads"][s])
        table.apply_gradients([ENTRY_ID], grad[None, :], lrs, step["global_step"])
        got = table.select_entries([ENTRY_ID]).values[0]
        assert np.isnan(floats(step["num"])).all(), "Monolith's row is no longer NaN"
        if s == 0:
            assert got.tolist() == [0.0] * case["dim"]
        assert np.isfinite(got).all()
    assert np.any(table.select_entries([ENTRY_ID]).values[0] != 0)  # it trained on



@pytest.mark.parametrize("case", [
    c for c in optimizer_params()
    if not c.marks and "error" not in c.values[0]
    and c.values[0]["name"] not in MONOLITH_QUIRK_CASES
])
def test_optimizer_case_with_monolith_quirks_is_monolith_too(case: Any) -> None:
    """``monolith_quirks`` changes only what Monolith does differently: every other
    optimizer case gives Monolith's bits with the option on as well."""
    _run_optimizer_case(case, monolith_quirks=True)
