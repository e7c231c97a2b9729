"""The command line of ``mfa-service loadtest`` and ``mfa-service loadtest seed``, parsed
into frozen dataclasses that the rest of the package reads (and nothing else does)."""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# What one operation of each scenario is (the report counts operations per second):
#   check-session           one CheckSession of a live session (either application)
#   list-factors            one ListFactors
#   challenge-verify-wrong  Challenge LOGIN + Verify with a wrong code (attempts, lockout)
#   login                   Challenge LOGIN + Verify with the right code -> a session
#   enroll                  Enroll an authenticator app for a new user + Verify to confirm
#   passkey                 a new user enrols a passkey (Enroll + Verify the registration),
#                           then logs in with it (Challenge + Verify an assertion)
#   mixed                   the production shape below
SCENARIOS = ("mixed", "check-session", "list-factors", "challenge-verify-wrong", "login",
             "enroll", "passkey")
# Production shape: sessions are checked on every page, factors listed on the profile page,
# and wrong codes are what an attacker (or a clumsy user) sends.
MIXED: tuple[tuple[str, float], ...] = (
    ("check-session", 0.8), ("list-factors", 0.1), ("challenge-verify-wrong", 0.1))
# The scenario run against the bare server of --baseline (see baseline.py).
ECHO = "echo"

DEFAULT_USERS = 200  # users enrolled by the setup when no --users-file is given
MAX_ENROLLED_USERS = 100_000
MAX_FILE_USERS = 10_000_000

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3

# User ids the seeder makes: PREFIX-0000001. Plain characters, no ':' (the otpauth label
# forbids it) and short enough for the 128-character user_id column.
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LoadTestError(Exception):
    """The run could not start or its setup failed (not: errors under load)."""


@dataclass(frozen=True)
class LoadConfig:
    """One run's parameters; the CLI flags map one to one."""

    target: str
    connections: int = 8
    concurrency: int = 16
    duration: float = 10.0
    warmup: float = 2.0
    # Users to enrol in the setup (default 200), or to read from ``users_file`` (default:
    # all of them).
    users: int | None = None
    scenario: str = "mixed"
    token: str | None = None
    plaintext: bool = False
    ca_file: Path | None = None
    allow_remote: bool = False
    max_calls: int | None = None
    rpc_timeout: float = 10.0
    seed: int | None = None
    users_file: Path | None = None
    baseline: bool = False

    @property
    def wanted_users(self) -> int | None:
        """How many users the setup provides; None means every user of the file."""
        if self.users is not None or self.users_file is not None:
            return self.users
        return DEFAULT_USERS

    def check(self) -> None:
        """Refuse what would leave the machine or is not a bounded run."""
        host = target_host(self.target)
        if not self.allow_remote and not is_loopback(host):
            raise LoadTestError(
                f"{self.target} is not a loopback address; load stays on this machine "
                "unless --allow-remote is given")
        if self.scenario not in SCENARIOS and self.scenario != ECHO:
            raise LoadTestError(f"unknown scenario {self.scenario!r}; one of {SCENARIOS}")
        max_users = MAX_FILE_USERS if self.users_file is not None else MAX_ENROLLED_USERS
        for name, value, low, high in (
                ("connections", self.connections, 1, 256),
                ("concurrency", self.concurrency, 1, 4096),
                ("users", self.users if self.users is not None else 1, 1, max_users),
                ("duration", self.duration, 0.1, 3600),
                ("warmup", self.warmup, 0, 600),
                ("rpc_timeout", self.rpc_timeout, 0.1, 120)):
            if not low <= value <= high:
                raise LoadTestError(f"{name} must be between {low} and {high}, not {value}")
        if self.max_calls is not None and self.max_calls < 1:
            raise LoadTestError("max_calls must be at least 1")
        if self.users_file is not None and self.scenario in ("enroll", "passkey"):
            raise LoadTestError(f"the {self.scenario} scenario makes its own users; "
                                "drop --users-file")
        if self.users_file is not None and not self.users_file.is_file():
            raise LoadTestError(f"--users-file {self.users_file} is not a file")


@dataclass(frozen=True)
class SeedConfig:
    """``mfa-service loadtest seed``: a population written straight into the store."""

    users: int
    sessions: int
    out: Path
    database_url: str | None = None  # default: MFA_DATABASE_URL, as the server reads it
    prefix: str | None = None  # default: seed-<8 random hex digits>
    batch: int = 10_000  # users per transaction
    recovery_codes: bool = False

    def check(self) -> None:
        if not 1 <= self.users <= MAX_FILE_USERS:
            raise LoadTestError(f"--users must be between 1 and {MAX_FILE_USERS}")
        if not 0 <= self.sessions <= self.users:
            raise LoadTestError("--sessions must be between 0 and --users (one per user)")
        if not 1 <= self.batch <= 100_000:
            raise LoadTestError("--batch must be between 1 and 100000")
        if self.prefix is not None and not PREFIX_RE.fullmatch(self.prefix):
            raise LoadTestError("--prefix must be 1-64 letters, digits, '.', '_' or '-'")


