"""``mfa-service loadtest [seed] ...``: parse, run, print, exit status.

Exit status: 0 fine; 1 unexpected errors or outcomes under load; 2 bad usage (including a
non-loopback target without --allow-remote); 3 connecting, setup or seeding failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from mfa_service.loadtest.config import (
    EXIT_OK,
    EXIT_SETUP,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    LoadTestError,
    SeedConfig,
    parse_load_args,
    parse_seed_args,
)

T = TypeVar("T")


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, T]], T]:
    run: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the client is CPU-bound too (~0.7 core at 4-5k RPS: docs/BENCHMARKS.md)

        run = uvloop.run
    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["seed"]:
        return seed_main(argv[1:])
    config, report_path = parse_load_args(argv)
    try:
        config.check()
    except LoadTestError as exc:
        print(f"mfa-service loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from mfa_service.loadtest.report import summary
    from mfa_service.loadtest.runner import run_loadtest

    try:
        report = _event_loop_runner()(run_loadtest(config, progress=sys.stderr))
    except LoadTestError as exc:
        print(f"mfa-service loadtest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    text = json.dumps(report, indent=2)
    if report_path is not None:
        report_path.write_text(text + "\n")
    else:
        print(text)
    print(summary(report), file=sys.stderr)
    return EXIT_UNEXPECTED if report["unexpected"] else EXIT_OK


def seed_main(argv: Sequence[str]) -> int:
    """``loadtest seed``: settings and keyring exactly as ``serve`` reads them
    (MFA_* variables / .env; MFA_KEYRING or the development key file)."""
    from pydantic import ValidationError

    from mfa_service.app import load_keyring
    from mfa_service.errors import ConfigurationError
    from mfa_service.loadtest.seed import seed
    from mfa_service.settings import Settings

    config: SeedConfig = parse_seed_args(argv)
    try:
        config.check()
        overrides = {"database_url": config.database_url} if config.database_url else {}
        settings = Settings(**overrides)  # type: ignore[arg-type]
        keyring = load_keyring(settings)
    except (LoadTestError, ConfigurationError) as exc:
        print(f"mfa-service loadtest seed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        print(f"mfa-service loadtest seed: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = _event_loop_runner()(seed(settings, keyring, config, progress=sys.stderr))
    except LoadTestError as exc:
        print(f"mfa-service loadtest seed: {exc}", file=sys.stderr)
        return EXIT_SETUP
    print(json.dumps({
        "users": result.users, "sessions": result.sessions,
        "recovery_codes": result.recovery_codes, "backend": result.backend,
        "prefix": result.prefix, "out": str(config.out),
        "seconds": round(result.seconds, 3),
        "users_per_second": round(result.users_per_second, 1)}))
    return EXIT_OK
