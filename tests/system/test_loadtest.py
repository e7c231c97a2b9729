"""The load generator (``mfa-service loadtest``) against a server: the report's shape and
honesty, the seeded population's validity, never its speed (performance targets do not
belong in tests; see docs/BENCHMARKS.md).

System tier: these are load runs of the whole service, each bound by time (warm-up and
duration) rather than by work, with a second server for the baseline; the fast tiers leave
them out (docs/TESTING.md). The load generator's pure parts: tests/unit/test_loadtest.py."""

from __future__ import annotations

import io
import json
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyotp
import pytest
from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import select

from mfa_service.app import App
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.loadtest import (
    Histogram,
    LoadConfig,
    LoadTestError,
    SeedConfig,
    main,
    run_loadtest,
    seed,
)
from mfa_service.loadtest.report import summary
from mfa_service.loadtest.users import read_users_file, time_step
from mfa_service.store.models import challenges, factors, user_lockouts
from tests.support.config import TEST_KEYRING, make_settings

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

LATENCY_KEYS = {"p50", "p90", "p99", "max", "mean"}
RPC_KEYS = {"count", "ok", "rps", "errors", "expected_errors", "outcomes",
            "unexpected_outcomes", "latency_ms", "hdr_histogram_us", "vs_baseline"}
SCENARIO_KEYS = {"operations", "ops_per_second", "completed", "completed_per_second",
                 "stalled_worker_seconds", "vs_baseline"}


def check_report_shape(report: dict[str, Any], rpcs: set[str]) -> None:
    """What every report promises: plain JSON, every RPC with its figures, no surprises."""
    assert json.loads(json.dumps(report)) == report  # plain JSON all the way down
    assert report["report_version"] == 2
    assert {"python", "grpcio", "protobuf", "cpu_count"} <= report["environment"].keys()
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
        assert Histogram.decode(stats["hdr_histogram_us"]).count == stats["count"], name
    for name, scenario in report["scenarios"].items():
        assert set(scenario) == SCENARIO_KEYS, name
        assert 0 < scenario["completed"] <= scenario["operations"], (name, scenario)
    assert report["unexpected"] == 0
    assert report["overall"]["count"] == sum(r["count"] for r in report["rpcs"].values())
    # A locked-out user's RESOURCE_EXHAUSTED is an expected outcome, never an error.
    assert set(report["overall"]["expected_errors"]) <= {"RESOURCE_EXHAUSTED"}


@pytest.mark.parametrize(("scenario", "rpcs"), [
    ("mixed", {"CheckSession", "ListFactors", "Challenge", "Verify"}),
    ("login", {"Challenge", "Verify"}),
    ("enroll", {"Enroll", "Verify"}),
    ("passkey", {"Enroll", "Verify", "Challenge"}),
])
async def test_a_short_run_reports_every_rpc_without_unexpected_errors(
        app: App, clock: FixedClock, scenario: str, rpcs: set[str]) -> None:
    # No warm-up for login: on the fixed clock each user has one step to spend.
    config = LoadConfig(target=f"127.0.0.1:{app.port}", connections=2, concurrency=4,
                        duration=0.6, warmup=0.2 if scenario == "mixed" else 0, users=6,
                        scenario=scenario, plaintext=True, seed=7, max_calls=200)
    progress = io.StringIO()
    # TOTP codes follow the server's clock: here the suite's fixed one.
    report = await run_loadtest(config, now=clock.now, progress=progress,
                                progress_interval=0.1)

    check_report_shape(report, rpcs)
    assert report["parameters"]["scenario"] == scenario
    assert report["parameters"]["connections"] == 2
    assert report["baseline"] is None and report["overall"]["vs_baseline"] is None
    assert report["setup"]["users"] == (0 if scenario in ("enroll", "passkey") else 6)
    if scenario == "mixed":
        assert report["rpcs"]["CheckSession"]["outcomes"] == {
            "valid": report["rpcs"]["CheckSession"]["count"]}
        assert set(report["rpcs"]["Verify"]["outcomes"]) <= {
            "VERIFY_RESULT_INVALID_CODE", "VERIFY_RESULT_MAX_ATTEMPTS_REACHED"}
    elif scenario == "login":  # each user logs in at most once per step: six users, one step
        assert report["rpcs"]["Verify"]["outcomes"] == {"VERIFY_RESULT_APPROVED": 6}
        assert report["scenarios"]["login"]["completed"] == 6
        assert report["scenarios"]["login"]["stalled_worker_seconds"] > 0
    elif scenario == "passkey":  # a new user enrols a passkey and logs in with it
        passkey = report["scenarios"]["passkey"]
        assert passkey["completed"] == passkey["operations"] > 0
        assert report["rpcs"]["Challenge"]["count"] == passkey["completed"]
        assert report["rpcs"]["Verify"]["outcomes"] == {
            "VERIFY_RESULT_APPROVED": 2 * passkey["completed"]}
    else:  # every operation a new user: Enroll, then the first code confirms it
        enroll = report["scenarios"]["enroll"]
        assert enroll["completed"] == enroll["operations"] == report["rpcs"]["Enroll"]["count"]
        assert report["rpcs"]["Verify"]["outcomes"] == {
            "VERIFY_RESULT_APPROVED": enroll["completed"]}
    assert "loadtest" in progress.getvalue()
    assert all(name in summary(report) for name in report["scenarios"])


