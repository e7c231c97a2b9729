"""One command for the whole demo: mfa-service, the demo inbox, the portal, the backoffice.

    python -m portal_backoffice [--portal-port 8080] [--backoffice-port 8081] [--temp]

Starts, in this order, each waiting for the one before it:

1. the demo inbox: an SMTP server and an HTTP phone webhook on free loopback ports;
2. ``mfa-service serve`` as a child process: development mode, plaintext on loopback, its
   embedded SQLite in ``--data-dir`` (default ``./demo-data``; ``--temp``: a temporary
   folder removed at exit), email over SMTP and SMS/voice over the webhook to the inbox,
   passkeys for RP ID ``localhost`` and the two apps' origins;
3. the portal and the backoffice (uvicorn), on ``localhost``.

Ctrl-C (or SIGTERM) stops the apps, then the service (SIGTERM: it drains), then the inbox.
The ports can also come from ``DEMO_PORTAL_PORT`` / ``DEMO_BACKOFFICE_PORT``; 0 picks a
free one (the banner says which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from mfa.v1 import two_factor_service_pb2 as pb
from starlette.applications import Starlette

from portal_backoffice.backoffice import create_backoffice
from portal_backoffice.config import Config
from portal_backoffice.inbox import Inbox, start_smtp, webhook_app
from portal_backoffice.login import new_sessions
from portal_backoffice.mfa import connect
from portal_backoffice.names import FactorNames
from portal_backoffice.portal import create_portal
from portal_backoffice.users import DEMO_PASSWORD, Users

log = logging.getLogger("portal_backoffice")
SERVICE_START_TIMEOUT = 60.0


def bind(port: int) -> socket.socket:
    """A listening socket on loopback; port 0 lets the OS choose."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def free_port() -> int:
    """A port nobody listens on now (mfa-service binds it itself, a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher stops every server itself
    (each uvicorn.Server would otherwise replace the others' handlers)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _web_server(app: Starlette) -> _Server:
    return _Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                  server_header=False, access_log=False))


def service_env(args: argparse.Namespace, data_dir: Path, grpc_port: int, smtp_port: int,
                webhook_port: int, origins: list[str]) -> dict[str, str]:
    """The service's settings (mfa_service/settings.py names); nothing demo-specific there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update({
        "MFA_ENV": "development",
        "MFA_LISTEN_ADDR": f"127.0.0.1:{grpc_port}",
        "MFA_DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'mfa-service.db'}",
        "MFA_EMAIL_PROVIDER": "smtp",
        "MFA_SMTP_HOST": "127.0.0.1",
        "MFA_SMTP_PORT": str(smtp_port),
        "MFA_SMTP_TLS": "none",  # loopback only
        "MFA_SMTP_FROM": "no-reply@demo.localhost",
        "MFA_PHONE_PROVIDER": "webhook",
        "MFA_PHONE_WEBHOOK_URL": f"http://127.0.0.1:{webhook_port}/send",
        # One product name everywhere: the portal's pages, the emails/texts/calls, the
        # authenticator app's entry and the passkey prompt.
        "MFA_PRODUCT_NAME": args.product_name,
        "MFA_TOTP_ISSUER": args.product_name,
        "MFA_WEBAUTHN_RP_NAME": args.product_name,
        # Passkeys: the browser's origins must match exactly (scheme, host and port).
        "MFA_WEBAUTHN_RP_ID": "localhost",
        "MFA_WEBAUTHN_ORIGINS": ",".join(origins),
        # Deliver promptly: the user is waiting for the code on the inbox page.
        "MFA_OUTBOX_POLL_SECONDS": "0.2",
        "MFA_SHUTDOWN_DRAIN_SECONDS": "0",
        "MFA_LOG_FORMAT": "text",
        "MFA_LOG_LEVEL": args.service_log_level,
    })
    return env


