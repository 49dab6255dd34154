"""EntryDump codec: byte equality with protobuf, hand-computed records, decoding.

Stand-in optimizers below mirror the real dump layouts (docs/semantics.md §1.3) so these
tests do not depend on the optimizer update code; one test also runs every real
optimizer's slots through the codec.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import embedding_hash_table_pb2 as eht
from protos import optimizer_pb2 as opt_pb
from ps_server.checkpoint import entry_dump
from ps_server.checkpoint.entry_dump import (
    check_entry_dumps,
    decode_entry_dumps,
    encode_entry_dump_rows,
    encode_entry_dumps,
    split_records,
)
from ps_server.checkpoint.tfrecord import FRAME_MARGINS, frame_record_runs_array, frame_rows
from ps_server.engine.optimizers.base import (
    Optimizer,
    State,
    StateSlot,
    float_slot,
    scalar_slot,
)
from ps_server.engine.types import Floats
from ps_server.errors import (
    CheckpointCorruptError,
    ConfigError,
    ConfigMismatchError,
    DimMismatchError,
)

# ---------------------------------------------------------------- stand-ins


class _Stub(Optimizer):
    def apply(
        self, params: Floats, state: State, grads: Floats, lr: float, global_step: int
    ) -> None:
        raise NotImplementedError


class Adagrad(_Stub):
    dump_field: ClassVar[int | None] = 1

    def slots(self) -> tuple[StateSlot, ...]:
        return (float_slot("norm", self.dim, 1),)

    def init_state(self, n: int) -> State:
        return {"norm": np.full((n, self.dim), 0.1, np.float32)}


class Sgd(_Stub):
    dump_field: ClassVar[int | None] = 2

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def init_state(self, n: int) -> State:
        return {}


class Adam(_Stub):
    dump_field: ClassVar[int | None] = 7

    def slots(self) -> tuple[StateSlot, ...]:
        return (
            float_slot("m", self.dim, 1),
            float_slot("v", self.dim, 2),
            scalar_slot("beta1_power", 3),
            scalar_slot("beta2_power", 4),
        )

    def init_state(self, n: int) -> State:
        return {
            "m": np.zeros((n, self.dim), np.float32),
            "v": np.zeros((n, self.dim), np.float32),
            "beta1_power": np.full((n, 1), 0.9, np.float32),
            "beta2_power": np.full((n, 1), 0.99, np.float32),
        }


class BatchSoftmax(_Stub):
    dump_field: ClassVar[int | None] = 14

    def slots(self) -> tuple[StateSlot, ...]:
        return (scalar_slot("global_step", 1, np.int64),)

    def init_state(self, n: int) -> State:
        return {"global_step": np.zeros((n, 1), np.int64)}


class MovingAverage(_Stub):
    dump_field: ClassVar[int | None] = None

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def init_state(self, n: int) -> State:
        return {}


STAND_INS: dict[str, type[Optimizer]] = {
    "adagrad": Adagrad,
    "sgd": Sgd,
    "adam": Adam,
    "batch_softmax": BatchSoftmax,
    "moving_average": MovingAverage,
}

# ---------------------------------------------------------------- helpers

MEMBER = {f.number: f.name for f in eht.SingleOptimizerDump.DESCRIPTOR.fields}
I64 = np.iinfo(np.int64)


def make(kind: str, dim: int) -> Optimizer:
    return STAND_INS[kind](None, 1 if kind == "batch_softmax" else dim)


def random_state(opt: Optimizer, n: int, rng: np.random.Generator) -> State:
    state: State = {}
    for slot in opt.slots():
        if slot.dtype == np.int64:
            state[slot.name] = rng.integers(I64.min, I64.max, (n, 1), dtype=np.int64, endpoint=True)
        else:
            state[slot.name] = rng.standard_normal((n, slot.width)).astype(np.float32)
    return state


def random_ts(n: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """A mix of 0, real times, negatives and extremes (varints of 1, 5 and 10 bytes)."""
    pool = np.array([0, 1, 127, 128, 1_700_000_000, -1, I64.min, I64.max], np.int64)
    ts = pool[rng.integers(0, pool.size, n)]
    ts[rng.random(n) < 0.3] = rng.integers(I64.min, I64.max, dtype=np.int64)
    return ts


def protobuf_record(
    i: int,
    values: npt.NDArray[np.float32],
    segments: list[tuple[Optimizer, State]],
    ts: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int64] | None,
) -> bytes:
    """Record ``i`` as the protobuf library serializes the message Monolith writes."""
    dump = eht.EntryDump()
    if ids is not None:
        dump.id = int(ids[i])
    dump.num.extend(values[i].tolist())
    dump.opt.SetInParent()
    for opt, state in segments:
        if opt.dump_field is None:
            continue
        member = getattr(dump.opt.dump.add(), MEMBER[opt.dump_field])
        member.SetInParent()
        for slot in opt.slots():
            row = state[slot.name][i]
            if slot.repeated:
                getattr(member, slot.name).extend(row.tolist())
            else:
                setattr(member, slot.name, row[0].item())
    dump.last_update_ts_sec = int(ts[i])
    return dump.SerializeToString()


def one_record(data: bytes) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    return np.frombuffer(data, np.uint8).copy(), np.array([0, len(data)], np.int64)


def join(records: list[bytes]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    offsets = np.zeros(len(records) + 1, np.int64)
    np.cumsum([len(r) for r in records], out=offsets[1:])
    return np.frombuffer(b"".join(records), np.uint8).copy(), offsets


def hexes(*parts: str) -> bytes:
    """Bytes from hex parts (whitespace ignored)."""
    return bytes.fromhex(" ".join(parts))


def f32(x: float) -> str:
    """Little-endian hex of a float32, e.g. 1.0 -> '0000803f'."""
    return struct.pack("<f", x).hex()


@pytest.fixture
def slow_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record indices that went to the protobuf parser."""
    seen: list[int] = []
    real = entry_dump._decode_slow

    def spy(buffer: Any, offsets: Any, rows: Any, *rest: Any) -> None:
        seen.extend(rows.tolist())
        real(buffer, offsets, rows, *rest)

    monkeypatch.setattr(entry_dump, "_decode_slow", spy)
    return seen