async def test_baseline_measures_a_bare_server_first_and_reports_ratios_to_it(
        app: App, clock: FixedClock) -> None:
    config = LoadConfig(target=f"127.0.0.1:{app.port}", connections=2, concurrency=4,
                        duration=0.5, warmup=0.1, users=4, scenario="check-session",
                        plaintext=True, seed=3, baseline=True, max_calls=300)
    progress = io.StringIO()
    report = await run_loadtest(config, now=clock.now, progress=progress,
                                progress_interval=0.1)

    check_report_shape(report, {"CheckSession"})
    base = report["baseline"]
    assert base["target"].startswith("127.0.0.1:") and base["target"] != config.target
    assert set(base["rpcs"]) == {"CheckSession"}
    assert base["overall"]["count"] > 0 and base["overall"]["errors"] == {}
    assert base["rpcs"]["CheckSession"]["outcomes"] == {"valid": base["overall"]["count"]}
    for entry in (report["overall"], report["rpcs"]["CheckSession"]):
        ratios = entry["vs_baseline"]
        assert set(ratios) == {"rps", "p99"}
        assert ratios["rps"] > 0 and ratios["p99"] > 0
    check = report["rpcs"]["CheckSession"]
    assert check["vs_baseline"]["rps"] == pytest.approx(
        check["rps"] / base["overall"]["rps"], rel=0.01)
    scenario = report["scenarios"]["check-session"]["vs_baseline"]
    assert set(scenario) == {"ops", "completed", "p99"} and scenario["ops"] > 0
    assert "baseline" in progress.getvalue()
    table = summary(report)
    assert table.splitlines()[1].startswith("baseline") and "x" in table


