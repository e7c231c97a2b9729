"""OpenTelemetry: traces and metrics, exported over OTLP, to the console or scraped.

What is on, from settings (``cli`` reads them once, including the standard ``OTEL_*``
variables; see settings.py):

* **Traces** when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (OTLP over ``grpc`` or
  ``http/protobuf``) or ``MFA_OTEL_EXPORTER=console`` (development). Then every RPC is a
  server span (the gRPC instrumentation, continuing a W3C ``traceparent`` from the
  caller's metadata), every SQL statement a child span (the SQLAlchemy instrumentation on
  our engine), and every outbox send a span with the provider's HTTP call under it.
  Otherwise there is no tracer provider, no gRPC interceptor and no SQL hook at all:
  nothing is built per call for nobody (issue #8's profile).
* **Metrics** when there is an OTLP endpoint, a console exporter or ``MFA_METRICS_ADDR``
  (a Prometheus scrape endpoint). Instruments are made once (``Metrics``); the hot paths
  record with attribute dicts built once per label combination, and the per-call ones
  cost no SDK call at all: the RPC duration histogram is aggregated in plain ints and
  handed to each reader when it collects (``RpcDurations``), the CheckSession counter is
  observed at collection. Gauges that need the
  database (outbox depth, oldest pending message) are read by one background task every
  ``MFA_METRICS_POLL_SECONDS``, never per request.

No attribute or label ever holds a user id, code, token, address or factor/challenge id:
labels are RPC names, status codes, enum values (method, result, channel, outcome,
application) only. Span attributes are the instrumentations' own (RPC name, peer, SQL text
with bound parameters never rendered, provider host) plus the channel and kind of a send.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.util.types import Attributes

from mfa_service import __version__
from mfa_service.domain import AuditEventType

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from mfa_service.settings import Settings

log = logging.getLogger("mfa_service")

# RPC latency buckets in seconds (OpenTelemetry's semantic conventions for
# rpc.server.call.duration), from a cache hit to a provider timeout.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                    0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

METER_NAME = "mfa_service"
RPC_DURATION = "rpc.server.call.duration"
RPC_DURATION_DESCRIPTION = "Duration of TwoFactorService calls, by method and status code"


class _Series:
    """One label pair's histogram, cumulative, with each reader's min and max since it
    last collected (a delta reader's interval, or all time for a cumulative one)."""

    __slots__ = ("buckets", "count", "maxima", "minima", "total")

    def __init__(self, buckets: int, readers: int) -> None:
        self.buckets = [0] * buckets
        self.count = 0
        self.total = 0.0
        self.minima = [math.inf] * readers
        self.maxima = [-math.inf] * readers


class RpcDurations:
    """``rpc.server.call.duration``, aggregated here in plain ints and handed to each
    metric reader when it collects (``attach``), instead of the SDK's Histogram.

    Why: the SDK cleans, copies and hashes the attributes of every measurement. Its
    ``record`` took 9 µs per call in a loop here, and with the Prometheus endpoint on, a
    cached CheckSession cost the server 25 µs more CPU with it than without it under load
    (185-201 against 167 µs per call, docs/BENCHMARKS.md): the largest single cost on
    the hottest call. Here a call is a dictionary lookup, a bisect and a few adds under
    a lock (readers collect on threads of their own).

    What a reader receives is what the SDK would have made: an explicit-bucket histogram
    per label pair (bucket i counts values in (bounds[i-1], bounds[i]]), cumulative or
    delta as the reader prefers for histograms, in this meter's scope.
    """

    def __init__(self, bounds: Sequence[float], resource: Resource) -> None:
        self._bounds = tuple(bounds)
        self._resource = resource
        self._series: dict[tuple[str, str], _Series] = {}
        self._attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._readers = 0
        self._lock = threading.Lock()
        self._started = time.time_ns()

    def record(self, rpc: str, code: str, seconds: float) -> None:
        key = (rpc, code)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self._bounds) + 1, self._readers)
                self._attrs[key] = {"rpc.method": rpc, "rpc.response.status_code": code}
            series.buckets[bisect.bisect_left(self._bounds, seconds)] += 1
            series.count += 1
            series.total += seconds
            minima, maxima = series.minima, series.maxima
            for r in range(len(minima)):
                if seconds < minima[r]:
                    minima[r] = seconds
                if seconds > maxima[r]:
                    maxima[r] = seconds

    def attach(self, reader: MetricReader) -> None:
        """Add these histograms to what ``reader`` receives at every collection. Done
        before anything is recorded (Telemetry.create)."""
        with self._lock:
            index = self._readers
            self._readers += 1
            for series in self._series.values():  # (none yet where Telemetry attaches)
                series.minima.append(math.inf)
                series.maxima.append(-math.inf)
        delta = _prefers_delta(reader)
        previous: dict[tuple[str, str], tuple[int, float, list[int]]] = {}
        since = [self._started]
        receive = reader._receive_metrics

        def receive_with_durations(metrics_data: MetricsData, *args: Any,
                                   **kwargs: Any) -> None:
            now = time.time_ns()
            points = self._points(index, delta, previous, since[0], now)
            since[0] = now
            receive(self._added(metrics_data, points, delta), *args, **kwargs)

        reader._receive_metrics = receive_with_durations  # type: ignore[method-assign]

    def _points(self, index: int, delta: bool,
                previous: dict[tuple[str, str], tuple[int, float, list[int]]],
                since: int, now: int) -> list[HistogramDataPoint]:
        points = []
        with self._lock:
            for key, series in self._series.items():
                count, total, buckets = series.count, series.total, list(series.buckets)
                low, high = series.minima[index], series.maxima[index]
                start = self._started
                if delta:
                    series.minima[index], series.maxima[index] = math.inf, -math.inf
                    before = previous.get(key)
                    previous[key] = (count, total, buckets)
                    if before is not None:
                        count, total = count - before[0], total - before[1]
                        buckets = [a - b for a, b in zip(buckets, before[2], strict=True)]
                    start = since
                    if count == 0:
                        continue
                points.append(HistogramDataPoint(
                    attributes=self._attrs[key], start_time_unix_nano=start,
                    time_unix_nano=now, count=count, sum=total, bucket_counts=buckets,
                    explicit_bounds=self._bounds, min=low, max=high))
        return points

    def _added(self, data: MetricsData, points: list[HistogramDataPoint],
               delta: bool) -> MetricsData:
        if not points:
            return data
        metric = Metric(name=RPC_DURATION, description=RPC_DURATION_DESCRIPTION, unit="s",
                        data=Histogram(data_points=points, aggregation_temporality=(
                            AggregationTemporality.DELTA if delta
                            else AggregationTemporality.CUMULATIVE)))
        first, *rest = data.resource_metrics or [
            ResourceMetrics(resource=self._resource, scope_metrics=[], schema_url="")]
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == METER_NAME:
                scopes[i] = ScopeMetrics(scope=scope.scope, metrics=[*scope.metrics, metric],
                                         schema_url=scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(scope=InstrumentationScope(METER_NAME, __version__),
                                       metrics=[metric], schema_url=""))
        return MetricsData(resource_metrics=[
            ResourceMetrics(resource=first.resource, scope_metrics=scopes,
                            schema_url=first.schema_url), *rest])


