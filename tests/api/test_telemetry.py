"""Traces, metrics and log correlation, as an operator's backend receives them.

A full flow (enrol an app, log in, wrong codes up to a lockout, an email code through the
outbox to a real SMTP server, CheckSession, revoke) runs against a server built with
in-memory exporters; then every span and every metric data point is read back: the RPC
spans with their status and the caller's trace continued, SQL and outbox spans as
children, the counters and gauges with their labels, and no id, address, code or token
in any attribute. Then the same server is configured the production way, pointed at a
real OTLP/HTTP receiver on loopback (spans and metrics arrive as protobuf) and at a
Prometheus scrape endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pyotp
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mfa_service import telemetry
from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.logs import JsonFormatter
from tests.support.client import AppFactor, enroll_app, login, totp_at
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.fakes import HttpServer, RecordingHandler
from tests.support.rig import Rig, delivery_settings, enroll_email

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

SERVICE = "/mfa.v1.TwoFactorService/"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class JsonLines(logging.Handler):
    """Formats each record as it is emitted (while its span is still current)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@dataclass
class Observed:
    rig: Rig
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    logs: JsonLines


@pytest.fixture
async def observed(database_url: str, smtp: tuple[RecordingHandler, int],
                   provider: HttpServer, fresh_clock: FixedClock) -> AsyncIterator[Observed]:
    handler, port = smtp
    spans, reader, logs = InMemorySpanExporter(), InMemoryMetricReader(), JsonLines()
    rpc_log = logging.getLogger("mfa_service.rpc")
    rpc_log.addHandler(logs)
    saved_level = rpc_log.level
    rpc_log.setLevel(logging.INFO)
    app = await create_server(
        delivery_settings(database_url, port, provider), clock=fresh_clock,
        keyring=Keyring.parse(TEST_KEYRING),
        observability=telemetry.Telemetry.create(
            span_processors=[SimpleSpanProcessor(spans)], metric_readers=[reader],
            metrics_poll_seconds=0.05))
    channel = aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub: Stub = pb_grpc.TwoFactorServiceStub(channel)

    async def no_restart(**_: Any) -> App:
        raise AssertionError("not used here")

    try:
        yield Observed(Rig(app, stub, fresh_clock, handler, provider, no_restart), spans,
                       reader, logs)
    finally:
        rpc_log.removeHandler(logs)
        rpc_log.setLevel(saved_level)
        await channel.close()
        await app.stop(0)


def wrong_code(secret: str, clock: FixedClock) -> str:
    near = {pyotp.TOTP(secret).at(clock.now(), counter_offset=s) for s in range(-2, 3)}
    candidate = 0
    while f"{candidate:06d}" in near:
        candidate += 1
    return f"{candidate:06d}"


@dataclass
class Flow:
    """What the flow handed out: everything that must never be a label or attribute."""

    secrets: list[str]
    traced_check_span: str = ""


async def full_flow(o: Observed, user_id: str) -> Flow:
    rig, stub, clock = o.rig, o.rig.stub, o.rig.clock
    factor: AppFactor = await enroll_app(stub, user_id, clock)
    session = await login(stub, factor, clock)
    flow = Flow([user_id, factor.factor_id, factor.secret, session.session_token,
                 session.session_token[:16]])
    # The portal's trace goes on in ours: CheckSession with the caller's traceparent.
    check = await stub.CheckSession(
        pb.CheckSessionRequest(session_token=session.session_token,
                               application=pb.APPLICATION_BACKOFFICE),
        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),))
    assert check.valid
    unknown = await stub.CheckSession(pb.CheckSessionRequest(
        session_token="x" * 43, application=pb.APPLICATION_PORTAL))
    assert not unknown.valid
    # Wrong codes until the user is locked out; then a challenge is refused.
    for _ in range(5):
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        flow.secrets.append(ch.challenge_id)
        bad = wrong_code(factor.secret, clock)
        result = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=bad))
        assert result.result == pb.VERIFY_RESULT_INVALID_CODE
    with pytest.raises(aio.AioRpcError) as locked:
        await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
    assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # An email factor for another user: the code goes through the outbox to SMTP.
    mail_user = f"{user_id}-mail"
    email_factor, address = await enroll_email(rig, mail_user)
    flow.secrets += [mail_user, email_factor, address, address.split("@")[0]]
    flow.secrets += [code for m in rig.mails_to(address)
                     for code in __import__("re").findall(r"\b\d{6}\b", m.get_content())]
    flow.secrets += rig.recovery_codes[mail_user]
    revoked = await stub.RevokeSession(pb.RevokeSessionRequest(
        session_token=session.session_token))
    assert revoked.revoked_count == 1
    flow.secrets.append(totp_at(factor.secret, clock))
    return flow


