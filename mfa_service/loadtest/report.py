"""The JSON report (plain JSON all the way down) and its short table for the terminal.

Shape (``report_version`` 2)::

    parameters, environment, setup, started_at, duration_seconds
    overall                    the RpcStats report over every RPC
    rpcs.NAME                  count, ok, rps, errors, expected_errors, outcomes,
                               unexpected_outcomes, latency_ms {p50 p90 p99 max mean},
                               hdr_histogram_us, vs_baseline
    scenarios.NAME             operations, ops_per_second, completed, completed_per_second,
                               stalled_worker_seconds, vs_baseline
    baseline                   null, or the bare server's own overall / rpcs / duration
    unexpected                 errors + unexpected outcomes (exit status 1 when > 0)

``vs_baseline`` is null without --baseline. For an RPC (and overall): ``rps`` = its RPS /
the bare server's RPS, ``p99`` = its p99 / the bare server's p99. For a scenario:
``ops`` = its operations/s / the bare server's RPS (one bare call is one operation of
the baseline), ``completed`` likewise for completed operations, ``p99`` = the p99 over the
scenario's RPCs / the bare server's p99.
"""

from __future__ import annotations

import asyncio
import os
import platform
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import __version__ as protobuf_version

from mfa_service.loadtest.config import MIXED
from mfa_service.loadtest.recorder import RpcStats

if TYPE_CHECKING:
    from mfa_service.loadtest.runner import Measured

REPORT_VERSION = 2
# The RPCs each scenario makes (for its p99 against the baseline).
SCENARIO_RPCS: dict[str, tuple[str, ...]] = {
    "check-session": ("CheckSession",), "list-factors": ("ListFactors",),
    "challenge-verify-wrong": ("Challenge", "Verify"), "login": ("Challenge", "Verify"),
    "enroll": ("Enroll", "Verify"), "echo": ("CheckSession",),
    "passkey": ("Enroll", "Verify", "Challenge"),
}


def _overall(m: Measured) -> RpcStats:
    overall = RpcStats()
    for stats in m.run.rec.rpcs.values():
        overall.merge(stats)
    return overall


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 4) if base > 0 else None


def _scenario_names(scenario: str) -> list[str]:
    return [n for n, _ in MIXED] if scenario == "mixed" else [scenario]