def _prefers_delta(reader: MetricReader) -> bool:
    """Whether ``reader`` asked for delta histograms (an OTLP exporter set to delta)."""
    preferred = getattr(reader, "_instrument_class_temporality", {})
    return any(isinstance(cls, type) and issubclass(cls, HistogramInstrument)
               and temporality is AggregationTemporality.DELTA
               for cls, temporality in preferred.items())


class Metrics:
    """Every instrument of the service, made once per process.

    Label values are bounded enums only (RPC name, status code, method, result, channel,
    kind, outcome, application, revocation scope, limit): never an id, address, code or
    token (nor a send refusal's country: ~250 values, in the audit row instead).
    """

    def __init__(self, meter: Meter, rpc_durations: RpcDurations) -> None:
        # rpc.server.call.duration: aggregated outside the SDK (RpcDurations).
        self._rpc_durations = rpc_durations
        self._verifications = meter.create_counter(
            "mfa.verifications", unit="{verification}",
            description="Codes checked (Verify and Disable), by factor method and result")
        self._lockouts = meter.create_counter(
            "mfa.lockouts", unit="{lockout}", description="Users locked out after failures")
        self._deliveries = meter.create_counter(
            "mfa.outbox.deliveries", unit="{message}",
            description="Outbox delivery attempts, by channel, kind (code or notice) and "
                        "outcome (sent, retry, failed, expired, superseded)")
        self._send_refusals = meter.create_counter(
            "mfa.sends.refused", unit="{code}",
            description="Phone codes refused by a cap across users, by limit "
                        "(phone_prefix, phone_country, phone_daily_budget)")
        self._sessions_created = meter.create_counter(
            "mfa.sessions.created", unit="{session}",
            description="2FA sessions opened, by application")
        # CheckSession runs on every page: counted in plain ints (a list index and an
        # add, ~0.1 us) and reported at collection, instead of an SDK counter's ~13 us per
        # call (measured) on the hottest path.
        self._checks = [0, 0]  # [invalid, valid]
        meter.create_observable_counter(
            "mfa.sessions.checked", [self._observe_checks], unit="{check}",
            description="CheckSession answers, valid or not")
        self._sessions_revoked = meter.create_counter(
            "mfa.sessions.revoked", unit="{session}",
            description="2FA sessions ended, by scope (logout, all_sessions, factor_removed)")
        # Attribute dicts, made once per label combination (the SDK keys its aggregation
        # by them; building a new dict per call is the cost to avoid on CheckSession).
        self._valid = {"mfa.session.valid": "true"}
        self._invalid = {"mfa.session.valid": "false"}
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}
        self._backlog: tuple[int, float] = (0, 0.0)
        self._pools: list[Any] = []
        meter.create_observable_gauge(
            "mfa.outbox.depth", [self._observe_depth], unit="{message}",
            description="Messages waiting in the outbox (pending), read periodically")
        meter.create_observable_gauge(
            "mfa.outbox.oldest_pending_age", [self._observe_age], unit="s",
            description="Age of the oldest pending outbox message (0 when none)")
        meter.create_observable_up_down_counter(
            "db.client.connection.count", [self._observe_pool], unit="{connection}",
            description="Database connections of this process's pool, used or idle")

    # -- the hot paths ------------------------------------------------------------------
    def rpc(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self._rpc_durations.record(rpc, code.name, seconds)

    def session_checked(self, valid: bool) -> None:
        self._checks[valid] += 1

    # -- the rest -------------------------------------------------------------------------
    def _labels(self, *pairs: str) -> dict[str, str]:
        attrs = self._attrs.get(pairs)
        if attrs is None:
            attrs = self._attrs[pairs] = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return attrs

    def delivery(self, channel: str, kind: str, outcome: str) -> None:
        self._deliveries.add(1, self._labels(
            "mfa.channel", channel, "mfa.message.kind", kind, "mfa.outcome", outcome))

    def audit_events(self, events: Sequence[tuple[str, str, Mapping[str, Any] | None]]) -> None:
        """Count the security events of a transaction that committed (store listener)."""
        for event, _outcome, detail in events:
            detail = detail or {}
            if event == AuditEventType.VERIFY:
                self._verifications.add(1, self._labels(
                    "mfa.method", str(detail.get("method", "unknown")),
                    "mfa.result", str(detail.get("result", "unknown"))))
            elif event == AuditEventType.LOCKOUT:
                self._lockouts.add(1)
            elif event == AuditEventType.SEND_REFUSED:
                self._send_refusals.add(1, self._labels(
                    "mfa.limit", str(detail.get("limit", "unknown")),
                    "mfa.method", str(detail.get("method", "unknown"))))
            elif event == AuditEventType.SESSION_CREATED:
                self._sessions_created.add(1, self._labels(
                    "mfa.application", str(detail.get("application", "unknown"))))
            elif event == AuditEventType.SESSION_REVOKED:
                self._sessions_revoked.add(1, self._labels(
                    "mfa.revoke.scope", str(detail.get("scope", "unknown"))))

    def set_backlog(self, depth: int, oldest_age_seconds: float) -> None:
        self._backlog = (depth, oldest_age_seconds)

    def watch_pool(self, engine: AsyncEngine) -> None:
        self._pools.append(engine.pool)

    def _observe_checks(self, _options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._checks[1], self._valid)
        yield Observation(self._checks[0], self._invalid)

    def _observe_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._backlog[0])

    def _observe_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._backlog[1])

    def _observe_pool(self, _options: CallbackOptions) -> Iterable[Observation]:
        used = idle = 0
        for pool in self._pools:
            used += int(getattr(pool, "checkedout", lambda: 0)())
            idle += int(getattr(pool, "checkedin", lambda: 0)())
        yield Observation(used, {"db.client.connection.state": "used"})
        yield Observation(idle, {"db.client.connection.state": "idle"})