@pytest.fixture
def walked_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record indices that were not read through a template (walked, maybe then protobuf)."""
    seen: list[int] = []
    real = entry_dump._decode_walked

    def spy(buffer: Any, offsets: Any, rest: Any, *more: Any) -> None:
        seen.extend(rest.tolist())
        real(buffer, offsets, rest, *more)

    monkeypatch.setattr(entry_dump, "_decode_walked", spy)
    return seen


@pytest.fixture
def every_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read runs of any length (even one record) through templates."""
    monkeypatch.setattr(entry_dump, "_MIN_RUN", 1)


def assert_decoded(out: Any, values: Any, segments: Any, ts: Any, ids: Any) -> None:
    n = values.shape[0]
    assert np.array_equal(out.ids, ids if ids is not None else np.zeros(n, np.int64))
    assert np.array_equal(out.values, values)
    assert np.array_equal(out.timestamps, ts)
    assert out.num_lengths.tolist() == [values.shape[1]] * n
    assert out.has_state.all()
    for (_, state), got in zip(segments, out.states, strict=True):
        assert state.keys() == got.keys()
        for name in state:
            assert got[name].dtype == state[name].dtype
            assert np.array_equal(got[name], state[name])


# ---------------------------------------------------------------- hand-computed bytes


def test_sgd_lookup_entry_example() -> None:
    # docs/semantics.md §4.2: SGD, value 0.1, ts 0, no id.
    buf, off = encode_entry_dumps(
        np.array([[0.1]], np.float32), [(Sgd(None, 1), {})], np.array([0], np.int64), None
    )
    assert buf.tobytes() == bytes.fromhex("15 cd cc cc 3d 1a 04 0a 02 12 00 20 00")
    assert off.tolist() == [0, 13]


def test_adagrad_dim2_record_with_id() -> None:
    # id -2 (sfixed64 LE) | num 1.0, -2.0 | adagrad norm 0.5, 0.25 | ts 300.
    #   1.0 = 0x3f800000, -2.0 = 0xc0000000, 0.5 = 0x3f000000, 0.25 = 0x3e800000
    #   AdagradOptimizerDump: 2 x (0d + 4 bytes)                    = 10 bytes
    #   SingleOptimizerDump:  0a (adagrad, field 1 LEN) 0a + 10     = 12 bytes
    #   OptimizerDump:        0a (dump, field 1 LEN)    0c + 12     = 14 bytes -> 1a 0e
    #   300 = 0b10_0101100 -> varint ac 02
    expected = hexes(
        "09 fe ff ff ff ff ff ff ff",
        "15 0000803f 15 000000c0",
        "1a 0e 0a 0c 0a 0a 0d 0000003f 0d 0000803e",
        "20 ac 02",
    )
    buf, off = encode_entry_dumps(
        np.array([[1.0, -2.0]], np.float32),
        [(Adagrad(None, 2), {"norm": np.array([[0.5, 0.25]], np.float32)})],
        np.array([300], np.int64),
        np.array([-2], np.int64),
    )
    assert buf.tobytes() == expected
    assert off.tolist() == [0, len(expected)]


def test_batch_softmax_negative_timestamp() -> None:
    # batch_softmax is SingleOptimizerDump field 14: tag (14 << 3) | 2 = 0x72.
    # global_step 1 -> 08 01; ts -1 -> ten-byte varint ff x9 01.
    expected = bytes.fromhex("15 00000000 1a 06 0a 04 72 02 08 01 20 ffffffffffffffffff 01")
    buf, _ = encode_entry_dumps(
        np.zeros((1, 1), np.float32),
        [(BatchSoftmax(None, 1), {"global_step": np.array([[1]], np.int64)})],
        np.array([-1], np.int64),
        None,
    )
    assert buf.tobytes() == expected


def test_batch_softmax_zero_step_is_written() -> None:
    # global_step 0 is still on the wire: 08 00 inside 72 02.
    buf, _ = encode_entry_dumps(
        np.zeros((1, 1), np.float32),
        [(BatchSoftmax(None, 1), {"global_step": np.zeros((1, 1), np.int64)})],
        np.array([0], np.int64),
        None,
    )
    assert buf.tobytes() == bytes.fromhex("15 00000000 1a 06 0a 04 72 02 08 00 20 00")


def test_moving_average_writes_empty_opt() -> None:
    buf, _ = encode_entry_dumps(
        np.ones((1, 1), np.float32), [(MovingAverage(None, 1), {})], np.array([0], np.int64), None
    )
    assert buf.tobytes() == bytes.fromhex("15 0000803f 1a 00 20 00")


