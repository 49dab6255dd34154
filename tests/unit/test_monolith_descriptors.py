"""Our Monolith-compatible protos against Monolith's own descriptors.

``tests/data/monolith-descriptors.pb`` is Monolith's ``.proto`` files compiled to a
``FileDescriptorSet`` (a copy of ``reference/monolith-descriptors.pb``). Every message
and enum that exists in both, matched by full name, must be declared the same way:
package, names, field numbers, types, type names, labels, defaults, oneofs, options,
nested messages and enum values. Messages of Monolith that monolith-ps does not need
are listed in ``ABSENT_FILES`` with the reason.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from google.protobuf.message import Message

from protos import generate
from protos import optimizer_pb2 as opt

DESCRIPTORS = Path(__file__).resolve().parent.parent / "data" / "monolith-descriptors.pb"

# Monolith files whose messages monolith-ps leaves out, and why. Every other Monolith
# file must be present message for message.
ABSENT_FILES = {
    "google/protobuf/wrappers.proto":
        "protobuf's own wrapper types, imported by the Primus service",
    "monolith/agent_service/agent_service.proto":
        "serving agent (replica discovery): no serving side here",
    "monolith/native_training/alert/alert.proto":
        "training alerts sent to Kafka: not a parameter-server job",
    "monolith/native_training/data/data_op_config.proto":
        "trainer input pipeline (TFRecord features, labels)",
    "monolith/native_training/data/transform/transform_config.proto":
        "trainer input pipeline transforms",
    "monolith/native_training/hooks/ckpt_hooks.proto":
        "TensorFlow session hooks: checkpoints are client calls",
    "monolith/native_training/hooks/controller_hooks.proto":
        "TensorFlow session hooks (stop/save actions)",
    "monolith/native_training/hooks/server/service.proto":
        "training-control service of the hooks",
    "monolith/native_training/model_dump/monolith_model.proto":
        "model dump of the TensorFlow graph",
    "monolith/native_training/model_export/export.proto":
        "serving model export",
    "monolith/native_training/monolith_checkpoint_state.proto":
        "informational checkpoint file, not needed to restore tables (semantics §13.2)",
    "monolith/native_training/proto/ckpt_info.proto":
        "informational checkpoint file, not needed to restore tables (semantics §13.2)",
    "monolith/native_training/proto/debugging_info.proto":
        "debugging tools of the trainer",
    "monolith/native_training/proto/primus_am_service.proto":
        "Primus (YARN) application-master RPCs",
    "monolith/native_training/runtime/ops/logging_ops.proto":
        "machine-health result of TensorFlow logging ops",
    "monolith/native_training/runtime/parameter_sync/parameter_sync.proto":
        "distributed-serving sync client, dropped (docs/monolith-migration.md)",
}

Decl = descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto


def _reference_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())


def _our_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The descriptors of our protos in Monolith's packages (not ``monolith_ps``)."""
    files = []
    for source in generate.proto_sources():
        module = importlib.import_module(f"protos.{source.stem}_pb2")
        fdp = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        if fdp.package == "monolith" or fdp.package.startswith("monolith."):
            files.append(fdp)
    return files


def _walk(
    prefix: str,
    messages: Iterable[descriptor_pb2.DescriptorProto],
    enums: Iterable[descriptor_pb2.EnumDescriptorProto],
) -> Iterator[tuple[str, Decl]]:
    for m in messages:
        name = f"{prefix}.{m.name}" if prefix else m.name
        yield name, m
        yield from _walk(name, m.nested_type, m.enum_type)
    for e in enums:
        yield (f"{prefix}.{e.name}" if prefix else e.name), e


