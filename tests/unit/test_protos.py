"""Monolith-compatible protos: wire bytes worked out by hand from field numbers."""

from __future__ import annotations

import struct

from protos import embedding_hash_table_pb2 as eht
from protos import generate, hash_table_ops_pb2


def test_generated_modules_match_the_proto_sources() -> None:
    stale = generate.stale_files()
    assert not stale, f"stale generated protos {stale}: run `python -m protos.generate`"


def test_entry_dump_bytes() -> None:
    dump = eht.EntryDump(id=1, num=[1.0, -2.0], last_update_ts_sec=300)
    dump.opt.dump.add().adagrad.norm.extend([0.5])
    expected = (
        b"\x09" + struct.pack("<q", 1)  # id: field 1, wire type 1 (sfixed64)
        + b"\x15" + struct.pack("<f", 1.0)  # num: field 2, wire type 5, unpacked
        + b"\x15" + struct.pack("<f", -2.0)
        # opt: field 3 (len 9) -> OptimizerDump.dump: field 1 (len 7)
        # -> SingleOptimizerDump.adagrad: field 1 (len 5) -> norm: field 1, fixed32
        + b"\x1a\x09" + b"\x0a\x07" + b"\x0a\x05" + b"\x0d" + struct.pack("<f", 0.5)
        + b"\x20\xac\x02"  # last_update_ts_sec: field 4 varint, 300 = 0xac 0x02
    )
    assert dump.SerializeToString() == expected
    assert eht.EntryDump.FromString(expected) == dump


def test_negative_id_is_sfixed64() -> None:
    assert eht.EntryDump(id=-1).SerializeToString() == b"\x09" + b"\xff" * 8


def test_single_optimizer_dump_numbers_differ_from_config_numbers() -> None:
    # dynamic_wd_adagrad is 5 in OptimizerConfig but 4 in SingleOptimizerDump, etc.
    dump = eht.SingleOptimizerDump()
    dump.group_adagrad.grad_square_sum = 1.0
    assert dump.SerializeToString() == b"\x7a\x05\x0d" + struct.pack("<f", 1.0)  # field 15
    cfg = eht.OptimizerConfig(group_adagrad=eht.GroupAdaGradOptimizerConfig())
    assert cfg.SerializeToString() == b"\x82\x01\x00"  # field 16, empty message


def test_hash_filter_split_meta_dump_bytes() -> None:
    meta = eht.HashFilterSplitMetaDump(
        failure_count=0, total_size=3, num_elements=2, fill_rate=1.2
    )
    m = meta.sliding_hash_filter_meta
    m.split_num, m.max_forward_step, m.max_backward_step, m.max_step = 100, 2, 98, 16
    m.head, m.head_increment, m.failure_count = 4, 4, 0
    inner = b"\x08\x64" b"\x10\x02" b"\x18\x62" b"\x20\x10" b"\x28\x04" b"\x30\x04" b"\x38\x00"
    expected = (
        b"\x08\x00" b"\x10\x03" b"\x18\x02"
        + b"\x21" + struct.pack("<d", 1.2)
        + b"\x2a" + bytes([len(inner)]) + inner
    )
    assert meta.SerializeToString() == expected


def test_hash_filter_split_data_dump_is_unpacked() -> None:
    data = eht.HashFilterSplitDataDump(offset=0, data=[0x31, 0x300])
    assert data.SerializeToString() == b"\x08\x00" b"\x10\x31" b"\x10\x80\x06"


def test_defaults_follow_monolith() -> None:
    def f32(x: float) -> float:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])

    assert eht.RandomUniformInitializerConfig().minval == f32(-0.05)
    assert eht.RandomUniformInitializerConfig().maxval == f32(0.05)
    assert eht.SlotExpireTimeConfig().default_expire_time == 36500
    assert eht.EmbeddingHashTableConfig().feature_evict_every_n_hours == 240
    assert eht.EmbeddingHashTableConfig().entry_type == eht.EmbeddingHashTableConfig.PACKED
    assert eht.EntryConfig().entry_type == eht.EntryConfig.TRAINING
    assert eht.AdamOptimizerConfig().beta2 == f32(0.99)
    assert eht.FloatCompressorConfig.OneBit().step_size == 200


def test_optional_bool_none_is_a_ten_byte_varint() -> None:
    msg = hash_table_ops_pb2.HashTableProto(
        export_share_embedding=hash_table_ops_pb2.HashTableProto.kBoolNone
    )
    assert msg.SerializeToString() == b"\x40" + b"\xff" * 9 + b"\x01"