def test_adam_scalars_follow_vectors() -> None:
    # adam = field 7 -> tag 0x3a; m (0d) then v (15) then beta1_power (1d) beta2_power (25).
    # inner = 4 x 5 = 20 bytes (0x14); single = 1 + 1 + 20 = 22 (0x16); opt = 24 (0x18).
    state = {
        "m": np.array([[1.0]], np.float32),
        "v": np.array([[2.0]], np.float32),
        "beta1_power": np.array([[0.5]], np.float32),
        "beta2_power": np.array([[0.25]], np.float32),
    }
    buf, _ = encode_entry_dumps(
        np.array([[-2.0]], np.float32), [(Adam(None, 1), state)], np.array([1], np.int64), None
    )
    expected = (
        f"15 {f32(-2.0)} 1a 18 0a 16 3a 14"
        f" 0d {f32(1.0)} 15 {f32(2.0)} 1d {f32(0.5)} 25 {f32(0.25)} 20 01"
    )
    assert buf.tobytes() == bytes.fromhex(expected)


# ---------------------------------------------------------------- protobuf equality

LAYOUTS = {
    "adagrad": [("adagrad", 4)],
    "sgd": [("sgd", 3)],
    "adam": [("adam", 2)],
    "batch_softmax": [("batch_softmax", 1)],
    "moving_average": [("moving_average", 2)],
    "adagrad|moving_average|adam": [("adagrad", 2), ("moving_average", 3), ("adam", 1)],
    "batch_softmax|sgd|adagrad": [("batch_softmax", 1), ("sgd", 2), ("adagrad", 3)],
}


def build(layout: list[tuple[str, int]], n: int, rng: np.random.Generator) -> tuple[Any, ...]:
    segments = []
    for kind, dim in layout:
        opt = make(kind, dim)
        segments.append((opt, random_state(opt, n, rng)))
    dim = sum(opt.dim for opt, _ in segments)
    values = rng.standard_normal((n, dim)).astype(np.float32) * 1e3
    return values, segments, random_ts(n, rng)


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_records_equal_protobuf_serialization(name: str, with_ids: bool) -> None:
    rng = np.random.default_rng(len(name))
    n = 64
    values, segments, ts = build(LAYOUTS[name], n, rng)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64) if with_ids else None
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    records = split_records(buf, off)
    assert len(records) == n
    for i in range(n):
        assert records[i] == protobuf_record(i, values, segments, ts, ids), i
    assert off[-1] == buf.size


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_round_trip_stays_on_fast_path(name: str, with_ids: bool, slow_rows: list[int]) -> None:
    rng = np.random.default_rng(7)
    n = 50
    values, segments, ts = build(LAYOUTS[name], n, rng)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64) if with_ids else None
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    out = decode_entry_dumps(buf, off, [o for o, _ in segments], values.shape[1])
    assert slow_rows == []
    assert np.array_equal(out.ids, ids if ids is not None else np.zeros(n, np.int64))
    assert np.array_equal(out.values, values)
    assert np.array_equal(out.timestamps, ts)
    assert out.num_lengths.tolist() == [values.shape[1]] * n
    assert out.has_state.all()
    for (_, state), got in zip(segments, out.states, strict=True):
        assert state.keys() == got.keys()
        for name_ in state:
            assert got[name_].dtype == state[name_].dtype
            assert np.array_equal(got[name_], state[name_])


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_round_trip_through_templates(
    name: str, with_ids: bool, every_run: None, walked_rows: list[int], slow_rows: list[int]
) -> None:
    # Every run of equal-length records (random_ts mixes 1, 5 and 10-byte varints)
    # is read through the template of its first record. Only a record whose int64
    # varints split the same length differently (another layout) is walked.
    rng = np.random.default_rng(5)
    n = 60
    values, segments, ts = build(LAYOUTS[name], n, rng)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64) if with_ids else None
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    out = decode_entry_dumps(buf, off, [o for o, _ in segments], values.shape[1])

    def varint_len(v: int) -> int:
        return 10 if v < 0 else max(1, (v.bit_length() + 6) // 7)

    ints = [st[s.name][:, 0] for opt, st in segments for s in opt.slots() if s.dtype == np.int64]
    layout = [tuple(varint_len(int(a[i])) for a in [*ints, ts]) for i in range(n)]
    lengths = np.diff(off)
    want_walked, first = [], 0
    for i in range(n):
        if lengths[i] != lengths[first]:
            first = i
        if layout[i] != layout[first]:
            want_walked.append(i)
    assert walked_rows == want_walked and slow_rows == []
    if not ints:
        assert walked_rows == []
    assert_decoded(out, values, segments, ts, ids)
    checked = check_entry_dumps(buf, off, [o for o, _ in segments], values.shape[1])
    assert np.array_equal(checked, out.ids)


def one_long_run(n: int) -> tuple[Any, ...]:
    """n records of batch_softmax(1) | adagrad(2) with ids, all of one length."""
    rng = np.random.default_rng(9)
    soft, ada = BatchSoftmax(None, 1), Adagrad(None, 2)
    steps = np.ones((n, 1), np.int64)
    norm = rng.random((n, 2)).astype(np.float32)
    segments = [(soft, {"global_step": steps}), (ada, {"norm": norm})]
    values = rng.standard_normal((n, 3)).astype(np.float32)
    ts = np.full(n, 1_700_000_000, np.int64)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64)
    return values, segments, ts, ids


