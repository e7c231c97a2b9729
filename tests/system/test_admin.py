"""The operator commands as an operator runs them, each a real `mfa-service` process: `audit`,
`keys status` and `keys rotate`, `admin reset-user`. (The same services in-process:
tests/api/test_admin.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, insert, select

from mfa_service.app import App
from mfa_service.clock import Clock, FixedClock, SystemClock
from mfa_service.crypto import Keyring
from mfa_service.service.admin import AdminService
from mfa_service.store.models import (
    sessions,
    user_lockouts,
)
from tests.support.admin import NEW, OLD, ROTATED, add_factor, add_live_session, factor_row, opened
from tests.support.client import enroll_app
from tests.support.config import (
    TEST_KEYRING,
    migrate_to_head,
)

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


CLI = str(Path(sys.executable).parent / "mfa-service")


def _env(database_url: str, keyring: str = TEST_KEYRING) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(MFA_DATABASE_URL=database_url, MFA_KEYRING=keyring, MFA_LOG_FORMAT="text")
    return env


async def run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # cwd: a directory without a .env file, so only ``env`` configures the command.
    return await asyncio.to_thread(subprocess.run, [CLI, *args], cwd=cwd, env=env,
                                   capture_output=True, text=True, timeout=60)


async def test_audit_command_prints_a_users_events_newest_first(
        app: App, stub: Stub, database_url: str, user_id: str, fresh_clock: FixedClock,
        tmp_path: Path) -> None:
    await enroll_app(stub, user_id, fresh_clock)
    await AdminService(app.database, fresh_clock).reset_user(user_id, "SD-77")
    async with app.database.transaction() as tx:
        expected = await tx.audit.page(user_id)
    env = _env(database_url)

    text = await run_cli(tmp_path, env, "audit", "--user", user_id)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == len(expected) >= 3
    assert "  admin_reset  ok  caller=admin-cli  " in lines[0]
    assert '"reason": "SD-77"' in lines[0]
    assert [line.split("  ")[1] for line in lines] == [e.event for e in expected]
    assert "factor_confirmed" in text.stdout and "enroll" in text.stdout

    as_json = await run_cli(tmp_path, env, "audit", "--user", user_id, "--json", "--limit", "2",
                            "--since", (fresh_clock.now() - timedelta(hours=1)).isoformat())
    assert as_json.returncode == 0, as_json.stderr
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["event_id"] for e in events] == [e.event_id for e in expected[:2]]
    assert events[0]["event"] == "admin_reset" and events[0]["user_id"] == user_id
    assert events[0]["detail"]["reason"] == "SD-77"

    none = await run_cli(tmp_path, env, "audit", "--user", user_id, "--until", "2001-01-01")
    assert (none.returncode, none.stdout) == (0, "")


async def _seed(url: str, clock: Clock) -> tuple[str, str]:
    """A migrated SQLite file with one factor (old key), one live session (old key) and a
    lockout, as a server would have left them; returns (user id, factor id)."""
    await migrate_to_head(url)
    async with opened(url) as db:
        factor_id = await add_factor(db, Keyring.parse(OLD), "henry", clock.now())
        async with db.transaction() as tx:
            await add_live_session(tx, Keyring.parse(OLD), "henry", factor_id,
                                   clock.now())
            await tx.execute(insert(user_lockouts).values(
                user_id="henry", consecutive_failures=7, locked_until=clock.now()))
    return "henry", factor_id


async def test_keys_commands_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mfa.db'}"
    await _seed(url, SystemClock())  # the command judges "live" by the real clock

    before = await run_cli(tmp_path, _env(url, ROTATED), "keys", "status")
    assert before.returncode == 0, before.stderr
    assert "old-1 is still needed: 1 encrypted value(s): run `mfa-service keys rotate`" \
        in before.stdout

    rotated = await run_cli(tmp_path, _env(url, ROTATED), "keys", "rotate", "--batch", "10")
    assert rotated.returncode == 0, rotated.stderr
    assert "factor secrets: 1 re-encrypted, 0 skipped (changed meanwhile), 0 failed" \
        in rotated.stdout

    after = await run_cli(tmp_path, _env(url, ROTATED), "keys", "status")
    assert after.returncode == 0, after.stderr
    assert "old-1 is still needed: 1 HMAC-keyed value(s)" in after.stdout
    assert "cannot be re-keyed" in after.stdout and "encrypted value" not in after.stdout

    missing = await run_cli(tmp_path, _env(url, NEW), "keys", "status")
    assert missing.returncode == 1
    assert "PROBLEM: old-1 is not in MFA_KEYRING but 1 stored value(s) need it" \
        in missing.stdout


async def test_admin_reset_user_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mfa.db'}"
    user_id, factor_id = await _seed(url, SystemClock())
    env = _env(url)

    done = await run_cli(tmp_path, env, "admin", "reset-user", user_id, "--reason", "SD-9")
    assert done.returncode == 0, done.stderr
    assert "factors disabled (secrets wiped): 1" in done.stdout
    assert "sessions revoked: 1" in done.stdout and "lockout cleared: yes" in done.stdout
    async with opened(url) as db:
        row = await factor_row(db, factor_id)
        assert (row.status, row.secret_ciphertext) == ("disabled", None)
        async with db.engine.connect() as conn:
            # Cleared in place: the row stays (its lock_version only grows).
            counter = (await conn.execute(select(user_lockouts))).one()
            assert (counter.consecutive_failures, counter.admin_reset_required,
                    counter.locked_until) == (0, False, None)
            assert await conn.scalar(select(func.count()).select_from(sessions).where(
                sessions.c.revoked_at.is_(None))) == 0

    nobody = await run_cli(tmp_path, env, "admin", "reset-user", "nobody", "--reason", "SD-10")
    assert nobody.returncode == 0, nobody.stderr
    assert "nothing to reset" in nobody.stdout

    for bad in (["--reason", "x" * 501], []):
        refused = await run_cli(tmp_path, env, "admin", "reset-user", user_id, *bad)
        assert refused.returncode == 2
        assert "reason" in refused.stderr


async def test_admin_end_all_sessions_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mfa.db'}"
    await _seed(url, SystemClock())  # a user with a live session
    env = _env(url)

    done = await run_cli(tmp_path, env, "admin", "end-all-sessions", "--reason", "INC-7")
    assert done.returncode == 0, done.stderr
    assert "sessions revoked: 1" in done.stdout
    async with opened(url) as db, db.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(sessions).where(
            sessions.c.revoked_at.is_(None))) == 0
    refused = await run_cli(tmp_path, env, "admin", "end-all-sessions")
    assert refused.returncode == 2 and "reason" in refused.stderr
