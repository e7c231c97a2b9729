"""Telemetry's defaults: nothing is built when nothing is exported, and logs are JSON off a
terminal and text on one. (Traces and metrics as a backend receives them:
tests/api/test_telemetry.py.)"""

from __future__ import annotations

import io

import grpc
import pytest
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
)

from mfa_service import telemetry
from mfa_service.logs import default_format
from tests.support.config import make_settings


@pytest.mark.parametrize("database_url", [
    "sqlite+aiosqlite:///mfa-service.db", "postgresql+asyncpg://mfa@db.internal/mfa"],
    ids=["sqlite", "postgres"])
def test_nothing_is_built_when_nothing_is_exported(database_url: str) -> None:
    settings = make_settings(database_url)  # nothing connects: the URL is only a setting
    tel = telemetry.configure(settings)
    assert (tel.tracer_provider, tel.meter_provider, tel.metrics) == (None, None, None)
    assert tel.server_interceptor() is None and tel.http_transport() is None


def test_json_is_the_default_off_a_terminal_and_text_on_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert default_format() == "json"
    monkeypatch.setattr("sys.stderr", Tty())
    assert default_format() == "text"


# -- rpc.server.call.duration, aggregated outside the SDK ----------------------------------
def _histograms(reader: InMemoryMetricReader) -> dict[tuple[str, str], HistogramDataPoint]:
    data = reader.get_metrics_data()
    assert data is not None
    found = [(metric, scope.scope.name) for rm in data.resource_metrics
             for scope in rm.scope_metrics for metric in scope.metrics
             if metric.name == "rpc.server.call.duration"]
    if not found:
        return {}
    [(metric, scope_name)] = found  # one metric, not one per collection or per reader
    assert scope_name == "mfa_service" and metric.unit == "s"
    assert isinstance(metric.data, Histogram)
    return {(str(p.attributes["rpc.method"]), str(p.attributes["rpc.response.status_code"])):
            p for p in metric.data.data_points if p.attributes is not None}


DURATIONS = [("CheckSession", grpc.StatusCode.OK, 0.0004),
             ("CheckSession", grpc.StatusCode.OK, 0.001),  # on a bound: the lower bucket
             ("CheckSession", grpc.StatusCode.OK, 0.0031),
             ("Verify", grpc.StatusCode.INVALID_ARGUMENT, 2.0),
             ("Verify", grpc.StatusCode.OK, 42.0)]  # past the last bound


def test_rpc_durations_reach_a_reader_as_the_sdks_own_histogram_would() -> None:
    """The same calls recorded through our aggregation and through the SDK's Histogram
    with the same bounds give the same points: buckets, count, sum, min, max, labels."""
    ours_reader = InMemoryMetricReader()
    ours = telemetry.Telemetry.create(metric_readers=[ours_reader]).metrics
    assert ours is not None
    sdk_reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[sdk_reader]).get_meter("mfa_service").create_histogram(
        "rpc.server.call.duration", unit="s",
        explicit_bucket_boundaries_advisory=telemetry._LATENCY_BUCKETS)
    for rpc, code, seconds in DURATIONS:
        ours.rpc(rpc, code, seconds)
        sdk.record(seconds, {"rpc.method": rpc, "rpc.response.status_code": code.name})

    def shape(p: HistogramDataPoint) -> tuple[object, ...]:
        return (p.count, p.sum, list(p.bucket_counts), list(p.explicit_bounds), p.min, p.max)

    mine, theirs = _histograms(ours_reader), _histograms(sdk_reader)
    assert {k: shape(p) for k, p in mine.items()} == {k: shape(p) for k, p in theirs.items()}
    assert mine[("CheckSession", "OK")].count == 3
    # Cumulative: a second collection still holds everything.
    ours.rpc("CheckSession", grpc.StatusCode.OK, 0.02)
    again = _histograms(ours_reader)[("CheckSession", "OK")]
    assert (again.count, again.min, again.max) == (4, 0.0004, 0.02)


def test_a_reader_that_prefers_delta_gets_each_interval_once() -> None:
    reader = InMemoryMetricReader(
        preferred_temporality={SdkHistogram: AggregationTemporality.DELTA})
    metrics = telemetry.Telemetry.create(metric_readers=[reader]).metrics
    assert metrics is not None
    for rpc, code, seconds in DURATIONS:
        metrics.rpc(rpc, code, seconds)
    first = _histograms(reader)
    assert first[("CheckSession", "OK")].count == 3
    metrics.rpc("CheckSession", grpc.StatusCode.OK, 0.02)
    second = _histograms(reader)
    # Only what happened since: one call, its own min and max; Verify had none.
    [(key, point)] = second.items()
    assert key == ("CheckSession", "OK")
    assert (point.count, point.sum, point.min, point.max) == (1, 0.02, 0.02, 0.02)
    assert point.start_time_unix_nano == first[key].time_unix_nano
    assert sum(point.bucket_counts) == 1
    assert _histograms(reader) == {}  # nothing new: no points at all
