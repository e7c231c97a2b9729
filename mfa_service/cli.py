"""Entry points: ``mfa-service serve | migrate | health | keys generate`` (and the operator
commands of cli_admin: ``keys rotate | keys status | admin reset-user | audit``; of
cli_import: ``import``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pydantic import ValidationError

from mfa_service import cli_admin, cli_import
from mfa_service.crypto import Keyring
from mfa_service.errors import ConfigurationError, StoreError
from mfa_service.logs import configure_logging
from mfa_service.settings import Settings

log = logging.getLogger("mfa_service")


async def _migrate(settings: Settings) -> None:
    from mfa_service.store import migrate, open_database

    engine = open_database(settings).engine
    try:
        before = await migrate.current_revision(engine)
        await migrate.upgrade(engine)
        after = await migrate.current_revision(engine)
    finally:
        await engine.dispose()
    log.info("schema migrated", extra={"from_revision": before, "to_revision": after})
    print(f"schema at revision {after} (was {before})")


async def _health(settings: Settings, service: str, deadline: float) -> bool:
    """Ask the local server's grpc.health.v1 service; True when SERVING."""
    import grpc
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # The plaintext health-only listener when there is one: no client certificate needed,
    # and the server certificate need not name 127.0.0.1.
    plaintext = settings.health_listen_addr is not None
    host, _, port = (settings.health_listen_addr or settings.listen_addr).rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # noqa: S104 - we connect, not bind
        host = "127.0.0.1"
    target = f"{host}:{port}"
    if settings.tls_cert_file is not None and not plaintext:
        creds = grpc.ssl_channel_credentials(root_certificates=settings.tls_cert_file.read_bytes())
        channel = aio.secure_channel(target, creds)
    else:
        channel = aio.insecure_channel(target)
    async with channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline)
        except aio.AioRpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfa-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server (settings from MFA_* variables)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="server processes sharing the port (overrides MFA_WORKERS)")
    sub.add_parser("migrate", help="bring the database schema to this build's revision")
    probe = sub.add_parser("health", help="exit 0 if the local server reports SERVING")
    probe.add_argument("--service", default="", help="service name (default: overall)")
    probe.add_argument("--timeout", type=float, default=3.0)
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="print a new keyring entry for MFA_KEYRING")
    gen.add_argument("--id", default="k1", help="key id (letters, digits, '-')")
    callers = sub.add_parser("callers", help="caller credentials")
    callers_sub = callers.add_subparsers(dest="callers_command", required=True)
    callers_sub.add_parser("new-token", help="print a new bearer token and the SHA-256 "
                                             "to put in the callers file")
    cli_admin.register(sub, keys_sub)
    cli_import.register(sub)
    sub.add_parser("loadtest", add_help=False, prefix_chars="\0",  # its own parser, lazily
                   help="drive load at a local server, or `loadtest seed` users into the "
                        "database (see loadtest --help)").add_argument(
        "argv", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "loadtest":
        from mfa_service.loadtest import main as loadtest_main
        return loadtest_main(args.argv)

    if (code := cli_admin.dispatch(args)) is not None:
        return code
    if args.command == "callers":
        from mfa_service.transport.auth import new_token

        token, digest = new_token()
        print(f"token (give to the caller, store as a secret): {token}")
        print(f'token_sha256 (put in the callers file):       "{digest}"')
        return 0
    if args.command == "keys":
        print(Keyring.generate_entry(args.id))
        return 0
    if args.command == "serve" and args.workers is not None:
        # Through the environment: spawned workers read their settings from it too.
        os.environ["MFA_WORKERS"] = str(args.workers)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mfa-service: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "health":
        return 0 if asyncio.run(_health(settings, args.service, args.timeout)) else 1
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve" and settings.workers > 1 and not os.environ.get(
                "MFA_WORKER_INDEX"):
            from mfa_service.workers import run_workers

            return run_workers(settings)
        if args.command == "serve":
            from mfa_service import serving

            serving.run(settings)
        else:
            asyncio.run(_migrate(settings))
    except ConfigurationError as exc:
        print(f"mfa-service: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"mfa-service: {exc.message} ({settings.database_url.split('@')[-1]})",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