def _declarations(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> dict[str, tuple[descriptor_pb2.FileDescriptorProto, Decl]]:
    """Every message and enum, nested ones included, by full name."""
    return {
        name: (f, decl)
        for f in files
        for name, decl in _walk(f.package, f.message_type, f.enum_type)
    }


REFERENCE = _declarations(_reference_set().file)
OURS = _declarations(_our_files())
SHARED = sorted(set(REFERENCE) & set(OURS))


def _float_default(text: str, kind: int) -> str:
    """A float default as the value it stands for: protoc versions write 0.01 as
    ``0.01`` or ``0.00999999978``, the same float32."""
    value = float(text)
    if kind == descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT:
        return struct.pack("<f", value).hex()
    return struct.pack("<d", value).hex()


def _normal_field(
    field: descriptor_pb2.FieldDescriptorProto,
) -> descriptor_pb2.FieldDescriptorProto:
    out = descriptor_pb2.FieldDescriptorProto()
    out.CopyFrom(field)
    out.ClearField("json_name")  # written by some protoc versions only; not on the wire
    floats = (descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
              descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
    if out.HasField("default_value") and out.type in floats:
        out.default_value = _float_default(out.default_value, out.type)
    return out


def _one_line(message: Message) -> str:
    return " ".join(str(message).split())


def _message_differences(
    name: str, ours: descriptor_pb2.DescriptorProto, ref: descriptor_pb2.DescriptorProto
) -> list[str]:
    out = []
    ours_fields = [f.name for f in ours.field]
    ref_fields = [f.name for f in ref.field]
    if ours_fields != ref_fields:
        out.append(f"{name}: fields {ours_fields} != Monolith's {ref_fields}")
    by_name = {f.name: f for f in ref.field}
    for field in ours.field:
        if field.name in by_name:
            a, b = _normal_field(field), _normal_field(by_name[field.name])
            if a != b:
                out.append(f"{name}.{field.name}: ours {{{_one_line(a)}}} "
                           f"!= Monolith's {{{_one_line(b)}}}")
    oneofs = ([_one_line(o) for o in ours.oneof_decl], [_one_line(o) for o in ref.oneof_decl])
    if oneofs[0] != oneofs[1]:
        out.append(f"{name}: oneofs {oneofs[0]} != Monolith's {oneofs[1]}")
    nested = ([m.name for m in ours.nested_type], [m.name for m in ref.nested_type])
    if sorted(nested[0]) != sorted(nested[1]):
        out.append(f"{name}: nested messages {nested[0]} != Monolith's {nested[1]}")
    enums = ([e.name for e in ours.enum_type], [e.name for e in ref.enum_type])
    if sorted(enums[0]) != sorted(enums[1]):
        out.append(f"{name}: nested enums {enums[0]} != Monolith's {enums[1]}")
    # Everything else of the message itself: options, reserved numbers and names,
    # extension ranges. (Nested declarations are compared under their own names.)
    rest = []
    for d in (ours, ref):
        r = descriptor_pb2.DescriptorProto()
        r.CopyFrom(d)
        for part in ("field", "nested_type", "enum_type", "oneof_decl"):
            r.ClearField(part)
        rest.append(r)
    if rest[0] != rest[1]:
        out.append(f"{name}: {{{_one_line(rest[0])}}} != Monolith's {{{_one_line(rest[1])}}}")
    return out


def _differences(name: str) -> list[str]:
    (our_file, ours), (ref_file, ref) = OURS[name], REFERENCE[name]
    out = []
    if our_file.package != ref_file.package:
        out.append(f"{name}: package {our_file.package!r} != Monolith's {ref_file.package!r}")
    syntax = (our_file.syntax or "proto2", ref_file.syntax or "proto2")
    if syntax[0] != syntax[1]:
        out.append(f"{name}: syntax {syntax[0]} != Monolith's {syntax[1]}")
    if type(ours) is not type(ref):
        kinds = type(ours).__name__, type(ref).__name__
        return [*out, f"{name}: a {kinds[0]} in ours, a {kinds[1]} in Monolith"]
    if isinstance(ours, descriptor_pb2.DescriptorProto):
        assert isinstance(ref, descriptor_pb2.DescriptorProto)
        out += _message_differences(name, ours, ref)
    elif ours != ref:  # enums: names, values, numbers, options
        out.append(f"{name}: ours {{{_one_line(ours)}}} != Monolith's {{{_one_line(ref)}}}")
    return out


def test_the_comparison_covers_our_monolith_protos() -> None:
    # Sanity: the walk found the messages the engine and checkpoints use.
    for name in ("monolith.hash_table.EmbeddingHashTableConfig", "monolith.hash_table.EntryDump",
                 "monolith.hash_table.OptimizerConfig", "monolith.hash_table.InitializerConfig",
                 "monolith.hash_table.FloatCompressorConfig.OneBit",
                 "monolith.hash_table.HashFilterSplitMetaDump", "monolith.HashTableProto",
                 "monolith.HashTableProto.OptionalBool", "monolith.MultiHashTableProto"):
        assert name in SHARED, name
    assert len(SHARED) >= 60


@pytest.mark.parametrize("name", SHARED)
def test_shared_declaration_equals_monolith(name: str) -> None:
    assert _differences(name) == []


def test_every_message_in_a_monolith_package_is_monolith_s() -> None:
    invented = sorted(set(OURS) - set(REFERENCE))
    assert invented == [], f"not in Monolith's protos, yet in its packages: {invented}"


def test_only_the_allowlisted_monolith_files_are_left_out() -> None:
    files = {f.name: f for f in _reference_set().file}
    assert set(ABSENT_FILES) <= set(files), sorted(set(ABSENT_FILES) - set(files))
    for name, f in files.items():
        decls = [n for n, _ in _walk(f.package, f.message_type, f.enum_type)]
        present = [n for n in decls if n in OURS]
        if name in ABSENT_FILES:
            # A file we start to implement leaves the list, so its messages count.
            assert present == [], f"{name} is listed as absent but we have {present}"
        else:
            missing = [n for n in decls if n not in OURS]
            assert missing == [], f"{name}: missing {missing} (or list the file as absent)"


# ---------------------------------------------------------------- wire


def _monolith_class(full_name: str) -> Any:
    """A message class built from Monolith's descriptor (not from our protos)."""
    pool = descriptor_pool.DescriptorPool()
    for f in _reference_set().file:  # the set lists dependencies before their users
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


@pytest.mark.parametrize("times", [3, 1, 0, -1, 2**31 - 1])
def test_hessian_compression_times_crosses_the_wire(times: int) -> None:
    monolith_cfg = _monolith_class("monolith.hash_table.DynamicWdAdagradOptimizerConfig")
    theirs = monolith_cfg(dim_size=8, learning_rate=0.5, hessian_compression_times=times,
                          enable_dynamic_wd=True)
    data = theirs.SerializeToString()
    varint = times & (2**64 - 1)  # int32 -1 is sign-extended to a ten-byte varint
    assert b"\x20" + _varint(varint) in data  # field 4, wire type 0 (varint)

    ours = opt.DynamicWdAdagradOptimizerConfig.FromString(data)
    assert ours.HasField("hessian_compression_times")
    assert ours.hessian_compression_times == times
    assert ours.dim_size == 8 and ours.enable_dynamic_wd
    assert len(unknown_fields.UnknownFieldSet(ours)) == 0
    assert ours.SerializeToString() == data
    back = monolith_cfg.FromString(ours.SerializeToString())
    assert back.HasField("hessian_compression_times")
    assert back.hessian_compression_times == times


def test_hessian_compression_times_inside_an_optimizer_config() -> None:
    monolith_cfg = _monolith_class("monolith.hash_table.OptimizerConfig")
    theirs = monolith_cfg()
    theirs.dynamic_wd_adagrad.hessian_compression_times = 4
    data = theirs.SerializeToString()
    assert data == b"\x2a\x02\x20\x04"  # dynamic_wd_adagrad: field 5 -> field 4 varint
    ours = opt.OptimizerConfig.FromString(data)
    assert ours.WhichOneof("type") == "dynamic_wd_adagrad"
    assert ours.dynamic_wd_adagrad.hessian_compression_times == 4
    assert ours.SerializeToString() == data


def test_hessian_compression_times_defaults_to_one() -> None:
    assert opt.DynamicWdAdagradOptimizerConfig().hessian_compression_times == 1
    assert opt.AdagradOptimizerConfig().hessian_compression_times == 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
