"""SMS and voice abuse beyond one destination: codes per number range and per country an
hour, whichever users ask, and a daily budget of phone codes for the whole service (SMS
pumping spreads over a rented range of numbers, toll fraud over an expensive country;
each number stays under the per-destination limit). Attacked from outside through the
generated client, on SQLite and PostgreSQL, with a fixed clock."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import phonenumbers
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from phonenumbers import PhoneNumberType
from sqlalchemy import select

from mfa_service import telemetry
from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.store.models import phone_budget_days
from tests.support.client import enroll_app, rich_error
from tests.support.config import TEST_KEYRING, make_settings
from tests.support.rig import Rig, code_in, enroll_phone, eventually, phone_text, unique_phone

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

AREA = "ERROR_REASON_PHONE_AREA_RATE_LIMITED"
BUDGET = "ERROR_REASON_PHONE_BUDGET_EXHAUSTED"
Server = Callable[..., Awaitable[tuple[App, "Stub"]]]


@pytest.fixture
async def server(database_url: str, fresh_clock: FixedClock) -> AsyncIterator[Server]:
    """Servers on the shared database with the limits a test sets (codes only queued)."""
    started: list[tuple[App, aio.Channel]] = []

    async def start(**settings: Any) -> tuple[App, Stub]:
        observability = settings.pop("observability", None)
        app = await create_server(make_settings(database_url, **settings), clock=fresh_clock,
                                  keyring=Keyring.parse(TEST_KEYRING),
                                  observability=observability)
        channel = aio.insecure_channel(f"127.0.0.1:{app.port}")
        started.append((app, channel))
        return app, pb_grpc.TwoFactorServiceStub(channel)

    fresh_clock.advance(3600)  # no send of an earlier test in any hourly window
    try:
        yield start
    finally:
        for app, channel in started:
            await channel.close()
            await app.stop(0)


def numbers_in(prefix: str, n: int, start: int = 0) -> list[str]:
    """``n`` valid mobile numbers of the range ``prefix`` (the number less 4 digits)."""
    out = [f"{prefix}{i:04d}" for i in range(start, start + n)]
    for number in out:
        parsed = phonenumbers.parse(number)
        assert phonenumbers.is_valid_number(parsed), number
        assert phonenumbers.number_type(parsed) in (PhoneNumberType.MOBILE,
                                                    PhoneNumberType.FIXED_LINE_OR_MOBILE)
    return out


def mobile_in(region: str) -> str:
    """A valid mobile number of ``region``, practically unique (and so, mostly, in a range
    of its own)."""
    example = phonenumbers.example_number_for_type(region, PhoneNumberType.MOBILE)
    assert example is not None
    national = str(example.national_number)
    while True:
        tail = f"{uuid.uuid4().int % 10**6:06d}"
        candidate = phonenumbers.parse(f"+{example.country_code}{national[:-6]}{tail}")
        if phonenumbers.is_valid_number(candidate) and phonenumbers.number_type(
                candidate) in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE):
            return phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.E164)


def fresh_prefix(country: str) -> str:
    """A range of Danish mobile numbers (+45 2xxx xxxx) no other test uses."""
    assert country == "DK"
    while True:
        prefix = f"+452{uuid.uuid4().int % 1000:03d}"
        if all(phonenumbers.number_type(phonenumbers.parse(f"{prefix}{end}")) in (
                PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
               for end in ("0000", "9999")):
            return prefix


def enroll(stub: Stub, user_id: str, number: str) -> Awaitable[pb.EnrollResponse]:
    return stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PHONE,
                                        phone_number=number, channel=pb.CHANNEL_SMS,
                                        application=pb.APPLICATION_PORTAL))


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, int | None]:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    e = rich_error(err.value)
    return e.code, e.reason, e.retry_seconds


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def next_utc_day(clock: FixedClock, at: time = time(1, 0, 15)) -> None:
    """Move to a UTC day no earlier test spent phone codes on (the budget is per day)."""
    clock.set(datetime.combine(clock.now().astimezone(UTC).date() + timedelta(days=1), at,
                               tzinfo=UTC))


def seconds_to_midnight(clock: FixedClock) -> int:
    now = clock.now().astimezone(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), time(0), tzinfo=UTC)
    return int((midnight - now).total_seconds())


# -- per number range ----------------------------------------------------------------------------
async def test_many_users_texting_one_range_hit_its_cap_and_another_range_still_works(
        server: Server, fresh_clock: FixedClock) -> None:
    _, stub = await server(max_sends_per_phone_prefix=3)
    pumped = numbers_in(fresh_prefix("DK"), 5)
    for number in pumped[:3]:  # three attacker accounts, three numbers of one range
        await enroll(stub, new_user(), number)
        fresh_clock.advance(10)
    # A fourth user, a fourth number of the range (never sent to before): refused, and
    # told to come back when the first of the three leaves the hour.
    code, reason, retry = await refusal(enroll(stub, new_user(), pumped[3]))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, AREA)
    assert retry == 3600 - 30
    # A number of another range of the same country goes through at the same moment.
    await enroll(stub, new_user(), numbers_in(fresh_prefix("DK"), 1)[0])
    # RetryInfo told the truth: a second early, still refused; then the range has room.
    fresh_clock.advance(3600 - 30 - 1)
    assert (await refusal(enroll(stub, new_user(), pumped[3])))[1] == AREA
    fresh_clock.advance(1)
    await enroll(stub, new_user(), pumped[3])


async def test_a_refused_range_is_audited_for_the_user_without_the_number(
        server: Server, fresh_clock: FixedClock) -> None:
    _, stub = await server(max_sends_per_phone_prefix=1)
    first, second = numbers_in(fresh_prefix("DK"), 2)
    await enroll(stub, new_user(), first)
    user = new_user()
    assert (await refusal(enroll(stub, user, second)))[1] == AREA
    events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user))).events
    [refused] = [e for e in events if e.event == "send_refused"]
    assert dict(refused.detail) == {"limit": "phone_prefix", "method": "phone",
                                    "region": "DK"}
    assert refused.outcome == "refused"
    assert not any(second[1:] in str(e) or second[-6:] in str(e) for e in events)


# -- per country ---------------------------------------------------------------------------------
async def test_many_users_calling_one_country_hit_its_cap_and_another_country_still_works(
        server: Server, fresh_clock: FixedClock) -> None:
    _, stub = await server(max_sends_per_phone_country=3)
    norway = [mobile_in("NO") for _ in range(4)]  # the range cap (30) is far away
    for number in norway[:3]:
        await enroll(stub, new_user(), number)
        fresh_clock.advance(60)
    code, reason, retry = await refusal(enroll(stub, new_user(), norway[3]))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, AREA)
    assert retry == 3600 - 180
    await enroll(stub, new_user(), mobile_in("SE"))  # Sweden: fine
    fresh_clock.advance(3600 - 180)
    await enroll(stub, new_user(), norway[3])


# -- the daily budget ------------------------------------------------------------------------------
def refusals_counted(reader: InMemoryMetricReader, limit: str) -> int:
    data = reader.get_metrics_data()
    total = 0
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "mfa.sends.refused":
                    continue
                for point in metric.data.data_points:
                    if dict(point.attributes or {}).get("mfa.limit") == limit:
                        total += int(getattr(point, "value", 0))
    return total


async def test_a_spent_daily_budget_refuses_phone_codes_until_midnight_and_other_methods_work(
        rig: Rig, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    next_utc_day(rig.clock)
    user, other = new_user(), new_user()
    factor_id, number = await enroll_phone(rig, user)  # 1 phone code today
    # A second server, as another process would be, with a budget of 2: one code left.
    reader = InMemoryMetricReader()
    app2 = await create_server(
        make_settings(database_url, phone_daily_budget=2), clock=rig.clock,
        keyring=Keyring.parse(TEST_KEYRING),
        observability=telemetry.Telemetry.create(metric_readers=[reader]))
    channel = aio.insecure_channel(f"127.0.0.1:{app2.port}")
    stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
    try:
        login = pb.ChallengeRequest(user_id=user, factor_id=factor_id,
                                    purpose=pb.PURPOSE_LOGIN, application=pb.APPLICATION_PORTAL)
        await stub.Challenge(login)  # the last code of the day
        rig.clock.advance(40)
        caplog.set_level(logging.WARNING, logger="mfa_service.limits")
        for call in (stub.Challenge(login),
                     stub.Challenge(pb.ChallengeRequest(
                         user_id=user, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
                         channel=pb.CHANNEL_VOICE, application=pb.APPLICATION_PORTAL)),
                     enroll(stub, other, numbers_in(fresh_prefix("DK"), 1)[0])):
            code, reason, retry = await refusal(call)
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, BUDGET)
            assert retry == seconds_to_midnight(rig.clock)  # the next UTC day's budget
        # Email and the authenticator app still work, for the same user too.
        await stub.Enroll(pb.EnrollRequest(user_id=other, method=pb.METHOD_EMAIL,
                                           email=f"{other}@example.com",
                                           application=pb.APPLICATION_PORTAL))
        await enroll_app(stub, new_user(), rig.clock)
        # Audited (one row per refusal, for the user), counted, logged once each.
        for who, n in ((user, 2), (other, 1)):
            events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=who))).events
            refused = [dict(e.detail) for e in events if e.event == "send_refused"]
            assert refused == [{"limit": "phone_daily_budget", "method": "phone",
                                "region": "DK"}] * n
        assert refusals_counted(reader, "phone_daily_budget") == 3
        lines = [r for r in caplog.records if r.name == "mfa_service.limits"]
        assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in lines)
        digits = re.sub(r"\D", "", number)
        assert not any(digits[-6:] in re.sub(r"\D", "", r.getMessage() + str(r.__dict__))
                       for r in lines)
        # Midnight UTC: a new budget.
        rig.clock.advance(seconds_to_midnight(rig.clock))
        await stub.Challenge(login)
    finally:
        await channel.close()
        await app2.stop(0)


async def test_concurrent_challenges_in_two_processes_never_overspend_the_budget(
        rig: Rig, database_url: str) -> None:
    """N users ask for a code at once through two servers (two pools, as two processes
    would); the budget leaves room for B < N: exactly B are sent. Every number is in a
    country of its own, so no destination, range or country lock orders them: only the
    budget's own statement stands between them and overspending."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite serialises every writing transaction: nothing to race")
    next_utc_day(rig.clock)
    regions = ["DK", "NO", "SE", "FI", "DE", "NL", "BE", "FR", "ES", "IT", "GB", "PL"]
    n, b = len(regions), 5
    factors = []
    for region in regions:  # enrolled on the rig's server: n codes spent today
        user = new_user()
        factor_id, _ = await enroll_phone(rig, user, mobile_in(region))
        factors.append((user, factor_id))
    apps, channels = [], []
    try:
        for _ in range(2):
            app = await create_server(make_settings(database_url, phone_daily_budget=n + b),
                                      clock=rig.clock, keyring=Keyring.parse(TEST_KEYRING))
            apps.append(app)
            channels.append(aio.insecure_channel(f"127.0.0.1:{app.port}"))
        stubs: list[Stub] = [pb_grpc.TwoFactorServiceStub(c) for c in channels]
        results = await asyncio.gather(*(
            stubs[i % 2].Challenge(pb.ChallengeRequest(
                user_id=user, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
                application=pb.APPLICATION_PORTAL))
            for i, (user, factor_id) in enumerate(factors)), return_exceptions=True)
        sent = [r for r in results if isinstance(r, pb.ChallengeResponse)]
        refused = [rich_error(r).reason for r in results if isinstance(r, aio.AioRpcError)]
        assert len(sent) == b
        assert refused == [BUDGET] * (n - b)
        async with apps[0].database.engine.connect() as conn:
            used = (await conn.execute(select(phone_budget_days.c.used).where(
                phone_budget_days.c.day == rig.clock.now().date()))).scalar_one()
        assert used == n + b
    finally:
        for c in channels:
            await c.close()
        for app in apps:
            await app.stop(0)