def build_report(m: Measured, baseline: Measured | None = None) -> dict[str, Any]:
    config = m.run.config
    seconds = m.seconds
    overall = _overall(m)
    unexpected = sum(overall.errors.values()) + overall.unexpected_outcomes
    base: dict[str, Any] | None = None
    base_rps = base_p99 = 0.0
    if baseline is not None:
        base_overall = _overall(baseline)
        unexpected += sum(base_overall.errors.values()) + base_overall.unexpected_outcomes
        base = {
            "server": "bare grpc.aio unary handler in its own process on loopback "
                      "(CheckSession answered with a constant valid=true)",
            "target": baseline.run.config.target,
            "duration_seconds": round(baseline.seconds, 3),
            "overall": base_overall.as_report(baseline.seconds),
            "rpcs": {n: s.as_report(baseline.seconds)
                     for n, s in sorted(baseline.run.rec.rpcs.items())},
        }
        base_rps = base_overall.latency.count / baseline.seconds
        base_p99 = base_overall.latency.percentile(0.99)

    def versus(stats: RpcStats) -> dict[str, float | None] | None:
        if base is None:
            return None
        return {"rps": _ratio(stats.latency.count / seconds, base_rps),
                "p99": _ratio(stats.latency.percentile(0.99), base_p99)}

    def rpc_entry(stats: RpcStats) -> dict[str, Any]:
        return {**stats.as_report(seconds), "vs_baseline": versus(stats)}

    scenarios: dict[str, Any] = {}
    for name in _scenario_names(config.scenario):
        ops, done = m.run.operations[name], m.run.completed[name]
        entry: dict[str, Any] = {
            "operations": ops, "ops_per_second": round(ops / seconds, 1),
            "completed": done, "completed_per_second": round(done / seconds, 1),
            # > 0: the users, not the server, limited this scenario
            "stalled_worker_seconds": round(m.run.stalled[name], 2),
            "vs_baseline": None,
        }
        if base is not None:
            rpcs = RpcStats()
            for rpc in SCENARIO_RPCS.get(name, ()):
                if rpc in m.run.rec.rpcs:
                    rpcs.merge(m.run.rec.rpcs[rpc])
            entry["vs_baseline"] = {
                "ops": _ratio(ops / seconds, base_rps),
                "completed": _ratio(done / seconds, base_rps),
                "p99": _ratio(rpcs.latency.percentile(0.99), base_p99),
            }
        scenarios[name] = entry

    try:
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop_name = "asyncio"
    users = m.run.scenarios.users
    return {
        "tool": "mfa-service loadtest",
        "report_version": REPORT_VERSION,
        "started_at": m.started_at.isoformat(),
        "duration_seconds": round(seconds, 3),
        "parameters": {
            "target": config.target, "connections": config.connections,
            "concurrency": config.concurrency, "duration_seconds": config.duration,
            "warmup_seconds": config.warmup, "users": config.wanted_users,
            "users_file": str(config.users_file) if config.users_file else None,
            "scenario": config.scenario,
            "mix": dict(MIXED) if config.scenario == "mixed" else {config.scenario: 1.0},
            "plaintext": config.plaintext, "bearer_token": config.token is not None,
            "max_calls": config.max_calls, "rpc_timeout_seconds": config.rpc_timeout,
            "seed": m.seed, "baseline": config.baseline,
        },
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "grpcio": grpc.__version__, "protobuf": protobuf_version,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "event_loop": loop_name,
        },
        "setup": {"users": len(users), "sessions": sum(1 for u in users if u.token),
                  "source": ("users-file" if config.users_file is not None and users
                             else "enrolled" if users else "none"),
                  "seconds": round(m.setup_seconds, 3)},
        "overall": rpc_entry(overall),
        "rpcs": {name: rpc_entry(stats) for name, stats in sorted(m.run.rec.rpcs.items())},
        "scenarios": scenarios,
        "baseline": base,
        "unexpected": unexpected,
    }


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def summary(report: dict[str, Any]) -> str:
    """A short human table of the report, for the terminal."""
    head = (f"{'rpc':14s} {'count':>8s} {'rps':>8s} {'p50 ms':>8s} {'p90 ms':>8s} "
            f"{'p99 ms':>8s} {'max ms':>8s} {'rps/base':>9s} {'p99/base':>9s}  "
            "errors / expected")
    lines = [head]
    rows: list[tuple[str, dict[str, Any]]] = []
    if report.get("baseline"):
        rows.append(("baseline", {**report["baseline"]["overall"], "vs_baseline": None}))
    rows += [*report["rpcs"].items(), ("overall", report["overall"])]
    for name, r in rows:
        lat, vs = r["latency_ms"], r.get("vs_baseline") or {}
        lines.append(f"{name:14s} {r['count']:8d} {r['rps']:8.1f} {lat['p50']:8.2f} "
                     f"{lat['p90']:8.2f} {lat['p99']:8.2f} {lat['max']:8.2f} "
                     f"{_x(vs.get('rps')):>9s} {_x(vs.get('p99')):>9s}  "
                     f"{r['errors'] or '-'} / {r['expected_errors'] or '-'}")
    lines.append(f"{'scenario':24s} {'ops/s':>8s} {'done/s':>8s} {'ops/base':>9s} "
                 f"{'p99/base':>9s} {'stalled s':>10s}")
    for name, s in report["scenarios"].items():
        vs = s["vs_baseline"] or {}
        lines.append(f"{name:24s} {s['ops_per_second']:8.1f} "
                     f"{s['completed_per_second']:8.1f} {_x(vs.get('ops')):>9s} "
                     f"{_x(vs.get('p99')):>9s} {s['stalled_worker_seconds']:10.2f}")
    return "\n".join(lines)