def target_host(target: str) -> str:
    """The host of HOST:PORT or [V6]:PORT; the form is checked, the name is not resolved."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadTestError(f"--target must be HOST:PORT (e.g. 127.0.0.1:50051), not {target!r}")
    return host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost could resolve anywhere


# -- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfa-service loadtest",
        description="Drive a local mfa-service through the generated async stubs and report "
                    "RPS and latency percentiles per RPC as JSON. "
                    "`mfa-service loadtest seed --help`: write a population of users "
                    "straight into the database first.")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server (loopback)")
    parser.add_argument("--connections", type=int, default=8,
                        help="separate channels (TCP connections) to spread calls over")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--users", type=int,
                        help=f"users enrolled during setup (default {DEFAULT_USERS}); with "
                             "--users-file, how many of its users to load (default: all)")
    parser.add_argument("--users-file", type=Path,
                        help="users written by `loadtest seed`: no enrolment setup at all "
                             "(their TOTP steps are written back after a login run)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="mixed",
                        help="mixed = 80%% check-session, 10%% list-factors, "
                             "10%% challenge-verify-wrong")
    parser.add_argument("--baseline", action="store_true",
                        help="first measure a bare grpc.aio server (a separate process on "
                             "loopback) the same way, and report ratios to it")
    parser.add_argument("--report", type=Path, help="write the JSON report here "
                                                   "(default: stdout)")
    parser.add_argument("--token", help="bearer token for the authorization metadata")
    parser.add_argument("--plaintext", action="store_true", help="no TLS")
    parser.add_argument("--ca-file", type=Path, help="CA to verify the server with (TLS)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback target")
    parser.add_argument("--max-calls", type=int, help="stop after this many measured calls")
    parser.add_argument("--rpc-timeout", type=float, default=10.0, help="deadline per call (s)")
    parser.add_argument("--seed", type=int, help="seed for the random choices")
    return parser


def build_seed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfa-service loadtest seed",
        description="Write N users with an ACTIVE authenticator app and M live sessions "
                    "straight into the database (multi-row inserts), with the keyring the "
                    "server uses (MFA_KEYRING, or the development key file), and one JSON "
                    "line per user to --out for `loadtest --users-file`.")
    parser.add_argument("--users", type=int, required=True, help="users to create")
    parser.add_argument("--sessions", type=int, default=0,
                        help="live sessions to open, one for each of the first M users")
    parser.add_argument("--out", type=Path, required=True, help="the users file to write")
    parser.add_argument("--database-url",
                        help="database to fill (default: MFA_DATABASE_URL, as `serve` reads "
                             "it); the schema must be current (`mfa-service migrate`)")
    parser.add_argument("--prefix", help="user ids are PREFIX-0000001, ... "
                                         "(default: seed-<random>)")
    parser.add_argument("--batch", type=int, default=10_000, help="users per transaction")
    parser.add_argument("--recovery-codes", action="store_true",
                        help="also store 10 hashed recovery codes per user (codes nobody "
                             "is shown); off by default, see docs/BENCHMARKS.md")
    return parser


def parse_load_args(argv: Sequence[str] | None) -> tuple[LoadConfig, Path | None]:
    """The run's config and where its report goes (None: stdout)."""
    args = build_parser().parse_args(argv)
    config = LoadConfig(
        target=args.target, connections=args.connections, concurrency=args.concurrency,
        duration=args.duration, warmup=args.warmup, users=args.users, scenario=args.scenario,
        token=args.token, plaintext=args.plaintext, ca_file=args.ca_file,
        allow_remote=args.allow_remote, max_calls=args.max_calls,
        rpc_timeout=args.rpc_timeout, seed=args.seed, users_file=args.users_file,
        baseline=args.baseline)
    return config, args.report


def parse_seed_args(argv: Sequence[str]) -> SeedConfig:
    args = build_seed_parser().parse_args(argv)
    return SeedConfig(users=args.users, sessions=args.sessions, out=args.out,
                      database_url=args.database_url, prefix=args.prefix, batch=args.batch,
                      recovery_codes=args.recovery_codes)
