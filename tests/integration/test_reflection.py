"""Server reflection of a real shard under both names, v1 (what grpcurl asks first) and v1alpha.

The two reflection protos carry the same messages with the same field numbers, so the
v1alpha message classes encode and decode v1 calls byte for byte; the v1 calls here go
through a raw channel method on the v1 path.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.integration

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
EXPECTED = {
    "monolith_ps.ParameterServer",
    "monolith_ps.ParameterServerAdmin",
    "grpc.health.v1.Health",
    V1,
    V1ALPHA,
}


def _ask(
    channel: grpc.Channel, service: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answers: Iterator[reflection_pb2.ServerReflectionResponse] = call(iter(requests), timeout=10)
    return list(answers)


def _files(
    resp: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in resp.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("service", [V1, V1ALPHA])
def test_list_services(server: RunningServer, service: str) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = _ask(server.channel, service, request)
    assert resp.WhichOneof("message_response") == "list_services_response", resp
    assert {s.name for s in resp.list_services_response.service} == EXPECTED


@pytest.mark.parametrize("service", [V1, V1ALPHA])
def test_describe_the_data_plane(server: RunningServer, service: str) -> None:
    """``grpcurl describe``: the file defining a service, found by its symbol."""
    (resp,) = _ask(
        server.channel,
        service,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="monolith_ps.ParameterServer"),
    )
    services = {f"{f.package}.{s.name}" for f in _files(resp) for s in f.service}
    assert "monolith_ps.ParameterServer" in services


def test_v1_describes_itself(server: RunningServer) -> None:
    (resp,) = _ask(
        server.channel, V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1)
    )
    (f,) = _files(resp)
    assert f.package == "grpc.reflection.v1"
    (svc,) = f.service
    (method,) = svc.method
    assert (svc.name, method.name) == ("ServerReflection", "ServerReflectionInfo")
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type == ".grpc.reflection.v1.ServerReflectionResponse"
    assert method.client_streaming and method.server_streaming


def test_several_requests_on_one_v1_stream(server: RunningServer) -> None:
    """A client keeps one stream open for its questions; each gets its answer in order."""
    answers = _ask(
        server.channel,
        V1,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
    )
    assert [a.WhichOneof("message_response") for a in answers] == [
        "list_services_response",
        "file_descriptor_response",
        "error_response",
    ]
    assert answers[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