def service_command(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    beside = Path(sys.executable).parent / "mfa-service"
    found = str(beside) if beside.exists() else shutil.which("mfa-service")
    if not found:
        raise SystemExit("mfa-service is not installed: run scripts/demo, or "
                         "`pip install ./generated .` first (or pass --mfa-target)")
    return [found]


async def wait_for_service(target: str, process: asyncio.subprocess.Process | None,
                           limit: float) -> None:
    """Until the service answers a read (or the child died, or the time is up)."""
    channel, stub = connect(target)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    try:
        while True:
            if process is not None and process.returncode is not None:
                raise SystemExit(f"mfa-service exited with status {process.returncode}")
            try:
                await stub.ListFactors(pb.ListFactorsRequest(user_id="demo-readiness-probe"),
                                       timeout=1.0)
                return
            except grpc.RpcError:
                if loop.time() > deadline:
                    raise SystemExit(f"mfa-service did not answer on {target} within "
                                     f"{limit:.0f} s") from None
                await asyncio.sleep(0.2)
    finally:
        await channel.close()


@contextlib.contextmanager
def data_folder(args: argparse.Namespace) -> Iterator[Path]:
    if args.temp:
        with tempfile.TemporaryDirectory(prefix="portal-demo-") as tmp:
            yield Path(tmp)
    else:
        path = Path(args.data_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    inbox = Inbox()
    smtp_sock, webhook_sock = bind(args.smtp_port), bind(args.webhook_port)
    portal_sock, backoffice_sock = bind(args.portal_port), bind(args.backoffice_port)
    smtp_port, webhook_port = smtp_sock.getsockname()[1], webhook_sock.getsockname()[1]
    portal_url = f"http://localhost:{portal_sock.getsockname()[1]}"
    backoffice_url = f"http://localhost:{backoffice_sock.getsockname()[1]}"

    with data_folder(args) as data_dir:
        smtp_server = await start_smtp(inbox, smtp_sock)
        webhook = _web_server(webhook_app(inbox))
        tasks = [asyncio.create_task(webhook.serve(sockets=[webhook_sock]))]
        process: asyncio.subprocess.Process | None = None
        servers = [webhook]
        try:
            if args.mfa_target:
                target = args.mfa_target
            else:
                grpc_port = args.grpc_port or free_port()
                target = f"127.0.0.1:{grpc_port}"
                env = service_env(args, data_dir, grpc_port, smtp_port, webhook_port,
                                  [portal_url, backoffice_url])
                # cwd: the data folder, so the service reads no stray .env of ours.
                process = await asyncio.create_subprocess_exec(
                    *service_command(args.mfa_command), "serve", env=env, cwd=data_dir)
            await wait_for_service(target, process, SERVICE_START_TIMEOUT)

            channel, stub = connect(target)
            config = Config(mfa_target=target, secret=args.secret or secrets.token_urlsafe(32),
                            portal_url=portal_url, backoffice_url=backoffice_url,
                            step_up_max_age=args.step_up_max_age,
                            product_name=args.product_name)
            users = Users(data_dir / "users.json")
            # One server-side session store for both apps: the shared login.
            sessions = new_sessions(config)
            names = FactorNames(data_dir / "factor-names.json")
            portal = _web_server(create_portal(config, stub, users, inbox, sessions, names))
            backoffice = _web_server(create_backoffice(config, stub, sessions))
            servers += [portal, backoffice]
            tasks += [asyncio.create_task(portal.serve(sockets=[portal_sock])),
                      asyncio.create_task(backoffice.serve(sockets=[backoffice_sock]))]
            while not all(s.started for s in servers):
                if any(t.done() for t in tasks):
                    raise SystemExit("a web server failed to start")
                await asyncio.sleep(0.05)
            print(f"\nDemo running (data: {data_dir}):\n"
                  f"  portal       {portal_url}/   log in as alice or bob, password "
                  f"'{DEMO_PASSWORD}'\n"
                  f"  backoffice   {backoffice_url}/\n"
                  f"  demo inbox   {portal_url}/inbox   (codes sent by email, SMS, voice)\n"
                  f"  mfa-service  {target}\n"
                  "Ctrl-C stops everything.\n", flush=True)
            waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
            if process is not None:
                waiters.append(asyncio.create_task(process.wait()))
            await asyncio.wait([*waiters, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if stop.is_set():
                # Stopping takes a few seconds (the service drains): say so at once.
                print("\nStopping the demo: web apps, then mfa-service (it drains for a "
                      "few seconds)...", flush=True)
            if process is not None and process.returncode is not None:
                log.error("mfa-service exited with status %s", process.returncode)
            await channel.close()
            return 0 if stop.is_set() else 1
        finally:
            for server in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            if process is not None and process.returncode is None:
                process.terminate()  # SIGTERM: the service drains and stops
                try:
                    await asyncio.wait_for(process.wait(), timeout=15)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            smtp_server.close()
            await smtp_server.wait_closed()
            if stop.is_set():
                print("Demo stopped.", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m portal_backoffice", description=(
        "Run mfa-service, the demo inbox, the reference portal and backoffice."))
    env = os.environ.get
    parser.add_argument("--portal-port", type=int, default=int(env("DEMO_PORTAL_PORT", "8080")))
    parser.add_argument("--backoffice-port", type=int,
                        default=int(env("DEMO_BACKOFFICE_PORT", "8081")))
    parser.add_argument("--grpc-port", type=int, default=int(env("DEMO_GRPC_PORT", "0")),
                        help="mfa-service's port (default: a free one)")
    parser.add_argument("--smtp-port", type=int, default=0, help="demo SMTP sink (0: free)")
    parser.add_argument("--webhook-port", type=int, default=0,
                        help="demo SMS/voice webhook (0: free)")
    parser.add_argument("--data-dir", default=env("DEMO_DATA_DIR", "demo-data"),
                        help="SQLite database, its key file and the demo users")
    parser.add_argument("--temp", action="store_true",
                        help="keep the data in a temporary folder, removed at exit")
    parser.add_argument("--mfa-target", help="use this running mfa-service (HOST:PORT) "
                        "instead of starting one")
    parser.add_argument("--mfa-command", help="the mfa-service executable to start")
    parser.add_argument("--secret", default=env("DEMO_SECRET"),
                        help="cookie signing secret shared by both apps (default: random)")
    parser.add_argument("--step-up-max-age", type=float, default=8 * 60, metavar="SECONDS",
                        help="before adding a factor, pass 2FA again when the session is "
                        "older than this (mfa-service's limit is 10 minutes)")
    parser.add_argument("--product-name", default=env("DEMO_PRODUCT_NAME", "Demo Portal"),
                        help="the product's name on the pages, in messages, in the "
                        "authenticator app and on passkey prompts (at most 32 characters)")
    parser.add_argument("--service-log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # aiosmtpd logs every SMTP session at INFO ("Peer", "handling connection", "connection
    # lost" after each mail): routine for a sink, alarming in a demo log. Its warnings stay.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    return asyncio.run(run(args))
