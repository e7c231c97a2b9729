"""Replicas through PgBouncer: two ``mfa-service serve`` processes, one PostgreSQL.

The test starts PgBouncer itself (Debian's ``pgbouncer``, 1.18: no prepared statements in
transaction pooling mode) on a free loopback port with its configuration in a temporary
directory, and two servers with ``MFA_DATABASE_POOLER=pgbouncer`` behind it, each on its
own port. A client that round-robins every call over both runs the TOTP flow (enrol on
one, confirm on the other, log in), an email flow, checks that a session made on one
replica is valid on the other, and queues 50 emails that the two dispatchers must deliver
exactly once between them (``FOR UPDATE SKIP LOCKED`` claims; no session-level feature).

PgBouncer refuses to run as root; as root the test starts it with ``-u postgres`` (it
drops privileges itself), so the temporary directory is made readable for that user.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pyotp
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url

from tests.support.config import IN_CI, REPO, TEST_KEYRING
from tests.support.fakes import RecordingHandler
from tests.support.rig import CODE_RE

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

pytestmark = pytest.mark.postgres
CLI = str(Path(sys.executable).parent / "mfa-service")
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
                     timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} never listened on {port}"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def pgbouncer(postgres_url: str) -> AsyncIterator[str]:
    """PgBouncer (transaction pooling) in front of the test database; its URL."""
    if not os.path.exists(PGBOUNCER):
        message = "pgbouncer is not installed (scripts/test installs it as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    url = make_url(postgres_url)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mfa-pgbouncer-"))
    workdir.chmod(0o755)  # read by the unprivileged user PgBouncer switches to
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(f"""\
[databases]
mfa = host={url.host or "127.0.0.1"} port={url.port or 5432} dbname={url.database} \
user={url.username or "postgres"}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = transaction
default_pool_size = 8
max_client_conn = 200
""")
    for name in ("users.txt", "pgbouncer.ini"):
        (workdir / name).chmod(0o644)
    as_user = ["-u", "postgres"] if os.geteuid() == 0 else []
    log = (workdir / "pgbouncer.log").open("wb")
    proc = subprocess.Popen([PGBOUNCER, *as_user, str(workdir / "pgbouncer.ini")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        await _wait_port(port, proc, "pgbouncer")
        yield url.set(host="127.0.0.1", port=port, database="mfa").render_as_string(
            hide_password=False)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


class Replica:
    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.name, self.port, self.proc, self.log = name, port, proc, log

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture
async def replicas(pgbouncer: str, smtp: tuple[RecordingHandler, int],
                   tmp_path: Path) -> AsyncIterator[list[Replica]]:
    _, smtp_port = smtp
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            port = _free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
            env.update(
                MFA_LISTEN_ADDR=f"127.0.0.1:{port}", MFA_DATABASE_URL=pgbouncer,
                MFA_DATABASE_POOLER="pgbouncer", MFA_KEYRING=TEST_KEYRING,
                MFA_EMAIL_PROVIDER="smtp", MFA_SMTP_HOST="127.0.0.1",
                MFA_SMTP_PORT=str(smtp_port), MFA_SMTP_TLS="none",
                MFA_OUTBOX_POLL_SECONDS="0.2", MFA_HEALTH_PROBE_SECONDS="1",
                MFA_LOG_FORMAT="json", MFA_LOG_LEVEL="INFO", MFA_SHUTDOWN_GRACE_SECONDS="1",
                MFA_PURGE_INTERVAL_SECONDS="0")
            log = tmp_path / f"replica-{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([CLI, "serve"], cwd=tmp_path, env=env,
                                        stdout=out, stderr=subprocess.STDOUT)
            started.append(Replica(name, port, proc, log))
        for r in started:
            await _wait_port(r.port, r.proc, f"replica {r.name}")
        yield started
    finally:
        for r in started:
            r.proc.terminate()
        for r in started:
            try:
                await asyncio.to_thread(r.proc.wait, 20)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


class RoundRobin:
    """Every call to the next replica in turn."""

    def __init__(self, stubs: list[Stub]) -> None:
        self._next = itertools.cycle(stubs)

    def __getattr__(self, rpc: str) -> Any:
        return getattr(next(self._next), rpc)


@pytest.fixture
async def client(replicas: list[Replica]) -> AsyncIterator[tuple[RoundRobin, list[Stub]]]:
    channels = [aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    stubs: list[Stub] = [pb_grpc.TwoFactorServiceStub(c) for c in channels]
    try:
        yield RoundRobin(stubs), stubs
    finally:
        for c in channels:
            await c.close()


async def _mail_code(smtp: RecordingHandler, address: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for m in smtp.messages():
            if m["To"] == address and (found := CODE_RE.search(m.get_content())):
                return found.group(1)
        assert time.monotonic() < deadline, f"no code reached {address}"
        await asyncio.sleep(0.05)


async def test_two_replicas_behind_pgbouncer_share_users_sessions_and_the_outbox(
        client: tuple[RoundRobin, list[Stub]], smtp: tuple[RecordingHandler, int],
        replicas: list[Replica], pgbouncer: str) -> None:
    rr, (a, b) = client
    handler, _ = smtp
    run = uuid.uuid4().hex[:8]

    # The authenticator app: enrol on one replica, confirm on the other, log in.
    alice = f"pgb-{run}-alice"
    enrolled = await a.Enroll(pb.EnrollRequest(
        user_id=alice, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    if (left := 30 - time.time() % 30) < 4:  # two codes of two steps, well inside a step
        await asyncio.sleep(left + 0.2)
    totp, now = pyotp.TOTP(enrolled.totp_secret), time.time()
    confirmed = await b.Verify(pb.VerifyRequest(challenge_id=enrolled.challenge_id,
                                                code=totp.at(now - 30)))
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED
    challenge = await a.Challenge(pb.ChallengeRequest(
        user_id=alice, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    login = await b.Verify(pb.VerifyRequest(challenge_id=challenge.challenge_id,
                                            code=totp.at(now)))
    assert login.result == pb.VERIFY_RESULT_APPROVED
    # A session made on one replica is valid on the other (and on the first).
    for stub in (a, b, a, b):
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=login.session.session_token, application=pb.APPLICATION_BACKOFFICE))
        assert check.valid and check.user_id == alice
    listed = await rr.ListFactors(pb.ListFactorsRequest(user_id=alice))
    assert {f.method for f in listed.factors} >= {pb.METHOD_AUTHENTICATOR_APP}

    # Email: enrol on one, the code goes through some replica's outbox, confirm on the other.
    bob, address = f"pgb-{run}-bob", f"pgb-{run}-bob@example.com"
    enrolled = await a.Enroll(pb.EnrollRequest(
        user_id=bob, method=pb.METHOD_EMAIL, email=address, application=pb.APPLICATION_PORTAL))
    ok = await b.Verify(pb.VerifyRequest(challenge_id=enrolled.challenge_id,
                                         code=await _mail_code(handler, address)))
    assert ok.result == pb.VERIFY_RESULT_APPROVED and len(ok.recovery_codes) == 10

    # 50 messages queued through both replicas: each delivered exactly once.
    addresses = [f"pgb-{run}-u{i}@example.com" for i in range(50)]

    async def enrol(i: int) -> None:
        await rr.Enroll(pb.EnrollRequest(
            user_id=f"pgb-{run}-u{i}", method=pb.METHOD_EMAIL, email=addresses[i],
            application=pb.APPLICATION_PORTAL))

    for batch in range(0, 50, 10):
        await asyncio.gather(*(enrol(i) for i in range(batch, batch + 10)))
    deadline = time.monotonic() + 30
    while not set(addresses) <= {m["To"] for m in handler.messages()}:
        assert time.monotonic() < deadline, "not every message was delivered"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # several poll periods: a double send would show now
    received = Counter(m["To"] for m in handler.messages() if m["To"] in set(addresses))
    assert set(received.values()) == {1}, received

    dsn = make_url(pgbouncer).set(drivername="postgresql").render_as_string(
        hide_password=False)
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        rows = await conn.fetch(
            "SELECT state, attempts FROM outbox WHERE destination = ANY($1::text[])",
            addresses)
    finally:
        await conn.close()
    assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1)] * 50
    # Both dispatchers took part (each wakes on its own commits, both poll).
    senders = {r.name for r in replicas for e in r.lines() if e.get("msg") == "message sent"}
    assert senders == {"a", "b"}
    problems = [e for r in replicas for e in r.lines() if e.get("level") in ("ERROR",)]
    assert not problems, problems


def _sources() -> Iterator[tuple[Path, str]]:
    for path in (REPO / "mfa_service").rglob("*.py"):
        yield path, path.read_text()


def test_no_session_level_postgres_feature_is_used() -> None:
    """Transaction pooling gives each transaction any server connection: LISTEN/NOTIFY,
    session advisory locks, SET without LOCAL, temporary tables, cursors WITH HOLD and
    named prepared statements kept across transactions would all break."""
    session_level = re.compile(
        r"[\"']\s*(?:UN)?LISTEN\b|pg_advisory_lock\(|pg_try_advisory_lock\(|"
        r"(?:text|exec_driver_sql|execute)\(\s*[\"']\s*SET\s+(?!LOCAL)|"
        r"\bTEMP(?:ORARY)? TABLE\b|\bWITH HOLD\b|[\"']\s*PREPARE \w")
    hits = [(str(p.relative_to(REPO)), m.group(0)) for p, text in _sources()
            if "/migrations/" not in str(p) for m in session_level.finditer(text)]
    assert hits == []
    used = "".join(text for _, text in _sources())
    assert "pg_advisory_xact_lock" in used and "skip_locked=True" in used