def test_odd_records_inside_a_long_run(walked_rows: list[int], slow_rows: list[int]) -> None:
    n = 300
    values, segments, ts, ids = one_long_run(n)
    # Record 100 swaps varint lengths: a 5-byte global_step, a 1-byte timestamp. Same
    # record length, other layout (its length prefixes differ): walked, still fast.
    segments[0][1]["global_step"][100] = 1_700_000_000
    ts[100] = 1
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    records = split_records(buf, off)
    assert len({len(r) for r in records}) == 1
    # Record 200: its first num tag 15 becomes 2d (field 5, fixed32: unknown), so num
    # keeps two values. Record 250: the timestamp tag 20 becomes 28 (field 5, varint).
    first_num = 9  # after 09 + 8 id bytes
    assert records[200][first_num] == 0x15
    records[200] = records[200][:first_num] + b"\x2d" + records[200][first_num + 1 :]
    ts_tag = len(records[250]) - 6  # 20 + five varint bytes
    assert records[250][ts_tag] == 0x20
    records[250] = records[250][:ts_tag] + b"\x28" + records[250][ts_tag + 1 :]
    buf, off = join(records)
    out = decode_entry_dumps(buf, off, [opt for opt, _ in segments], 3)
    assert walked_rows == [100, 200, 250]
    assert slow_rows == [200, 250]
    assert np.array_equal(out.ids, ids)
    assert out.num_lengths.tolist() == [3] * 200 + [2] + [3] * 99
    want_values = values.copy()
    want_values[200] = [values[200, 1], values[200, 2], 0.0]
    assert np.array_equal(out.values, want_values)
    want_ts = ts.copy()
    want_ts[250] = 0  # absent
    assert np.array_equal(out.timestamps, want_ts)
    assert out.states[0]["global_step"][[0, 100, 299], 0].tolist() == [1, 1_700_000_000, 1]
    assert np.array_equal(out.states[1]["norm"], segments[1][1]["norm"])
    assert out.has_state.all()
    assert np.array_equal(check_entry_dumps(buf, off, [opt for opt, _ in segments], 3), ids)


def test_check_raises_what_decode_raises() -> None:
    values, segments, ts, ids = one_long_run(200)
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    records = split_records(buf, off)
    opts = [opt for opt, _ in segments]
    cut = [*records[:150], records[150][:-3], *records[151:]]  # inside the timestamp
    wide = records[:]
    wide[7] = protobuf_record(0, np.ones((1, 4), np.float32), segments, ts, ids)
    for damaged, error, message in [
        (cut, CheckpointCorruptError, "record 150 is not a valid EntryDump"),
        (wide, ConfigMismatchError, "record 7 has 4 values"),
    ]:
        for fn in (decode_entry_dumps, check_entry_dumps):
            with pytest.raises(error, match=message):
                fn(*join(damaged), opts, 3)


def test_property_round_trip_through_templates() -> None:
    # The property below with every run read through a template.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entry_dump, "_MIN_RUN", 1)
        test_property_encode_matches_protobuf_and_round_trips()


def test_small_chunks_with_mixed_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of a few records force the padded (mixed layout) path and chunk seams.
    monkeypatch.setattr(entry_dump, "_CHUNK_BYTES", 200)
    rng = np.random.default_rng(3)
    n = 41
    values, segments, ts = build(LAYOUTS["batch_softmax|sgd|adagrad"], n, rng)
    ts[::3] = 0
    ids = np.arange(n, dtype=np.int64) - 20
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    for i, record in enumerate(split_records(buf, off)):
        assert record == protobuf_record(i, values, segments, ts, ids)
    out = decode_entry_dumps(buf, off, [o for o, _ in segments], values.shape[1])
    assert np.array_equal(out.ids, ids)
    assert np.array_equal(out.values, values)
    assert np.array_equal(out.timestamps, ts)
    assert np.array_equal(out.states[0]["global_step"], segments[0][1]["global_step"])
    assert np.array_equal(out.states[2]["norm"], segments[2][1]["norm"])


@pytest.mark.parametrize(
    "kind",
    [
        "adagrad",
        "sgd",
        "adam",
        "amsgrad",
        "ftrl",
        "adadelta",
        "momentum",
        "rmsprop",
        "rmspropv2",
        "group_adagrad",
        "batch_softmax",
        "moving_average",
    ],
)
def test_real_optimizers_round_trip(kind: str) -> None:
    from ps_server.engine.optimizers import optimizer_from_config

    config = opt_pb.OptimizerConfig()
    getattr(config, kind).SetInParent()
    opt = optimizer_from_config(config, 1 if kind == "batch_softmax" else 3)
    rng = np.random.default_rng(11)
    n = 9
    state = random_state(opt, n, rng)
    values = rng.standard_normal((n, opt.dim)).astype(np.float32)
    ts = random_ts(n, rng)
    ids = np.arange(n, dtype=np.int64)
    buf, off = encode_entry_dumps(values, [(opt, state)], ts, ids)
    for i, record in enumerate(split_records(buf, off)):
        assert record == protobuf_record(i, values, [(opt, state)], ts, ids)
    out = decode_entry_dumps(buf, off, [opt], opt.dim)
    for name in state:
        assert np.array_equal(out.states[0][name], state[name])


# ---------------------------------------------------------------- foreign encodings


# id 7; num packed (field 2 LEN, 8 bytes); norm packed (field 1 LEN) inside adagrad
ADAGRAD_PACKED = hexes(
    "09 0700000000000000",
    "12 08 0000803f 000000c0",
    "1a 0e 0a 0c 0a 0a 0a 08 0000003f 0000803e",
    "20 ac 02",
)


