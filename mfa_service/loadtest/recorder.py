"""Timing and counting calls: what happened to each RPC inside the measured window."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc import aio

from mfa_service.loadtest.histogram import Histogram

T = TypeVar("T")

NOTHING_EXPECTED: frozenset[grpc.StatusCode] = frozenset()
RESOURCE_EXHAUSTED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

Outcome = tuple[str, bool]  # (label, whether this answer is what the scenario expects)


@dataclass
class RpcStats:
    """What happened to one RPC during the measured window."""

    latency: Histogram = field(default_factory=Histogram)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected_outcomes: int = 0

    def merge(self, other: RpcStats) -> None:
        self.latency.merge(other.latency)
        self.ok += other.ok
        self.errors.update(other.errors)
        self.expected_errors.update(other.expected_errors)
        self.outcomes.update(other.outcomes)
        self.unexpected_outcomes += other.unexpected_outcomes

    def as_report(self, seconds: float) -> dict[str, Any]:
        count = self.latency.count
        return {
            "count": count, "ok": self.ok, "rps": round(count / seconds, 1) if seconds else 0.0,
            "errors": dict(sorted(self.errors.items())),
            "expected_errors": dict(sorted(self.expected_errors.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "unexpected_outcomes": self.unexpected_outcomes,
            "latency_ms": self.latency.summary_ms(),
            "hdr_histogram_us": self.latency.encode(),
        }


class Recorder:
    """Times every call; only calls that start inside the measured window are recorded."""

    def __init__(self) -> None:
        self.rpcs: dict[str, RpcStats] = {}
        self.measure_from = math.inf  # perf_counter() at which measuring starts
        self.calls = 0  # finished calls, warm-up included (for the progress line)
        self.unexpected = 0  # unexpected errors and outcomes, warm-up included
        self.expected = 0  # expected errors (RESOURCE_EXHAUSTED of a locked user)
        self.measured = 0

    async def call(self, rpc: str, start_call: Callable[[], Awaitable[T]], *,
                   expected: frozenset[grpc.StatusCode] = NOTHING_EXPECTED,
                   outcome: Callable[[T], Outcome] | None = None,
                   operation_start: float | None = None) -> T | aio.AioRpcError:
        """Make one call; an RPC error is returned (and counted), never raised.

        Whether it is measured follows ``operation_start`` when given, so both calls of a
        Challenge + Verify pair fall on the same side of the warm-up line.
        """
        start = time.perf_counter()
        origin = start if operation_start is None else operation_start
        try:
            response = await start_call()
        except aio.AioRpcError as exc:
            self._finish(rpc, start, origin, exc.code(), exc.code() in expected, None)
            return exc
        self._finish(rpc, start, origin, None, False, outcome(response) if outcome else None)
        return response

    def _finish(self, rpc: str, start: float, origin: float, code: grpc.StatusCode | None,
                expected: bool, outcome: Outcome | None) -> None:
        elapsed = time.perf_counter() - start
        self.calls += 1
        bad = (code is not None and not expected) or (outcome is not None and not outcome[1])
        self.unexpected += bad
        self.expected += expected
        if origin < self.measure_from:
            return
        self.measured += 1
        stats = self.rpcs.get(rpc)
        if stats is None:
            stats = self.rpcs[rpc] = RpcStats()
        stats.latency.record(elapsed)  # every finished call, errors included: honest tails
        if code is None:
            stats.ok += 1
        elif expected:
            stats.expected_errors[code.name] += 1
        else:
            stats.errors[code.name] += 1
        if outcome is not None:
            stats.outcomes[outcome[0]] += 1
            stats.unexpected_outcomes += not outcome[1]
