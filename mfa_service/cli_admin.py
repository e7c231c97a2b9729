"""Operator commands: ``keys rotate|status``, ``admin reset-user``, ``audit`` (and the
database opening and dispatch that ``import``, in mfa_service.cli_import, shares).

Registered into ``mfa-service``'s parser by mfa_service.cli; the rules live in
mfa_service.service.admin. They run beside live servers on the same database, with the
same settings (``MFA_*``) and, for keys, the same keyring as the servers.

Exit codes: 0 done, 1 a problem was found (a key the database needs is missing, a value
could not be re-encrypted), 2 bad usage or configuration, 3 the database failed (as for
``mfa-service migrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mfa_service.errors import ConfigurationError, InvalidArgument, StoreError
from mfa_service.logs import configure_logging
from mfa_service.settings import Settings

if TYPE_CHECKING:
    from mfa_service.domain import AuditEvent
    from mfa_service.service.admin import AdminService, KeyStatus, ResetReport, RotationReport
    from mfa_service.service.notices import Notifier
    from mfa_service.store.database import Database

    # argparse's sub-parser action is generic only in the type stubs.
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

# The store and service layers are imported inside the runners: `mfa-service health` and
# `keys generate` load this module too, and should stay quick and independent of them.

OK, PROBLEM, USAGE, STORE_FAILED = 0, 1, 2, 3

Runner = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def parse_instant(text: str) -> datetime:
    """ISO 8601 date or date-time; without an offset it is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ISO 8601 (e.g. 2026-03-02 or 2026-03-02T10:00:00+01:00)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def register(commands: SubParsers, keys: SubParsers) -> None:
    """Add the operator sub-commands to ``mfa-service`` and to its ``keys`` command."""
    rotate = keys.add_parser(
        "rotate", help="re-encrypt stored secrets under the keyring's primary key",
        description="Re-encrypt TOTP secrets and pending outbox messages that are not under "
                    "the primary key (the first in MFA_KEYRING), one row at a time, while "
                    "servers keep running. Every server must already have the primary key "
                    "in its keyring. Safe to repeat.")
    rotate.add_argument("--batch", type=int, default=100,
                        help="rows listed per query (default 100, max 10000)")
    rotate.set_defaults(admin_runner=_keys_rotate)
    status = keys.add_parser(
        "status", help="show which key ids stored values still need",
        description="Count, per key id, the stored values that need it, and say which old "
                    "keys may be removed from MFA_KEYRING. Exits 1 when the database needs "
                    "a key the keyring lacks.")
    status.set_defaults(admin_runner=_keys_status)

    admin = commands.add_parser("admin", help="support-desk actions on one user")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    reset = admin_sub.add_parser(
        "reset-user", help="disable every factor of a user and end what depends on them",
        description="In one transaction: disable the user's factors (wiping secrets), use up "
                    "their recovery codes, revoke their sessions, close their open "
                    "challenges, forget their remembered browsers and clear their "
                    "lockout. Audited as admin_reset.")
    reset.add_argument("user_id", metavar="USER_ID")
    reset.add_argument("--reason", required=True,
                       help="why (ticket, request): 1-500 characters, kept in the audit trail")
    reset.set_defaults(admin_runner=_reset_user)

    trail = commands.add_parser(
        "audit", help="print a user's audit trail, newest first",
        description="Print a user's audit events, newest first, one per line. Times are "
                    "ISO 8601; without an offset they are UTC. --until is exclusive.")
    trail.add_argument("--user", required=True, metavar="USER_ID")
    trail.add_argument("--since", type=parse_instant, metavar="ISO8601")
    trail.add_argument("--until", type=parse_instant, metavar="ISO8601")
    trail.add_argument("--limit", type=int, default=100,
                       help="at most this many events (default 100, max 10000)")
    trail.add_argument("--json", action="store_true", help="one JSON object per line")
    trail.set_defaults(admin_runner=_audit)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the operator command ``args`` names; None when it names none of them."""
    runner: Runner | None = getattr(args, "admin_runner", None)
    if runner is None:
        return None
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mfa-service: invalid settings:\n{exc}", file=sys.stderr)
        return USAGE
    configure_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(runner(settings, args))
    except InvalidArgument as exc:
        for v in exc.violations:
            print(f"mfa-service: {v.field} {v.description}", file=sys.stderr)
        return USAGE
    except ConfigurationError as exc:
        print(f"mfa-service: {exc}", file=sys.stderr)
        return USAGE
    except StoreError as exc:
        print(f"mfa-service: {exc.message} ({settings.database_url.split('@')[-1]})",
              file=sys.stderr)
        return STORE_FAILED


def _notifier(settings: Settings) -> Notifier | None:
    """The servers' notifier (their keyring encrypts the queued notice), or None when no
    keyring is available to this command (then nothing can be queued for sending)."""
    from mfa_service.app import load_keyring
    from mfa_service.service.notices import Notifier, nothing_else

    try:
        keyring = load_keyring(settings)
    except ConfigurationError:
        return None
    return Notifier(keyring, settings.product_name,
                    timedelta(seconds=settings.notice_ttl_seconds), settings.default_locale,
                    # The reset forgets the user's browsers itself (maintenance.py).
                    on_factor_change=nothing_else)


@asynccontextmanager
async def open_store(settings: Settings, *, migrate_sqlite: bool = True,
                     ) -> AsyncIterator[Database]:
    """The configured database, with the servers' schema rules: SQLite (the embedded
    default) is migrated (unless ``migrate_sqlite`` is False: a command that must write
    nothing), PostgreSQL must already be current."""
    from mfa_service.store import migrate, open_database

    database = open_database(settings, pool_size=2)
    engine = database.engine
    try:
        await database.ping()
        if settings.is_sqlite and migrate_sqlite:
            await migrate.upgrade(engine)
        else:
            await migrate.require_current_schema(engine)
        yield database
    finally:
        await database.dispose()


@asynccontextmanager
async def open_admin(settings: Settings) -> AsyncIterator[AdminService]:
    """An AdminService on the configured database (``open_store``)."""
    from mfa_service.clock import SystemClock
    from mfa_service.service.admin import AdminService

    async with open_store(settings) as database:
        yield AdminService(database, SystemClock(), _notifier(settings))


# -- keys ----------------------------------------------------------------------------------
async def _keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    from mfa_service.app import load_keyring  # the servers' keyring, read the same way

    keyring = load_keyring(settings)
    async with open_admin(settings) as admin:
        report = await admin.rotate_keys(keyring, batch=args.batch)
    print("\n".join(format_rotation(report)))
    return OK if report.ok else PROBLEM


async def _keys_status(settings: Settings, args: argparse.Namespace) -> int:
    from mfa_service.app import load_keyring

    keyring = load_keyring(settings)
    async with open_admin(settings) as admin:
        status = await admin.key_status(keyring)
    print("\n".join(format_status(status)))
    return OK if status.ok else PROBLEM


def format_rotation(report: RotationReport) -> list[str]:
    lines = [f"primary key: {report.primary_id}"]
    for name, counts in (("factor secrets", report.factor_secrets),
                         ("outbox payloads", report.outbox_payloads)):
        lines.append(f"{name}: {counts.rekeyed} re-encrypted, {counts.skipped} skipped "
                     f"(changed meanwhile), {counts.failed} failed")
    lines += [f"failed: {f}" for f in report.failures]
    if report.failures:
        lines.append("some values could not be decrypted: is every key they name in "
                     "MFA_KEYRING? (`mfa-service keys status`)")
    elif report.factor_secrets.examined or report.outbox_payloads.examined:
        lines.append("done; `mfa-service keys status` shows which old keys are still needed")
    else:
        lines.append("nothing to re-encrypt: every stored secret is under the primary key")
    return lines


def format_status(status: KeyStatus) -> list[str]:
    width = max([len("key id"), *(len(k.key_id) for k in status.keys)])
    titles = {use: use.replace("_", " ") for use in status.keys[0].counts}
    header = "  ".join(["key id".ljust(width), *titles.values(), "state"])
    lines = [f"primary key: {status.primary_id}", header]
    for k in status.keys:
        state = ("primary" if k.key_id == status.primary_id
                 else "NOT IN KEYRING" if not k.in_keyring
                 else "needed" if k.total else "removable")
        cells = [str(k.counts[use]).rjust(len(title)) for use, title in titles.items()]
        lines.append("  ".join([k.key_id.ljust(width), *cells, state]))
    lines.append("")
    for k in status.still_needed:
        why = []
        if k.encrypted:
            why.append(f"{k.encrypted} encrypted value(s): run `mfa-service keys rotate`")
        if k.hashed:
            why.append(f"{k.hashed} HMAC-keyed value(s) (live sessions, unused recovery "
                       "codes, open challenges, remembered browsers): these cannot be "
                       "re-keyed, as only their "
                       "hash is stored; they stop needing the key when they expire, are "
                       "used or are regenerated")
        lines.append(f"{k.key_id} is still needed: " + "; ".join(why))
    for k in status.removable:
        # A server still running with this key as its primary would keep writing under it.
        lines.append(f"{k.key_id} can be removed from MFA_KEYRING: nothing stored needs it "
                     "(remove it once no server has it as its primary key)")
    for k in status.unknown:
        lines.append(f"PROBLEM: {k.key_id} is not in MFA_KEYRING but {k.total} stored "
                     "value(s) need it; they cannot be used until the key is restored")
    if not (status.still_needed or status.removable or status.unknown):
        lines.append(f"only the primary key {status.primary_id} is in use")
    return lines


# -- support desk --------------------------------------------------------------------------
async def _reset_user(settings: Settings, args: argparse.Namespace) -> int:
    async with open_admin(settings) as admin:
        report = await admin.reset_user(args.user_id, args.reason)
    print("\n".join(format_reset(report)))
    return OK


def format_reset(report: ResetReport) -> list[str]:
    who = _clean(report.user_id)
    if report.nothing_done:
        return [f"user {who}: nothing to reset (no factor, recovery code, session, "
                "remembered browser, open challenge or lockout); the request is recorded "
                "in the audit trail"]
    return [f"user {who} reset:",
            f"  factors disabled (secrets wiped): {report.factors_disabled}",
            f"  recovery codes retired: {report.recovery_codes_retired}",
            f"  sessions revoked: {report.sessions_revoked}",
            f"  remembered browsers forgotten: {report.devices_forgotten}",
            f"  open challenges closed: {report.challenges_closed}",
            f"  lockout cleared: {'yes' if report.lockout_cleared else 'no (none)'}",
            "the user can now enrol a new factor; recorded in the audit trail as admin_reset"]


# -- audit trail ---------------------------------------------------------------------------
async def _audit(settings: Settings, args: argparse.Namespace) -> int:
    async with open_admin(settings) as admin:
        events = await admin.audit_trail(args.user, since=args.since, until=args.until,
                                         limit=args.limit)
    for event in events:
        print(json.dumps(audit_json(event), sort_keys=True) if args.json
              else format_event(event))
    return OK


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: str | None) -> str:
    """A stored string made safe for a terminal line: callers and user agents come from
    the network, and a control character in them must not forge or hide output."""
    if not value:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def format_event(e: AuditEvent) -> str:
    detail = json.dumps(e.detail, sort_keys=True, ensure_ascii=True) if e.detail else "-"
    return (f"{_time(e.occurred_at)}  {_clean(e.event)}  {_clean(e.outcome)}  "
            f"caller={_clean(e.caller)}  application={_clean(e.application)}  "
            f"factor={_clean(e.factor_id)}  client_ip={_clean(e.client_ip)}  detail={detail}")


def audit_json(e: AuditEvent) -> dict[str, Any]:
    return {"event_id": e.event_id, "occurred_at": _time(e.occurred_at), "event": e.event,
            "outcome": e.outcome, "user_id": e.user_id, "factor_id": e.factor_id,
            "challenge_id": e.challenge_id, "session_id": e.session_id, "caller": e.caller,
            "application": e.application, "client_ip": e.client_ip,
            "user_agent": e.user_agent, "detail": e.detail}