def test_packed_floats_decode_on_slow_path(slow_rows: list[int]) -> None:
    buf, off = one_record(ADAGRAD_PACKED)
    out = decode_entry_dumps(buf, off, [Adagrad(None, 2)], 2)
    assert slow_rows == [0]
    assert out.ids.tolist() == [7]
    assert out.values.tolist() == [[1.0, -2.0]]
    assert out.states[0]["norm"].tolist() == [[0.5, 0.25]]
    assert out.timestamps.tolist() == [300]
    assert out.has_state.tolist() == [True]
    assert out.num_lengths.tolist() == [2]


def test_reordered_fields_decode_on_slow_path(slow_rows: list[int]) -> None:
    # ts first, then opt, then num, then id (any order is valid proto2).
    record = hexes(
        "20 ac 02",
        "1a 0e 0a 0c 0a 0a 0d 0000003f 0d 0000803e",
        "15 0000803f 15 000000c0",
        "09 feffffffffffffff",
    )
    buf, off = one_record(record)
    out = decode_entry_dumps(buf, off, [Adagrad(None, 2)], 2)
    assert slow_rows == [0]
    assert out.ids.tolist() == [-2]
    assert out.values.tolist() == [[1.0, -2.0]]
    assert out.states[0]["norm"].tolist() == [[0.5, 0.25]]
    assert out.timestamps.tolist() == [300]


def test_foreign_record_among_ours(slow_rows: list[int]) -> None:
    values = np.array([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], np.float32)
    norm = np.array([[1.5, 2.5], [3.5, 4.5], [5.5, 6.5]], np.float32)
    opt = Adagrad(None, 2)
    buf, off = encode_entry_dumps(values, [(opt, {"norm": norm})], np.array([1, 2, 3]), None)
    records = split_records(buf, off)
    # record 1 gets an unknown field 5 (varint 9) appended: 28 09.
    records[1] += bytes.fromhex("28 09")
    records.insert(2, ADAGRAD_PACKED)
    out = decode_entry_dumps(*join(records), [opt], 2)
    assert slow_rows == [1, 2]
    assert out.values.tolist() == [[3.0, 4.0], [5.0, 6.0], [1.0, -2.0], [7.0, 8.0]]
    assert out.states[0]["norm"].tolist() == [[1.5, 2.5], [3.5, 4.5], [0.5, 0.25], [5.5, 6.5]]
    assert out.ids.tolist() == [0, 0, 7, 0]
    assert out.timestamps.tolist() == [1, 2, 300, 3]


def test_trailing_unknown_field_in_a_uniform_range(slow_rows: list[int]) -> None:
    # Both records share every varint length; the second has 28 89 01 (field 5) appended.
    opt = Sgd(None, 1)
    buf, off = encode_entry_dumps(np.ones((2, 1), np.float32), [(opt, {})], np.array([4, 4]), None)
    records = split_records(buf, off)
    records[1] += bytes.fromhex("28 89 01")
    out = decode_entry_dumps(*join(records), [opt], 1)
    assert slow_rows == [1]
    assert out.values.tolist() == [[1.0], [1.0]]
    assert out.timestamps.tolist() == [4, 4]


@pytest.mark.parametrize(
    "record",
    [
        # OptimizerDump carries an unknown field 4 (20 07) after the sgd dump
        "15 0000803f 1a 06 0a 02 12 00 20 07",
        # SgdOptimizerDump carries it
        "15 0000803f 1a 06 0a 04 12 02 20 07",
    ],
)
def test_field_inside_opt_is_not_the_timestamp(record: str, slow_rows: list[int]) -> None:
    # Both end with bytes that look like last_update_ts_sec = 7; it is inside opt.
    out = decode_entry_dumps(*one_record(bytes.fromhex(record)), [Sgd(None, 1)], 1)
    assert slow_rows == [0]
    assert out.timestamps.tolist() == [0]
    assert out.has_state.tolist() == [True]


def test_inner_length_decides_what_belongs_to_the_slot() -> None:
    # adagrad's message is 5 bytes (one norm float); the second 0d float that follows
    # sits in SingleOptimizerDump as an unknown field (field 1 with the wrong wire
    # type). So norm has one element, not two.
    record = bytes.fromhex(
        f"15 {f32(1.0)} 15 {f32(2.0)} 1a 0e 0a 0c 0a 05 0d {f32(3.0)} 0d {f32(4.0)} 20 00"
    )
    with pytest.raises(ConfigMismatchError, match="norm has 1 elements"):
        decode_entry_dumps(*one_record(record), [Adagrad(None, 2)], 2)


def test_reordered_adam_scalars_and_absent_ones(slow_rows: list[int]) -> None:
    # adam (tag 3a) with beta2_power (25), beta1_power (1d), v (15), m (0d) reversed;
    # the second record has no powers: they read as the proto default 0, as
    # Monolith's restore would read them, not as the initial 0.9 / 0.99.
    first = f"3a 14 25 {f32(0.25)} 1d {f32(0.5)} 15 {f32(2.0)} 0d {f32(1.0)}"
    second = f"3a 0a 0d {f32(5.0)} 15 {f32(6.0)}"
    records = [
        bytes.fromhex(f"15 {f32(9.0)} 1a 18 0a 16 {first} 20 01"),
        bytes.fromhex(f"15 {f32(8.0)} 1a 0e 0a 0c {second} 20 02"),
    ]
    out = decode_entry_dumps(*join(records), [Adam(None, 1)], 1)
    assert slow_rows == [0, 1]
    assert out.states[0]["m"].tolist() == [[1.0], [5.0]]
    assert out.states[0]["v"].tolist() == [[2.0], [6.0]]
    assert out.states[0]["beta1_power"].tolist() == [[0.5], [0.0]]
    assert out.states[0]["beta2_power"].tolist() == [[0.25], [0.0]]
    assert out.values.tolist() == [[9.0], [8.0]]