# -- seeding --------------------------------------------------------------------------------
async def test_seeded_users_and_sessions_are_accepted_by_a_server_on_that_database(
        app: App, stub: Stub, clock: FixedClock, database_url: str, tmp_path: Path) -> None:
    """Seed straight into the database the running server uses, with its keyring: it
    honours the seeded sessions and the seeded users' TOTP codes, and the load generator
    needs no enrolment setup for them."""
    users_file = tmp_path / "users.jsonl"
    result = await seed(make_settings(database_url), Keyring.parse(TEST_KEYRING),
                        SeedConfig(users=7, sessions=4, out=users_file, batch=3),
                        now=clock.now())
    assert (result.users, result.sessions) == (7, 4)
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600  # secrets and tokens
    users = read_users_file(users_file)
    assert len(users) == 7 and len({u.user_id for u in users}) == 7
    assert [bool(u.token) for u in users] == [True] * 4 + [False] * 3
    assert {u.last_step for u in users} == {time_step(clock.now())}

    # Sessions: valid from both applications; they name the user and the app factor.
    for user in users[:4]:
        for application in (pb.APPLICATION_PORTAL, pb.APPLICATION_BACKOFFICE):
            check = await stub.CheckSession(pb.CheckSessionRequest(
                session_token=user.token, application=application))
            assert check.valid and check.user_id == user.user_id
            assert check.method == pb.METHOD_AUTHENTICATOR_APP
    # Factors: what a confirmed enrolment leaves: the app and the recovery-code factor.
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=users[0].user_id))
    assert [(f.factor_id, f.method, f.status) for f in listed.factors] == [
        (users[0].factor_id, pb.METHOD_AUTHENTICATOR_APP, pb.FACTOR_STATUS_ACTIVE),
        (listed.factors[1].factor_id, pb.METHOD_RECOVERY_CODE, pb.FACTOR_STATUS_ACTIVE)]
    # A login with the app's next code (the seeding spent the current step, RFC 6238 5.2).
    user = users[6]
    opened = await stub.Challenge(pb.ChallengeRequest(
        user_id=user.user_id, factor_id=user.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    replayed = await stub.Verify(pb.VerifyRequest(
        challenge_id=opened.challenge_id, code=pyotp.TOTP(user.secret).at(clock.now())))
    assert replayed.result == pb.VERIFY_RESULT_INVALID_CODE
    approved = await stub.Verify(pb.VerifyRequest(
        challenge_id=opened.challenge_id, code=user.code(user.last_step + 1)))
    assert approved.result == pb.VERIFY_RESULT_APPROVED and approved.session.session_token

    # The generator on that file: no setup; sessions valid; each user logs in once.
    target = f"127.0.0.1:{app.port}"
    checks = await run_loadtest(LoadConfig(
        target=target, connections=2, concurrency=3, duration=0.4, warmup=0,
        scenario="check-session", plaintext=True, users_file=users_file, max_calls=100),
        now=clock.now)
    check_report_shape(checks, {"CheckSession"})
    assert checks["setup"] == {**checks["setup"], "users": 7, "sessions": 4,
                               "source": "users-file"}
    logins = await run_loadtest(LoadConfig(
        target=target, connections=2, concurrency=3, duration=0.4, warmup=0,
        scenario="login", plaintext=True, users_file=users_file, users=6), now=clock.now)
    check_report_shape(logins, {"Challenge", "Verify"})
    assert logins["rpcs"]["Verify"]["outcomes"] == {"VERIFY_RESULT_APPROVED": 6}
    # The steps spent are written back: a second run will not replay them.
    after = read_users_file(users_file)
    assert [u.last_step for u in after] == [time_step(clock.now()) + 1] * 6 + [
        time_step(clock.now())]
    assert [(u.user_id, u.token) for u in after] == [(u.user_id, u.token) for u in users]


async def test_seeded_rows_are_the_rows_a_real_enrolment_leaves(
        app: App, stub: Stub, fresh_clock: FixedClock, database_url: str,
        tmp_path: Path) -> None:
    """seed writes the tables itself (COPY), not through the repositories: this catches a
    column the service starts filling (``established_at`` was one) that seed would leave
    out. Per method, the same columns are set, and the same values where no id, secret or
    time is involved."""
    result = await seed(make_settings(database_url), Keyring.parse(TEST_KEYRING),
                        SeedConfig(users=1, sessions=0, out=tmp_path / "u.jsonl"),
                        now=fresh_clock.now())
    (seeded,) = read_users_file(tmp_path / "u.jsonl")
    real = f"real-{uuid.uuid4().hex[:10]}"
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=real, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    confirmed = await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id,
        code=pyotp.TOTP(enrolled.totp_secret).at(fresh_clock.now())))
    assert confirmed.result == pb.VERIFY_RESULT_APPROVED and result.users == 1

    async def rows(user_id: str) -> dict[str, dict[str, Any]]:
        async with app.database.engine.connect() as conn:
            found = (await conn.execute(select(factors).where(
                factors.c.user_id == user_id, factors.c.status == "active"))).mappings()
            return {row["method"]: dict(row) for row in found}

    def shape(row: dict[str, Any]) -> dict[str, Any]:
        varying = {"id", "user_id", "label", "masked_destination", "secret_ciphertext",
                   "last_totp_step", "created_at", "confirmed_at", "last_used_at",
                   "established_at"}
        return {k: (v is not None) if k in varying else v for k, v in row.items()}

    mine, theirs = await rows(seeded.user_id), await rows(real)
    assert set(mine) == set(theirs) == {"authenticator_app", "recovery_code"}
    for method in mine:
        assert shape(mine[method]) == shape(theirs[method]), method
    # An app enrolled without an account name is labelled with the user id.
    app_row = mine["authenticator_app"]
    assert app_row["label"] == app_row["masked_destination"] == seeded.user_id
    assert theirs["authenticator_app"]["label"] == real

    # The per-user lock's counter row: Enroll created it and the confirming Verify locked
    # it again. Without it, every seeded user's first Challenge read its factor twice
    # (the lock-and-read statement cannot vouch for a row it did not see), a cost no
    # enrolled user pays.
    async def counter(user_id: str) -> dict[str, Any] | None:
        async with app.database.engine.connect() as conn:
            row = (await conn.execute(select(user_lockouts).where(
                user_lockouts.c.user_id == user_id))).mappings().first()
            return {k: v for k, v in row.items() if k != "user_id"} if row else None

    assert await counter(seeded.user_id) == await counter(real) is not None

    # The challenge Enroll opened and the first code approved. Without it a seeded
    # database holds no challenge at all, and PostgreSQL plans the challenge statements
    # for an empty table (a sequential scan that the prepared statements keep).
    async def confirmations(user_id: str) -> list[dict[str, Any]]:
        async with app.database.engine.connect() as conn:
            found = (await conn.execute(select(challenges).where(
                challenges.c.user_id == user_id))).mappings()
            varying = {"id", "user_id", "factor_id", "caller", "created_at", "expires_at",
                       "approved_at"}
            return [{k: (v is not None) if k in varying else v for k, v in row.items()}
                    for row in found]

    mine_challenges = await confirmations(seeded.user_id)
    assert mine_challenges == await confirmations(real)
    assert [c["state"] for c in mine_challenges] == ["approved"]


