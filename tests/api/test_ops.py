"""What operators and tools see: gRPC health, server reflection, and the error contract."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

SERVICE = "mfa.v1.TwoFactorService"
RPCS = {"Enroll", "Challenge", "Verify", "Disable", "CheckSession", "ListFactors",
        "RevokeSession", "RegenerateRecoveryCodes", "ListAuditEvents", "RecognizeDevice",
        "ListDevices", "ForgetDevice"}
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


# -- health ------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", [pytest.param("", id="server"),
                                     pytest.param(SERVICE, id="TwoFactorService")])
async def test_health_reports_serving(channel: aio.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(channel: aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="mfa.v1.NoSuchService"),
                         timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- reflection --------------------------------------------------------------------------------
async def reflect(channel: aio.Channel, service: str,
                  *requests: reflection_pb2.ServerReflectionRequest,
                  ) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ServerReflectionInfo stream under ``service`` (v1 and v1alpha share the messages)."""
    info = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

    def outgoing() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield from requests

    call = info(outgoing(), timeout=5)
    responses: list[reflection_pb2.ServerReflectionResponse] = [r async for r in call]
    assert len(responses) == len(requests)
    return responses


REFLECTION_NAMES = [pytest.param(REFLECTION_V1, id="v1"),
                    pytest.param(REFLECTION_V1ALPHA, id="v1alpha")]


@pytest.mark.parametrize("reflection", REFLECTION_NAMES)
async def test_reflection_lists_every_service(channel: aio.Channel, reflection: str) -> None:
    [resp] = await reflect(channel, reflection,
                           reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in resp.list_services_response.service}
    assert names >= {SERVICE, "grpc.health.v1.Health", REFLECTION_V1, REFLECTION_V1ALPHA}


@pytest.mark.parametrize("reflection", REFLECTION_NAMES)
async def test_reflection_describes_the_service(channel: aio.Channel, reflection: str) -> None:
    [resp] = await reflect(channel, reflection, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=SERVICE))
    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
    files = {}
    for raw in resp.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[fd.name] = fd
    [main] = [fd for fd in files.values()
              if fd.package == "mfa.v1" and any(s.name == "TwoFactorService" for s in fd.service)]
    [service] = [s for s in main.service if s.name == "TwoFactorService"]
    methods = {m.name: m for m in service.method}
    assert set(methods) == RPCS
    assert (methods["Enroll"].input_type, methods["Enroll"].output_type) == (
        ".mfa.v1.EnrollRequest", ".mfa.v1.EnrollResponse")
    # A client can decode every message from this answer alone: the imports come along.
    assert set(main.dependency) <= set(files), (main.dependency, sorted(files))


@pytest.mark.parametrize("reflection", REFLECTION_NAMES)
async def test_reflection_describes_every_listed_service(
        channel: aio.Channel, reflection: str) -> None:
    """What `grpcurl describe` needs: every listed service resolves to its file."""
    [listed] = await reflect(channel, reflection,
                             reflection_pb2.ServerReflectionRequest(list_services=""))
    names = [s.name for s in listed.list_services_response.service]
    answers = await reflect(channel, reflection, *[
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names])
    unresolved = [n for n, r in zip(names, answers, strict=True)
                  if r.WhichOneof("message_response") != "file_descriptor_response"]
    assert unresolved == []
    for name, resp in zip(names, answers, strict=True):
        package, _, service = name.rpartition(".")
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in resp.file_descriptor_response.file_descriptor_proto]
        assert any(fd.package == package and service in {s.name for s in fd.service}
                   for fd in files), name


@pytest.mark.parametrize("reflection", REFLECTION_NAMES)
async def test_reflection_unknown_symbol_is_not_found(
        channel: aio.Channel, reflection: str) -> None:
    [resp] = await reflect(channel, reflection, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="mfa.v1.NoSuchService"))
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# -- error contract ----------------------------------------------------------------------------