def points(data: MetricsData | None) -> Iterator[tuple[str, dict[str, Any], Any]]:
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    yield metric.name, dict(point.attributes or {}), point


def count(data: MetricsData | None, name: str, attrs: dict[str, str] | None = None) -> float:
    """A counter's sum (a histogram's count) over the points that carry ``attrs``."""
    return float(sum(p.count if hasattr(p, "bucket_counts") else p.value
                     for n, a, p in points(data)
                     if n == name and all(a.get(k) == v for k, v in (attrs or {}).items())))


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_full_flow_is_traced_and_measured(observed: Observed, user_id: str) -> None:
    flow = await full_flow(observed, user_id)
    await asyncio.sleep(0.2)  # the outbox gauges are read every 50 ms
    spans = observed.spans.get_finished_spans()

    # Every RPC is a server span with its gRPC status.
    verify = by_name(spans, SERVICE + "Verify")
    assert len(verify) >= 7 and all(s.status.status_code is not StatusCode.ERROR
                                    for s in verify)
    # The lockout's refusal carries its code; a caller's error is not a server fault
    # (semantic conventions: only UNKNOWN, INTERNAL, UNAVAILABLE ... mark a server span ERROR).
    [refused] = [s for s in by_name(spans, SERVICE + "Challenge")
                 if (s.attributes or {})["rpc.grpc.status_code"] != 0]
    assert (refused.attributes or {})["rpc.grpc.status_code"] == \
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert refused.status.status_code is StatusCode.UNSET
    # The caller's trace goes on: same trace id, the caller's span as parent.
    [traced] = [s for s in by_name(spans, SERVICE + "CheckSession")
                if format(s.context.trace_id, "032x") == TRACE_ID]
    assert traced.parent is not None and format(traced.parent.span_id, "016x") == PARENT_SPAN
    # SQL statements are children of the RPC that ran them.
    children = [s for s in spans if s.parent is not None
                and s.parent.span_id == verify[0].context.span_id]
    assert children and all((s.attributes or {}).get("db.system") for s in children)
    # An outbox send is a span of its own, with its SQL under it; no destination.
    # (Other tests' leftover messages in the shared database may be expired by this
    # server's dispatcher: pick the sent one.)
    [send, *_] = [s for s in by_name(spans, "outbox send")
                  if (s.attributes or {}).get("mfa.outcome") == "sent"]
    assert dict(send.attributes or {}) == {
        "mfa.channel": "email", "mfa.message.kind": "code", "mfa.attempt": 1,
        "mfa.outcome": "sent"}
    assert any(s.parent is not None and s.parent.span_id == send.context.span_id
               for s in spans)
    # No orphan SQL traces from background work (health probe, dispatcher polls).
    assert all(s.parent is not None for s in spans if (s.attributes or {}).get("db.system"))

    # The access log line of a traced call names its trace and span.
    [line] = [e for e in observed.logs.lines
              if e.get("rpc") == "CheckSession" and e.get("trace_id") == TRACE_ID]
    assert line["span_id"] == format(traced.context.span_id, "016x")

    data = observed.metrics.get_metrics_data()
    assert count(data, "rpc.server.call.duration",
                 {"rpc.method": "Verify", "rpc.response.status_code": "OK"}) >= 7
    assert count(data, "rpc.server.call.duration",
                 {"rpc.method": "Challenge", "rpc.response.status_code": "RESOURCE_EXHAUSTED"}) == 1
    assert count(data, "mfa.verifications",
                 {"mfa.method": "authenticator_app", "mfa.result": "invalid_code"}) >= 4
    assert count(data, "mfa.verifications",
                 {"mfa.method": "authenticator_app", "mfa.result": "approved"}) >= 2
    assert count(data, "mfa.verifications", {"mfa.method": "email", "mfa.result": "approved"}) >= 1
    assert count(data, "mfa.lockouts") >= 1
    assert count(data, "mfa.outbox.deliveries",
                 {"mfa.channel": "email", "mfa.message.kind": "code", "mfa.outcome": "sent"}) >= 1
    assert count(data, "mfa.sessions.created", {"mfa.application": "portal"}) >= 1
    assert count(data, "mfa.sessions.checked", {"mfa.session.valid": "true"}) >= 1
    assert count(data, "mfa.sessions.checked", {"mfa.session.valid": "false"}) >= 1
    assert count(data, "mfa.sessions.revoked", {"mfa.revoke.scope": "logout"}) >= 1
    gauges = {n for n, _, _ in points(data)}
    assert {"mfa.outbox.depth", "mfa.outbox.oldest_pending_age",
            "db.client.connection.count"} <= gauges

    # No user id, factor/challenge id, address, code, token in any attribute or label.
    everything = [observed.metrics.get_metrics_data().to_json()]  # type: ignore[union-attr]
    everything += [s.to_json() for s in spans]
    leaks = [(secret, where[:200]) for secret in flow.secrets if len(secret) >= 6
             for where in everything if secret in where]
    assert not leaks, leaks


