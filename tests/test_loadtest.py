"""The load generator against the in-process server: the report's shape and honesty, never
its speed (performance targets do not belong in unit tests; see docs/BENCHMARKS.md)."""

from __future__ import annotations

import io
import json
import random

import pytest

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.loadtest import Histogram, LoadConfig, LoadTestError, main, run_loadtest

LATENCY_KEYS = {"p50", "p90", "p99", "max", "mean"}
RPC_KEYS = {"count", "ok", "rps", "errors", "expected_errors", "outcomes",
            "unexpected_outcomes", "latency_ms"}


@pytest.mark.parametrize(("scenario", "rpcs"), [
    ("mixed", {"CheckSession", "ListFactors", "Challenge", "Verify"}),
    ("login", {"Challenge", "Verify"}),
])
async def test_a_short_run_reports_every_rpc_without_unexpected_errors(
        app: App, clock: FixedClock, scenario: str, rpcs: set[str]) -> None:
    # No warm-up for login: on the fixed clock each user has one step to spend.
    config = LoadConfig(target=f"127.0.0.1:{app.port}", connections=2, concurrency=4,
                        duration=0.6, warmup=0.2 if scenario == "mixed" else 0, users=6,
                        scenario=scenario, plaintext=True, seed=7)
    progress = io.StringIO()
    # TOTP codes follow the server's clock: here the suite's fixed one.
    report = await run_loadtest(config, now=clock.now, progress=progress,
                                progress_interval=0.1)

    assert json.loads(json.dumps(report)) == report  # plain JSON all the way down
    assert report["parameters"]["scenario"] == scenario
    assert report["parameters"]["connections"] == 2
    assert {"python", "grpcio", "protobuf", "cpu_count"} <= report["environment"].keys()
    assert report["setup"]["users"] == 6
    assert report["duration_seconds"] > 0
    assert set(report["rpcs"]) == rpcs
    for name, stats in [*report["rpcs"].items(), ("overall", report["overall"])]:
        assert set(stats) == RPC_KEYS, name
        assert set(stats["latency_ms"]) == LATENCY_KEYS, name
        assert stats["count"] > 0 and stats["rps"] > 0, name
        assert stats["errors"] == {}, (name, stats)
        assert stats["unexpected_outcomes"] == 0, (name, stats)
        lat = stats["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], (name, lat)
    assert report["unexpected"] == 0
    assert report["overall"]["count"] == sum(r["count"] for r in report["rpcs"].values())
    # A locked-out user's RESOURCE_EXHAUSTED is an expected outcome, never an error.
    assert set(report["overall"]["expected_errors"]) <= {"RESOURCE_EXHAUSTED"}
    if scenario == "mixed":
        assert report["rpcs"]["CheckSession"]["outcomes"] == {
            "valid": report["rpcs"]["CheckSession"]["count"]}
        assert set(report["rpcs"]["Verify"]["outcomes"]) <= {
            "VERIFY_RESULT_INVALID_CODE", "VERIFY_RESULT_MAX_ATTEMPTS_REACHED"}
    else:  # each user logs in at most once per step: six users, one fixed clock
        assert report["rpcs"]["Verify"]["outcomes"] == {"VERIFY_RESULT_APPROVED": 6}
        assert report["scenarios"]["login"]["stalled_worker_seconds"] > 0
    assert "loadtest" in progress.getvalue()


def test_histogram_percentiles_stay_within_a_bucket_of_the_truth() -> None:
    rng = random.Random(1)
    values = sorted(rng.lognormvariate(-6, 1.2) for _ in range(20_000))  # ~2.5 ms median
    hist = Histogram()
    for v in values:
        hist.record(v)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1] * 1e6
        assert hist.percentile(q) == pytest.approx(exact, rel=0.02)
    assert hist.max_us == int(values[-1] * 1e6)
    assert Histogram.index(127) == 127 and Histogram.index(128) == 128
    assert all(Histogram.index(v) <= Histogram.index(v + 1) for v in range(100_000))


@pytest.mark.parametrize("target", ["10.1.2.3:50051", "example.com:443", "[2001:db8::1]:1"])
def test_remote_targets_are_refused_without_allow_remote(target: str) -> None:
    with pytest.raises(LoadTestError, match="loopback"):
        LoadConfig(target=target).check()
    assert main(["--target", target, "--plaintext"]) == 2


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost:x", "127.0.0.1:0", "[::1]"])
def test_malformed_targets_are_refused(target: str) -> None:
    with pytest.raises(LoadTestError, match="HOST:PORT"):
        LoadConfig(target=target).check()
