#!/usr/bin/env python3
"""Soak, on demand (not in CI): `mfa-service loadtest --scenario mixed` for a few minutes
against a real `mfa-service serve` on a throwaway PostgreSQL cluster, with a PostgreSQL
restart (stopped like a crash) and an SMS provider outage in the middle, while a side loop
enrols phones so that text messages flow through the outbox the whole time.

    .venv/bin/python scripts/soak.py [--duration 180] [--report soak.json]

Reports: every queued message delivered exactly once (the provider's receipts by message
id against the outbox), calls that ended INTERNAL/UNKNOWN (must be 0), the server's RSS at
the start and the end, and the load generator's own report. Loopback only, bounded in time.
Exit status 1 when a message was lost or sent twice, or a call ended INTERNAL/UNKNOWN.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import phonenumbers  # noqa: E402
from grpc import aio  # noqa: E402
from mfa.v1 import two_factor_service_pb2 as pb  # noqa: E402
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc  # noqa: E402

from tests.support.pgcluster import Cluster  # noqa: E402

CLI = str(Path(sys.executable).parent / "mfa-service")
KEYRING = "soak-1:" + "B" * 43


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Provider:
    """The SMS provider's webhook: records every accepted message id; 503 while down."""

    def __init__(self) -> None:
        self.down = False
        self.receipts: Counter[str] = Counter()
        self.refused = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length = 0
            await reader.readline()
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if self.down:
                self.refused += 1
                status = b"503 Service Unavailable"
            else:
                self.receipts[body["message_id"]] += 1
                status = b"200 OK"
            writer.write(b"HTTP/1.1 " + status +
                         b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
        finally:
            writer.close()


async def enrol_phones(target: str, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """One phone enrolment (one text message) about every 0.2 s, new number each time."""
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)
        while not stop.is_set():
            number = f"+452{uuid.uuid4().int % 10**7:07d}"
            if not phonenumbers.is_valid_number(phonenumbers.parse(number)):
                continue
            try:
                await stub.Enroll(pb.EnrollRequest(
                    user_id=f"soak-{uuid.uuid4().hex[:12]}", method=pb.METHOD_PHONE,
                    phone_number=number, channel=pb.CHANNEL_SMS,
                    application=pb.APPLICATION_PORTAL), timeout=5)
                outcomes["OK"] += 1
            except aio.AioRpcError as err:
                outcomes[err.code().name] += 1
            await asyncio.sleep(0.2)


async def soak(duration: float, report_path: Path | None) -> int:
    cluster = Cluster()
    cluster.init()
    cluster.start()
    work = Path(tempfile.mkdtemp(prefix="mfa-soak-"))
    provider = Provider()
    server = await asyncio.start_server(provider.handle, "127.0.0.1", 0)
    provider.port = server.sockets[0].getsockname()[1]
    port = _free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(MFA_DATABASE_URL=cluster.url, MFA_KEYRING=KEYRING, MFA_LISTEN_ADDR=target,
               MFA_PHONE_PROVIDER="webhook",
               MFA_PHONE_WEBHOOK_URL=f"http://127.0.0.1:{provider.port}/send",
               MFA_OUTBOX_BACKOFF_MAX_SECONDS="5", MFA_LOG_LEVEL="WARNING",
               MFA_SHUTDOWN_DRAIN_SECONDS="1", MFA_MAX_SENDS_PER_DESTINATION="100")
    migrate = await asyncio.create_subprocess_exec(CLI, "migrate", env=env,
                                                   stdout=subprocess.DEVNULL)
    assert await asyncio.wait_for(migrate.wait(), timeout=120) == 0
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen([CLI, "serve"], env=env, stderr=log, cwd=work)  # noqa: S603, ASYNC220
    loop = asyncio.get_running_loop()
    stop_sms = asyncio.Event()
    sms_outcomes: Counter[str] = Counter()
    events: list[str] = []
    try:
        await asyncio.sleep(3)  # start-up
        rss_start = _rss_kib(proc.pid)
        load = await asyncio.create_subprocess_exec(
            CLI, "loadtest", "--target", target, "--plaintext", "--scenario", "mixed",
            "--duration", str(duration), "--warmup", "2", "--users", "100",
            "--concurrency", "16", "--connections", "4", "--rpc-timeout", "5",
            "--report", str(work / "loadtest.json"), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env)
        sms = asyncio.create_task(enrol_phones(target, stop_sms, sms_outcomes))
        started = loop.time()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + 10 + duration * fraction - loop.time()))

        await at(0.20)
        rss_warm = _rss_kib(proc.pid)  # after the load generator's setup and warm-up
        await at(0.25)
        provider.down = True
        events.append(f"{loop.time() - started:.0f}s SMS provider down")
        await at(0.40)
        provider.down = False
        events.append(f"{loop.time() - started:.0f}s SMS provider back")
        await at(0.55)
        await asyncio.to_thread(cluster.stop)
        events.append(f"{loop.time() - started:.0f}s PostgreSQL stopped (immediate)")
        await asyncio.sleep(10)
        await asyncio.to_thread(cluster.start)
        events.append(f"{loop.time() - started:.0f}s PostgreSQL started")
        await asyncio.wait_for(load.wait(), timeout=duration + 120)
        stop_sms.set()
        await sms
        rss_end = _rss_kib(proc.pid)
        # Every queued message settles (backoff at most 5 s).
        pg = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
        try:
            for _ in range(120):
                pending = await pg.fetchval(
                    "SELECT count(*) FROM outbox WHERE state = 'pending'")
                if pending == 0:
                    break
                await asyncio.sleep(1)
            rows = await pg.fetch("SELECT id, state FROM outbox WHERE channel = 'sms'")
        finally:
            await pg.close()
    finally:
        stop_sms.set()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()
        server.close()
        cluster.destroy()

    states = Counter(r["state"] for r in rows)
    sent = {str(r["id"]) for r in rows if r["state"] == "sent"}
    received = set(provider.receipts)
    twice = {m: c for m, c in provider.receipts.items() if c > 1}
    load_report: dict[str, Any] = json.loads((work / "loadtest.json").read_text())
    server_log = (work / "server.log").read_text("utf-8", "replace")
    internal = server_log.count('"code": "INTERNAL"') + server_log.count('"code": "UNKNOWN"') \
        + server_log.count("unhandled error")
    load_errors: Counter[str] = Counter()
    for rpc in load_report.get("rpcs", {}).values():
        load_errors.update(rpc.get("errors", {}))
    result = {
        "duration_seconds": duration, "events": events,
        "server_rss_kib": {"start": rss_start, "warm": rss_warm, "end": rss_end},
        "sms": {"enrolments": dict(sms_outcomes), "outbox_states": dict(states),
                "delivered": len(received), "delivered_twice": len(twice),
                "sent_but_not_received": len(sent - received),
                "received_but_not_sent": len(received - sent),
                "provider_refusals_during_outage": provider.refused},
        "loadtest": {"calls": load_report.get("overall", {}).get("count"),
                     "errors_by_code": dict(load_errors)},
        "internal_or_unknown": internal + load_errors.get("INTERNAL", 0)
        + load_errors.get("UNKNOWN", 0),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if report_path is not None:
        report_path.write_text(text + "\n")  # noqa: ASYNC240 - after the run
    ok = (not twice and sent == received and states.get("pending", 0) == 0
          and result["internal_or_unknown"] == 0)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--report", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    if not 10 <= args.duration <= 3600:
        parser.error("--duration must be 10-3600 seconds")
    return asyncio.run(soak(args.duration, args.report))


if __name__ == "__main__":
    raise SystemExit(main())