def test_batch_softmax_step_on_slow_path(slow_rows: list[int]) -> None:
    # global_step -3 (ten-byte varint fd ff .. 01) followed by an unknown field 2 (10 01).
    step = "08 fdffffffffffffffff01 10 01"
    record = bytes.fromhex(f"15 00000000 1a 11 0a 0f 72 0d {step} 20 00")
    out = decode_entry_dumps(*one_record(record), [BatchSoftmax(None, 1)], 1)
    assert slow_rows == [0]
    assert out.states[0]["global_step"].tolist() == [[-3]]


def test_short_num_and_missing_opt_keep_init_state() -> None:
    # Only num = [1.0]: no opt, no timestamp, no id.
    buf, off = one_record(bytes.fromhex("15 0000803f"))
    out = decode_entry_dumps(buf, off, [Adagrad(None, 2)], 2)
    assert out.values.tolist() == [[1.0, 0.0]]
    assert out.num_lengths.tolist() == [1]
    assert out.has_state.tolist() == [False]
    assert out.states[0]["norm"].tolist() == [[np.float32(0.1)] * 2]
    assert out.timestamps.tolist() == [0]
    assert out.ids.tolist() == [0]


def test_empty_record_is_an_empty_entry_dump() -> None:
    buf, off = join([b"", bytes.fromhex("15 0000803f 1a 00 20 05")])
    out = decode_entry_dumps(buf, off, [MovingAverage(None, 1)], 1)
    assert out.num_lengths.tolist() == [0, 1]
    assert out.values.tolist() == [[0.0], [1.0]]
    assert out.has_state.tolist() == [True, True]  # moving_average has no dump to miss
    assert out.timestamps.tolist() == [0, 5]


def test_unterminated_varint_is_corrupt() -> None:
    # last_update_ts_sec with ten continuation bytes and nothing after them
    record = bytes.fromhex("15 00000000 1a 04 0a 02 12 00 20" + " ff" * 10)
    with pytest.raises(CheckpointCorruptError, match="record 0"):
        decode_entry_dumps(*one_record(record), [Sgd(None, 1)], 1)


def test_truncated_record_is_corrupt() -> None:
    opt = Adagrad(None, 2)
    values = np.ones((2, 2), np.float32)
    buf, off = encode_entry_dumps(values, [(opt, opt.init_state(2))], np.array([9, 9]), None)
    records = split_records(buf, off)
    records[1] = records[1][:-3]  # cut inside the last norm float
    with pytest.raises(CheckpointCorruptError, match="record 1"):
        decode_entry_dumps(*join(records), [opt], 2)


def test_offsets_past_the_buffer_are_corrupt() -> None:
    with pytest.raises(CheckpointCorruptError):
        decode_entry_dumps(np.zeros(4, np.uint8), np.array([0, 5]), [Sgd(None, 1)], 1)


def test_more_values_than_dim_is_a_config_mismatch() -> None:
    buf, off = encode_entry_dumps(
        np.ones((1, 3), np.float32), [(Sgd(None, 3), {})], np.array([0]), None
    )
    with pytest.raises(ConfigMismatchError, match="record 0 has 3 values"):
        decode_entry_dumps(buf, off, [Sgd(None, 2)], 2)


def test_other_optimizer_dump_is_a_config_mismatch() -> None:
    opt = Adagrad(None, 1)
    buf, off = encode_entry_dumps(
        np.ones((1, 1), np.float32), [(opt, opt.init_state(1))], np.array([0]), None
    )
    with pytest.raises(ConfigMismatchError, match="adagrad"):
        decode_entry_dumps(buf, off, [Sgd(None, 1)], 1)


def test_extra_dump_is_a_config_mismatch() -> None:
    # two sgd dumps for a table with one sgd segment
    buf, off = one_record(bytes.fromhex("15 0000803f 1a 08 0a 02 12 00 0a 02 12 00 20 00"))
    with pytest.raises(ConfigMismatchError, match="2 optimizer dumps"):
        decode_entry_dumps(buf, off, [Sgd(None, 1)], 1)


def test_norm_of_other_width_is_a_config_mismatch() -> None:
    opt = Adagrad(None, 2)
    buf, off = encode_entry_dumps(
        np.ones((1, 2), np.float32), [(opt, opt.init_state(1))], np.array([0]), None
    )
    with pytest.raises(ConfigMismatchError, match="norm has 2 elements"):
        decode_entry_dumps(buf, off, [Adagrad(None, 3)], 3)


def test_missing_second_dump_keeps_its_init_state() -> None:
    # segments adagrad(1) | adagrad(1); the record only carries the first dump.
    record = bytes.fromhex(f"15 {f32(1.0)} 15 {f32(2.0)} 1a 09 0a 07 0a 05 0d {f32(4.0)} 20 00")
    out = decode_entry_dumps(*one_record(record), [Adagrad(None, 1), Adagrad(None, 1)], 2)
    assert out.states[0]["norm"].tolist() == [[4.0]]
    assert out.states[1]["norm"].tolist() == [[np.float32(0.1)]]
    assert out.has_state.tolist() == [False]