def test_seed_command_fills_sqlite_with_the_servers_keyring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``mfa-service loadtest seed`` reads the keyring and database as ``serve`` does."""
    monkeypatch.setenv("MFA_KEYRING", TEST_KEYRING)
    db = tmp_path / "seed.db"
    out = tmp_path / "users.jsonl"
    code = main(["seed", "--users", "25", "--sessions", "10", "--out", str(out),
                 "--database-url", f"sqlite+aiosqlite:///{db}", "--prefix", "cli",
                 "--batch", "10", "--recovery-codes"])
    assert code == 0
    summary_line = json.loads(capsys.readouterr().out)
    assert summary_line["users"] == 25 and summary_line["backend"] == "sqlite"
    assert summary_line["users_per_second"] > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["user_id"] for line in lines] == [f"cli-{i:07d}" for i in range(1, 26)]
    assert set(lines[0]) == {"user_id", "factor_id", "totp_secret", "session_token",
                             "last_totp_step"}
    assert sum(line["session_token"] is not None for line in lines) == 10
    with sqlite3.connect(db) as conn:
        counts = dict(conn.execute(
            "SELECT method || ':' || status, count(*) FROM factors GROUP BY 1").fetchall())
        assert counts == {"authenticator_app:active": 25, "recovery_code:active": 25}
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (10,)
        assert conn.execute("SELECT count(*) FROM recovery_codes WHERE used_at IS NULL"
                            ).fetchone() == (250,)
        secret, key_id = conn.execute(
            "SELECT secret_ciphertext, secret_key_id FROM factors WHERE id = ?",
            (lines[0]["factor_id"],)).fetchone()
    # Encrypted as the service does: AES-GCM bound to factor and user (factors/totp.py).
    from mfa_service.factors.totp import secret_aad

    plain = Keyring.parse(TEST_KEYRING).decrypt(
        key_id, secret, secret_aad(lines[0]["factor_id"], lines[0]["user_id"]))
    assert pyotp.TOTP(lines[0]["totp_secret"]).byte_secret() == plain


@pytest.mark.parametrize("argv", [
    ["--users", "3", "--sessions", "4"],
    ["--users", "0"],
    ["--users", "3", "--prefix", "bad:prefix"],
])
def test_seed_refuses_impossible_populations(argv: list[str], tmp_path: Path) -> None:
    assert main(["seed", *argv, "--out", str(tmp_path / "u.jsonl"),
                 "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"]) == 2
    assert not (tmp_path / "u.jsonl").exists()


# -- pieces ---------------------------------------------------------------------------------


def test_a_users_file_is_not_for_the_enroll_scenario(tmp_path: Path) -> None:
    users = tmp_path / "users.jsonl"
    users.write_text("")
    with pytest.raises(LoadTestError, match="enroll"):
        LoadConfig(target="127.0.0.1:1", scenario="enroll", users_file=users).check()
    with pytest.raises(LoadTestError, match="not a file"):
        LoadConfig(target="127.0.0.1:1", users_file=tmp_path / "missing").check()