# -- the defaults never bother a normal user ------------------------------------------------------
async def ask(rig: Rig, user: str, factor_id: str, number: str) -> None:
    """A code the user never types (it did not arrive, they ask again): sent, nothing more."""
    before = len(rig.calls_to(number))
    await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    await eventually(lambda: rig.calls_to(number)[before:])


async def phone_login(rig: Rig, user: str, factor_id: str, number: str,
                      channel: pb.Channel.ValueType = pb.CHANNEL_SMS) -> None:
    before = len(rig.calls_to(number))
    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN, channel=channel,
        application=pb.APPLICATION_PORTAL))
    text = phone_text((await eventually(lambda: rig.calls_to(number)[before:]))[-1])
    code = (code_in(text) if channel == pb.CHANNEL_SMS
            else re.findall(r"\d(?:, \d){5}", text)[0].replace(", ", ""))
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
    assert ok.result == pb.VERIFY_RESULT_APPROVED


async def old_number_consents(rig: Rig, user: str, factor_id: str, number: str) -> str:
    """A PURPOSE_CHANGE_PHONE challenge on the old number, approved with the code texted
    to it: the proof a number change consumes (its id)."""
    before = len(rig.calls_to(number))
    proof = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=user, factor_id=factor_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=pb.APPLICATION_PORTAL))
    sms = (await eventually(lambda: rig.calls_to(number)[before:]))[-1]
    assert (await rig.stub.Verify(pb.VerifyRequest(
        challenge_id=proof.challenge_id, code=code_in(phone_text(sms))))).result == \
        pb.VERIFY_RESULT_APPROVED
    return proof.challenge_id


