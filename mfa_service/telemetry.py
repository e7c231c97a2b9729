"""OpenTelemetry set-up: a span per RPC from the gRPC instrumentation.

Spans carry the RPC name, peer and status code, never a message body. With
``MFA_OTEL_EXPORTER=none`` the global tracer provider stays the no-op default.
"""

from __future__ import annotations

from grpc import aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from mfa_service import __version__

_configured = False


def configure_tracing(exporter: str) -> bool:
    """Install the tracer provider once; whether spans are exported at all."""
    global _configured
    if exporter == "none":
        return False
    if _configured:
        return True
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "mfa-service", "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def server_interceptor() -> aio.ServerInterceptor:
    interceptor: aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return interceptor