# -- the production configuration: OTLP over HTTP, Prometheus -------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_spans_and_metrics_arrive_at_an_otlp_receiver_and_a_scrape(
        sqlite_url: str, provider: HttpServer, clock: FixedClock, user_id: str) -> None:
    collector = provider  # a real HTTP server on loopback, recording every POST
    collector.body = b""
    metrics_port = _free_port()
    settings = make_settings(
        sqlite_url, otlp_endpoint=collector.url(""), otlp_protocol="http/protobuf",
        otel_service_name="mfa-test", otel_metric_export_interval_ms=200,
        metrics_addr=f"127.0.0.1:{metrics_port}")
    app = await create_server(settings, clock=clock, keyring=Keyring.parse(TEST_KEYRING))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
            factor = await enroll_app(stub, user_id, clock)
            await login(stub, factor, clock)
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    finally:
        await app.stop(0)  # flushes: the last spans and metrics go out now
    assert 'rpc_method="Verify"' in scraped and "rpc_server_call_duration" in scraped
    assert "mfa_verifications_total" in scraped

    traces = [ExportTraceServiceRequest.FromString(r.body) for r in collector.requests
              if r.path == "/v1/traces"]
    metrics = [ExportMetricsServiceRequest.FromString(r.body) for r in collector.requests
               if r.path == "/v1/metrics"]
    assert {r.headers["content-type"] for r in collector.requests} == {
        "application/x-protobuf"}
    names = {span.name for req in traces for rs in req.resource_spans
             for ss in rs.scope_spans for span in ss.spans}
    assert {SERVICE + "Enroll", SERVICE + "Verify", SERVICE + "Challenge"} <= names
    services = {a.value.string_value for req in traces for rs in req.resource_spans
                for a in rs.resource.attributes if a.key == "service.name"}
    assert services == {"mfa-test"}
    metric_names = {m.name for req in metrics for rm in req.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics}
    assert {"rpc.server.call.duration", "mfa.verifications", "mfa.sessions.created"} <= (
        metric_names)