class _NoOrphanClientSpans(Sampler):
    """Client spans (SQL, HTTP) only inside a trace: the health probe, the purge and the
    dispatcher's idle polls would otherwise each start a trace of their own every few
    seconds. Everything else goes to the configured sampler."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(self, parent_context: Any, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        if kind is SpanKind.CLIENT and not trace.get_current_span(
                parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes,
                                         links, trace_state)

    def get_description(self) -> str:
        return f"NoOrphanClientSpans{{{self._inner.get_description()}}}"


def sampler_from(name: str, arg: float | None) -> Sampler:
    """The sampler named by ``OTEL_TRACES_SAMPLER`` (the specification's values)."""
    ratio = 1.0 if arg is None else arg
    samplers: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    return samplers[name]()


@dataclass
class Telemetry:
    """The process's tracer and meter providers (either may be off) and what they own."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    metrics: Metrics | None = None
    metrics_poll_seconds: float = 15.0
    _prometheus: Any = None  # (server, thread) of the scrape endpoint
    _poller: asyncio.Task[None] | None = None
    _stop: asyncio.Event | None = None

    @classmethod
    def create(cls, *, span_processors: Sequence[SpanProcessor] = (),
               metric_readers: Sequence[MetricReader] = (), service_name: str = "mfa-service",
               sampler: Sampler = ALWAYS_ON, resource_attributes: Mapping[str, str] | None = None,
               metrics_poll_seconds: float = 15.0) -> Telemetry:
        """Providers for these processors and readers (none: that signal is off).

        Providers are the process's own, never the global ones: tests build several
        servers, each with in-memory exporters."""
        resource = Resource.create({
            "service.name": service_name, "service.version": __version__,
            # Unique per process: several workers (and replicas) export the same series
            # names, and cumulative metrics from two processes must not merge.
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-"
                                   f"{uuid.uuid4().hex[:8]}",
            **(resource_attributes or {})})
        tracer_provider = None
        if span_processors:
            tracer_provider = TracerProvider(resource=resource,
                                             sampler=_NoOrphanClientSpans(sampler))
            for processor in span_processors:
                tracer_provider.add_span_processor(processor)
        meter_provider = metrics = None
        if metric_readers:
            durations = RpcDurations(_LATENCY_BUCKETS, resource)
            for reader in metric_readers:
                durations.attach(reader)
            meter_provider = MeterProvider(metric_readers=list(metric_readers),
                                           resource=resource)
            metrics = Metrics(meter_provider.get_meter(METER_NAME, __version__), durations)
        return cls(tracer_provider, meter_provider, metrics, metrics_poll_seconds)

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def tracer(self, name: str) -> Tracer | None:
        if self.tracer_provider is None:
            return None
        return self.tracer_provider.get_tracer(name, __version__)

    def server_interceptor(self) -> aio.ServerInterceptor | None:
        """A span per RPC (continuing the caller's traceparent), or None when tracing is off."""
        if self.tracer_provider is None:
            return None
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider)
        return interceptor

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """SQL statements as child spans of the current span; the pool gauge."""
        if self.metrics is not None:
            self.metrics.watch_pool(engine)
        if self.tracer_provider is None:
            return
        # EngineTracer is what SQLAlchemyInstrumentor().instrument(engine=...) attaches;
        # used directly because the instrumentor is a process-wide singleton that
        # instruments once, and each server here owns its engine. It hooks the sync
        # engine's cursor events, which run in the greenlet of the awaiting task, so the
        # current span (the RPC's) is the parent. Its pool counter is ours (above).
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

        EngineTracer(self.tracer_provider.get_tracer(  # type: ignore[no-untyped-call]
            "opentelemetry.instrumentation.sqlalchemy", __version__),
            engine.sync_engine, NoOpMeter("unused").create_up_down_counter("unused"))

    def http_transport(self) -> Any:
        """An httpx transport that makes a client span per provider request (None: plain)."""
        if self.tracer_provider is None:
            return None
        import httpx
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport

        return AsyncOpenTelemetryTransport(httpx.AsyncHTTPTransport(),
                                           tracer_provider=self.tracer_provider,
                                           request_hook=_origin_only)

    def serve_prometheus(self, addr: str, registry: Any) -> int:
        """Start the scrape endpoint (a daemon thread); returns its port."""
        from prometheus_client import start_http_server

        host, _, port = addr.rpartition(":")
        server, thread = start_http_server(int(port), addr=host.strip("[]"),
                                           registry=registry)
        self._prometheus = (server, thread)
        return int(server.server_port)

    def start(self, backlog: Callable[[], Any]) -> None:
        """Read the outbox gauges every ``metrics_poll_seconds`` (``backlog()`` returns
        ``(depth, oldest_created_at | None, now)``)."""
        if self.metrics is None:
            return
        self._stop = asyncio.Event()
        self._poller = asyncio.create_task(self._poll_backlog(backlog, self._stop),
                                           name="metrics-poll")

    async def _poll_backlog(self, backlog: Callable[[], Any], stop: asyncio.Event) -> None:
        assert self.metrics is not None
        while not stop.is_set():
            try:
                depth, oldest, now = await backlog()
                age = (now - oldest).total_seconds() if oldest is not None else 0.0
                self.metrics.set_backlog(int(depth), max(0.0, age))
            except Exception:  # a metric must never take the process down
                log.warning("outbox gauges not read", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.metrics_poll_seconds)

    async def shutdown(self) -> None:
        """Stop reading the gauges (before the database closes: a read is let finish, not
        cancelled inside its transaction), export what is buffered, stop the scrape
        endpoint (blocking exporters run in a thread)."""
        if self._poller is not None and self._stop is not None:
            self._stop.set()
            await self._poller
            self._poller = None
        if self._prometheus is not None:
            server, thread = self._prometheus
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                await asyncio.to_thread(provider.shutdown)


def configure(settings: Settings) -> Telemetry:
    """Telemetry from settings: OTLP when an endpoint is set, console in development,
    the Prometheus endpoint on ``MFA_METRICS_ADDR``; nothing at all otherwise."""
    processors: list[SpanProcessor] = []
    readers: list[MetricReader] = []
    interval_ms = settings.otel_metric_export_interval_ms
    if settings.otel_exporter == "console":
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        readers.append(PeriodicExportingMetricReader(
            ConsoleMetricExporter(), export_interval_millis=interval_ms))
    if settings.otlp_endpoint:
        span_exporter, metric_exporter = _otlp_exporters(
            settings.otlp_endpoint, settings.otlp_protocol)
        processors.append(BatchSpanProcessor(span_exporter))
        readers.append(PeriodicExportingMetricReader(
            metric_exporter, export_interval_millis=interval_ms))
    registry = None
    if settings.metrics_addr is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
    telemetry = Telemetry.create(
        span_processors=processors, metric_readers=readers,
        service_name=settings.otel_service_name,
        sampler=sampler_from(settings.otel_traces_sampler, settings.otel_traces_sampler_arg),
        resource_attributes=_parse_pairs(settings.otel_resource_attributes),
        metrics_poll_seconds=settings.metrics_poll_seconds)
    if registry is not None and settings.metrics_addr is not None:
        port = telemetry.serve_prometheus(settings.worker_metrics_addr(), registry)
        log.info("metrics endpoint", extra={"metrics_port": port})
    return telemetry


def _otlp_exporters(endpoint: str, protocol: str) -> tuple[Any, Any]:
    """OTLP span and metric exporters. Headers, timeouts, certificates and compression
    come from the exporters' own ``OTEL_EXPORTER_OTLP_*`` variables."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=endpoint), GrpcMetricExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # http/protobuf: the base endpoint gets the per-signal paths (OTLP specification).
    base = endpoint.rstrip("/")
    return (OTLPSpanExporter(endpoint=f"{base}/v1/traces"),
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))


async def _origin_only(span: Any, request: Any) -> None:
    """Keep only scheme, host and port of a provider URL in the span: a webhook's path or
    query may hold a secret, and Twilio's path holds the account SID."""
    if not span.is_recording():
        return
    url = request.url
    parts = url[:3] if isinstance(url, tuple) else (url.scheme, url.host, url.port)
    scheme, host, port = (p.decode() if isinstance(p, bytes) else p for p in parts)
    origin = f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"
    span.set_attribute("url.full", origin)
    span.set_attribute("http.url", origin)


def _parse_pairs(value: str) -> dict[str, str]:
    """``key=value,key2=value2`` (OTEL_RESOURCE_ATTRIBUTES)."""
    out: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = val.strip()
    return out


def backlog_reader(database: Any, clock: Any) -> Callable[[], Any]:
    """``Telemetry.start``'s reader over the outbox (one indexed aggregate query)."""

    async def read() -> tuple[int, datetime | None, datetime]:
        async with database.transaction(readonly=True) as tx:
            depth, oldest = await tx.outbox.backlog()
        return depth, oldest, clock.now()

    return read
