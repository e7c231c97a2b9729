"""Deleting what no longer serves anyone: ended sessions, closed challenges, settled
outbox rows, expired remembered browsers and ended per-address counts of unknown device
tokens. The audit trail and factors are never deleted, but a PENDING factor long gone
(past MFA_PENDING_TTL_MINUTES, at most an hour) is marked DISABLED and its secret wiped:
an unscanned QR code's secret serves no one.

Nor are the users' lockout counters (one small row per user, as factors are): the per-user
lock's ``lock_version`` must only grow for Verify's one-statement lock and read to tell a
stale read (store/hot.py), and a row deleted would cost the user's next call a second read.
A counter idle past the quiet period counts as reset anyway (service/lockout.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update

from mfa_service.domain import FactorStatus
from mfa_service.store.models import (
    challenges,
    device_misses,
    factors,
    outbox,
    sessions,
    trusted_devices,
)
from mfa_service.store.unit import Unit


@dataclass(frozen=True)
class Retention:
    """How long ended rows are kept (for support questions) before they go."""

    sessions: timedelta = timedelta(days=1)
    challenges: timedelta = timedelta(days=1)
    outbox: timedelta = timedelta(days=7)
    pending_factors: timedelta = timedelta(hours=1)  # >= the longest MFA_PENDING_TTL
    # A remembered browser's row goes a day after its absolute end, however it ended:
    # until then the browser may still present its token (the portal's cookie lives as
    # long), and a known token that ended is answered without counting it as a guess.
    devices: timedelta = timedelta(days=1)
    device_misses: timedelta = timedelta(hours=1)  # the window the count is for


async def purge(unit: Unit, now: datetime, keep: Retention,
                batch: int = 1000) -> dict[str, int]:
    """Delete at most ``batch`` rows of each kind; returns how many went of each.

    Batches keep each transaction (and SQLite's write lock) short; call again until it
    returns zeros. Concurrent purges in several processes only race to delete the same
    rows, which is harmless.
    """
    counts: dict[str, int] = {}
    ended_sessions = select(sessions.c.id).where(or_(
        sessions.c.revoked_at < now - keep.sessions,
        sessions.c.expires_at < now - keep.sessions,
        sessions.c.idle_expires_at < now - keep.sessions)).limit(batch)
    counts["sessions"] = (await unit.execute(
        delete(sessions).where(sessions.c.id.in_(ended_sessions)))).rowcount
    old_challenges = select(challenges.c.id).where(
        challenges.c.expires_at < now - keep.challenges).limit(batch)
    counts["challenges"] = (await unit.execute(
        delete(challenges).where(challenges.c.id.in_(old_challenges)))).rowcount
    settled = select(outbox.c.id).where(
        outbox.c.state != "pending", outbox.c.created_at < now - keep.outbox).limit(batch)
    counts["outbox"] = (await unit.execute(
        delete(outbox).where(outbox.c.id.in_(settled)))).rowcount
    gone = select(factors.c.id).where(
        factors.c.status == FactorStatus.PENDING.value,
        factors.c.created_at < now - keep.pending_factors).limit(batch)
    counts["pending_factors"] = (await unit.execute(
        update(factors).where(factors.c.id.in_(gone)).values(
            status=FactorStatus.DISABLED.value, disabled_at=now, secret_ciphertext=None,
            secret_key_id=None))).rowcount
    expired = select(trusted_devices.c.id).where(
        trusted_devices.c.expires_at < now - keep.devices).limit(batch)
    counts["trusted_devices"] = (await unit.execute(
        delete(trusted_devices).where(trusted_devices.c.id.in_(expired)))).rowcount
    ended_windows = select(device_misses.c.ip_key).where(
        device_misses.c.window_started_at < now - keep.device_misses).limit(batch)
    counts["device_misses"] = (await unit.execute(
        delete(device_misses).where(device_misses.c.ip_key.in_(ended_windows)))).rowcount
    return counts