# ---------------------------------------------------------------- arguments


def test_empty_batch() -> None:
    buf, off = encode_entry_dumps(
        np.zeros((0, 2), np.float32),
        [(Adagrad(None, 2), {"norm": np.zeros((0, 2), np.float32)})],
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    assert buf.size == 0 and off.tolist() == [0]
    assert split_records(buf, off) == []
    out = decode_entry_dumps(buf, off, [Adagrad(None, 2)], 2)
    assert out.values.shape == (0, 2) and out.states[0]["norm"].shape == (0, 2)


def test_split_records() -> None:
    buf = np.frombuffer(b"abcdef", np.uint8)
    assert split_records(buf, np.array([0, 2, 2, 6])) == [b"ab", b"", b"cdef"]


def test_state_shape_mismatch() -> None:
    with pytest.raises(DimMismatchError, match="norm"):
        encode_entry_dumps(
            np.zeros((2, 2), np.float32),
            [(Adagrad(None, 2), {"norm": np.zeros((2, 3), np.float32)})],
            np.zeros(2, np.int64),
            None,
        )


def test_segment_dims_must_cover_values() -> None:
    with pytest.raises(DimMismatchError):
        encode_entry_dumps(
            np.zeros((1, 3), np.float32), [(Sgd(None, 2), {})], np.zeros(1, np.int64), None
        )
    with pytest.raises(DimMismatchError):
        decode_entry_dumps(np.zeros(0, np.uint8), np.zeros(1, np.int64), [Sgd(None, 2)], 3)


def test_slot_not_matching_the_schema_is_a_config_error() -> None:
    class Misnamed(Adagrad):
        def slots(self) -> tuple[StateSlot, ...]:
            return (float_slot("accum", self.dim, 1),)

    class NoSuchMember(Adagrad):
        dump_field: ClassVar[int | None] = 5  # not a SingleOptimizerDump member

    for opt in (Misnamed(None, 1), NoSuchMember(None, 1)):
        with pytest.raises(ConfigError):
            encode_entry_dumps(
                np.zeros((1, 1), np.float32),
                [(opt, opt.init_state(1))],
                np.zeros(1, np.int64),
                None,
            )


# ---------------------------------------------------------------- property

SEGMENT = st.tuples(st.sampled_from(sorted(STAND_INS)), st.integers(1, 4))
FLOATS = st.floats(allow_nan=False, width=32)
INT64 = st.integers(I64.min, I64.max)


@st.composite
def batches(draw: st.DrawFn) -> tuple[Any, ...]:
    layout = draw(st.lists(SEGMENT, min_size=1, max_size=3))
    n = draw(st.integers(0, 6))
    segments = []
    for kind, dim in layout:
        opt = make(kind, dim)
        state: State = {}
        for slot in opt.slots():
            if slot.dtype == np.int64:
                state[slot.name] = draw(hnp.arrays(np.int64, (n, 1), elements=INT64))
            else:
                state[slot.name] = draw(hnp.arrays(np.float32, (n, slot.width), elements=FLOATS))
        segments.append((opt, state))
    dim = sum(opt.dim for opt, _ in segments)
    values = draw(hnp.arrays(np.float32, (n, dim), elements=FLOATS))
    ts = draw(hnp.arrays(np.int64, n, elements=INT64 | st.integers(0, 1 << 35)))
    ids = draw(st.none() | hnp.arrays(np.int64, n, elements=INT64))
    return values, segments, ts, ids


@settings(max_examples=150, deadline=None)
@given(batches())
def test_property_encode_matches_protobuf_and_round_trips(batch: tuple[Any, ...]) -> None:
    values, segments, ts, ids = batch
    n, dim = values.shape
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    records = split_records(buf, off)
    assert records == [protobuf_record(i, values, segments, ts, ids) for i in range(n)]
    out = decode_entry_dumps(buf, off, [opt for opt, _ in segments], dim)
    assert np.array_equal(out.values, values)
    assert np.array_equal(out.timestamps, ts)
    assert np.array_equal(out.ids, ids if ids is not None else np.zeros(n, np.int64))
    assert out.has_state.all() and (out.num_lengths == dim).all()
    for (_, state), got in zip(segments, out.states, strict=True):
        for name in state:
            assert np.array_equal(got[name], state[name])


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_interleaved_layouts_equal_protobuf(
    name: str, with_ids: bool, walked_rows: list[int], slow_rows: list[int]
) -> None:
    # Mixed timestamps (and int64 slots) interleave records of a few lengths at
    # random, so runs are short: encoding writes each layout as a block and scatters
    # it, decoding gathers each length's records and reads them through a template.
    # Both must give protobuf's bytes; a foreign (packed) record among them is still
    # parsed with protobuf.
    rng = np.random.default_rng(11)
    n = 700
    values, segments, ts = build(LAYOUTS[name], n, rng)
    ts = np.where(rng.random(n) < 0.5, 0, 1_700_000_000 + np.arange(n)).astype(np.int64)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64) if with_ids else None
    want = [protobuf_record(i, values, segments, ts, ids) for i in range(n)]
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    assert split_records(buf, off) == want
    foreign = eht.EntryDump()
    foreign.ParseFromString(want[3])
    packed = b"\x12" + bytes([4 * values.shape[1]]) + values[3].tobytes()
    # Field 2 packed instead of unpacked: the same message, another encoding.
    rest = foreign.SerializeToString().replace(
        b"".join(b"\x15" + v.tobytes() for v in values[3:4].reshape(-1, 1)), packed
    )
    assert rest != want[3]
    records = [*want[:3], rest, *want[4:]]
    buf2, off2 = join(records)
    opts = [o for o, _ in segments]
    out = decode_entry_dumps(buf2, off2, opts, values.shape[1])
    assert_decoded(out, values, segments, ts, ids)
    assert 3 in slow_rows
    assert len(walked_rows) < n // 4  # nearly every record read through a template
    assert np.array_equal(check_entry_dumps(buf2, off2, opts, values.shape[1]), out.ids)