async def test_defaults_let_a_user_enrol_log_in_by_text_and_voice_and_change_number(
        rig: Rig) -> None:
    user = new_user()
    factor_id, number = await enroll_phone(rig, user)
    for channel in (pb.CHANNEL_SMS, pb.CHANNEL_VOICE, pb.CHANNEL_SMS, pb.CHANNEL_VOICE):
        rig.clock.advance(5 * 60)
        await phone_login(rig, user, factor_id, number, channel)
    # A resend: the first text did not arrive, the user asks again after the cooldown.
    rig.clock.advance(5 * 60)
    await ask(rig, user, factor_id, number)
    rig.clock.advance(31)
    await phone_login(rig, user, factor_id, number)
    # A new number, in the same range as the old one (same operator block).
    rig.clock.advance(5 * 60)
    proof = await old_number_consents(rig, user, factor_id, number)
    rig.clock.advance(5 * 60)
    new_number = number[:-4] + f"{(int(number[-4:]) + 1) % 10_000:04d}"
    new_id, _ = await enroll_phone(rig, user, new_number, proof=proof)
    rig.clock.advance(5 * 60)
    await phone_login(rig, user, new_id, new_number, pb.CHANNEL_VOICE)


async def test_defaults_let_a_normal_phone_day_pass_within_ten_minutes(rig: Rig) -> None:
    """Enrol a phone, log in by text, switch to a call, change the number (a code to the
    old one, then one to the new), log in on the new number: six codes in ten minutes,
    none refused by any limit (per user, destination, range, country, budget)."""
    user = new_user()
    factor_id, number = await enroll_phone(rig, user)  # 1: to the old number
    await phone_login(rig, user, factor_id, number, pb.CHANNEL_SMS)  # 2
    rig.clock.advance(31)
    await phone_login(rig, user, factor_id, number, pb.CHANNEL_VOICE)  # 3
    rig.clock.advance(31)
    proof = await old_number_consents(rig, user, factor_id, number)  # 4
    rig.clock.advance(31)
    new_id, new_number = await enroll_phone(rig, user, unique_phone(),  # 5: to the new one
                                            proof=proof)
    await phone_login(rig, user, new_id, new_number, pb.CHANNEL_SMS)  # 6


async def test_defaults_let_a_team_on_one_number_block_log_in_within_the_hour(
        rig: Rig) -> None:
    """15 colleagues whose numbers share a range (a company contract), each logging in
    within the same hour and asking once for a resend: 30 codes to one range."""
    team = numbers_in(fresh_prefix("DK"), 15)
    members = []
    for number in team:  # enrolled over an earlier hour
        user = new_user()
        factor_id, _ = await enroll_phone(rig, user, number)
        members.append((user, factor_id, number))
    rig.clock.advance(3600)
    for user, factor_id, number in members:
        await ask(rig, user, factor_id, number)
        rig.clock.advance(31)
        await phone_login(rig, user, factor_id, number)
        rig.clock.advance(60)
