"""The load generator's pure parts: its latency histogram, and the targets and files it
refuses. (Runs against a real server: tests/system/test_loadtest.py.)"""

from __future__ import annotations

import random

import pytest

from mfa_service.loadtest import (
    Histogram,
    LoadConfig,
    LoadTestError,
    main,
)


def test_histogram_percentiles_stay_within_three_significant_digits() -> None:
    rng = random.Random(1)
    values = sorted(rng.lognormvariate(-6, 1.2) for _ in range(20_000))  # ~2.5 ms median
    hist, other = Histogram(), Histogram()
    for i, v in enumerate(values):
        (hist if i % 2 else other).record(v)
    hist.merge(other)
    assert hist.count == len(values)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1] * 1e6
        assert hist.percentile(q) == pytest.approx(exact, rel=0.002)
    assert hist.max_us == pytest.approx(values[-1] * 1e6, rel=0.001)
    again = Histogram.decode(hist.encode())
    assert again.count == hist.count and again.percentile(0.99) == hist.percentile(0.99)
    assert Histogram().summary_ms() == {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}


@pytest.mark.parametrize("target", ["10.1.2.3:50051", "example.com:443", "[2001:db8::1]:1"])
def test_remote_targets_are_refused_without_allow_remote(target: str) -> None:
    with pytest.raises(LoadTestError, match="loopback"):
        LoadConfig(target=target).check()
    assert main(["--target", target, "--plaintext"]) == 2


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost:x", "127.0.0.1:0", "[::1]"])
def test_malformed_targets_are_refused(target: str) -> None:
    with pytest.raises(LoadTestError, match="HOST:PORT"):
        LoadConfig(target=target).check()
