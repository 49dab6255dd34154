"""Server reflection under both names, ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) ships only the deprecated v1alpha service, while current
clients (grpcurl among them) ask for v1 first. The v1 proto is the v1alpha proto
under another package: the same messages with the same field numbers, so the same
bytes on the wire. One v1alpha servicer therefore answers both services, decoding
and encoding with the v1alpha message classes; and a v1 copy of the v1alpha file
descriptor is added to the default descriptor pool so that a client can describe the
v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["SERVICE_NAMES", "V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_server_reflection"]

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
_V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{_V1_PACKAGE}.ServerReflection"
#: Both reflection services, newest first.
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
#: The file name grpc gives the v1 proto (grpc/reflection/v1/reflection.proto upstream).
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1alpha reflection file descriptor moved to package ``grpc.reflection.v1``."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{_V1_PACKAGE}."

    def moved(type_name: str) -> str:
        assert type_name.startswith(old), type_name
        return new + type_name[len(old):]

    proto.name = _V1_FILE
    proto.package = _V1_PACKAGE
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # set only on message fields; scalars have none
                f.type_name = moved(f.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = moved(method.input_type)
            method.output_type = moved(method.output_type)
    # The upstream v1 file's options (v1alpha's name other packages and is deprecated).
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def _ensure_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)  # added before (another server in this process)
    except KeyError:
        pool.AddSerializedFile(_v1_file_descriptor().SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) on ``server``.

    The descriptors come from the default pool, as with
    ``grpc_reflection.v1alpha.reflection.enable_server_reflection``.
    """
    _ensure_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))
    rpc = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": rpc})
              for name in SERVICE_NAMES)
    )