# ---------------------------------------------------------------- block paths


TS_MIXES = {
    # Only the timestamp's length differs: heads through the scratch, tails as words.
    "zero_or_real": np.array([0, 1_700_000_000], np.int64),
    "one_to_ten_bytes": np.array([0, 300, 1 << 35, 1 << 49, -1], np.int64),
    "uniform": np.array([1_700_000_000], np.int64),
}


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("layout", ["adagrad", "adam", "batch_softmax|sgd|adagrad"])
@pytest.mark.parametrize("mix", sorted(TS_MIXES))
def test_block_paths_match_protobuf_and_round_trip(layout: str, mix: str, with_ids: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Small scratch and blocks, so that a batch spans many of them.
    monkeypatch.setattr(entry_dump, "_SCRATCH_BYTES", 4096)
    monkeypatch.setattr(entry_dump, "_BLOCK_BYTES", 8192)
    monkeypatch.setattr(entry_dump, "_TILE_BYTES", 1024)
    rng = np.random.default_rng(len(layout) + len(mix))
    n = 1500
    values, segments, _ = build(LAYOUTS[layout], n, rng)
    for opt, state in segments:  # int64 scalars of one length: only ts lengths differ
        for slot in opt.slots():
            if slot.dtype == np.int64:
                state[slot.name][:] = 5
    pool = TS_MIXES[mix]
    ts = pool[rng.integers(0, pool.size, n)]
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64) if with_ids else None
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    assert split_records(buf, off) == [
        protobuf_record(i, values, segments, ts, ids) for i in range(n)
    ]
    optimizers = [opt for opt, _ in segments]
    dim = values.shape[1]
    out = decode_entry_dumps(buf, off, optimizers, dim)
    assert np.array_equal(out.values, values)
    assert np.array_equal(out.timestamps, ts)
    assert np.array_equal(check_entry_dumps(buf, off, optimizers, dim), out.ids)
    assert np.array_equal(out.ids, ids if ids is not None else np.zeros(n, np.int64))
    for (_, state), got in zip(segments, out.states, strict=True):
        for name in state:
            assert np.array_equal(got[name], state[name])
    # Framed in place: the same file bytes as framing the flat records.
    rows, rows_off = encode_entry_dump_rows(values, segments, ts, ids, FRAME_MARGINS)
    framed = frame_rows(rows) if rows_off is None else frame_record_runs_array(rows, rows_off)
    assert (rows_off is None) == (mix == "uniform")
    assert framed.tobytes() == frame_record_runs_array(buf, off).tobytes()


@pytest.mark.parametrize("byte", ["tag", "continuation", "head"])
def test_damaged_mixed_record_reads_as_protobuf_does(byte: str) -> None:
    """A record whose tail or head does not fit the template leaves the block path;
    what it decodes to (or raises) is what protobuf makes of it."""
    rng = np.random.default_rng(3)
    n = 600
    values, segments, _ = build(LAYOUTS["adagrad"], n, rng)
    ts = np.where(rng.random(n) < 0.5, 0, 1_700_000_000).astype(np.int64)
    ids = rng.integers(I64.min, I64.max, n, dtype=np.int64)
    buf, off = encode_entry_dumps(values, segments, ts, ids)
    i = int(np.flatnonzero(ts)[100])
    end = int(off[i + 1])
    if byte == "tag":
        buf[end - 6] = 0x28  # field 5 (unknown) instead of the timestamp's 4
    elif byte == "continuation":
        buf[end - 2] &= 0x7F  # the varint ends early: one byte too many in the record
    else:
        buf[int(off[i]) + 9] = 0x1D  # num's first tag as field 3 fixed32 (unknown)
    record = buf[off[i] : off[i + 1]].tobytes()
    optimizers = [opt for opt, _ in segments]
    try:
        msg = eht.EntryDump.FromString(record)
    except DecodeError:  # whatever protobuf rejects, decoding must reject too
        with pytest.raises(CheckpointCorruptError, match=f"record {i} "):
            decode_entry_dumps(buf, off, optimizers, 4)
        with pytest.raises(CheckpointCorruptError, match=f"record {i} "):
            check_entry_dumps(buf, off, optimizers, 4)
        return
    out = decode_entry_dumps(buf, off, optimizers, 4)
    assert out.timestamps[i] == msg.last_update_ts_sec
    assert out.num_lengths[i] == len(msg.num)
    assert np.array_equal(out.values[i, : len(msg.num)], np.array(msg.num, np.float32))
    keep = np.arange(n) != i
    assert np.array_equal(out.timestamps[keep], ts[keep])
    assert np.array_equal(out.values[keep], values[keep])
