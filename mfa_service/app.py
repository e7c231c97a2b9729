"""The composition root: ``create_server(settings)`` builds every collaborator once.

Nothing else constructs engines, keyrings, services or servicers. Tests call it with
``listen_addr=127.0.0.1:0`` and a FixedClock to get an in-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc

from mfa_service import telemetry
from mfa_service.clock import Clock, SystemClock
from mfa_service.crypto import Keyring, load_or_create_key_file
from mfa_service.delivery.dispatcher import Dispatcher
from mfa_service.delivery.senders import (
    ConsoleSender,
    Sender,
    SmtpSender,
    TwilioSender,
    WebhookSender,
)
from mfa_service.domain import Channel
from mfa_service.errors import ConfigurationError, StoreError
from mfa_service.factors.email_code import EmailCode
from mfa_service.factors.passkey import Passkey, RelyingParty
from mfa_service.factors.phone_code import PhoneCode
from mfa_service.factors.recovery import RecoveryCodes
from mfa_service.factors.registry import FactorRegistry
from mfa_service.factors.sent_code import SentCode
from mfa_service.factors.totp import AuthenticatorApp
from mfa_service.service import Services
from mfa_service.service.assurance import Assurance
from mfa_service.service.context import Context, Rules
from mfa_service.service.devices import DeviceRules, ForgetOnFactorChange
from mfa_service.service.notices import Notifier
from mfa_service.service.session_cache import RevocationListener, SessionCache
from mfa_service.service.sessions import SessionService
from mfa_service.settings import Environment, Settings, is_loopback_host
from mfa_service.store import migrate, open_database
from mfa_service.store.database import Database
from mfa_service.store.retention import Retention, purge
from mfa_service.transport.auth import CallerRegistry
from mfa_service.transport.gate import CallGate, GateInterceptor
from mfa_service.transport.interceptors import ServiceInterceptor
from mfa_service.transport.servicer import TwoFactorServicer

log = logging.getLogger("mfa_service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TwoFactorService"].full_name
# Health: how long the ping that confirms a call's StoreUnavailable may take, and how often
# the database is probed while it is away.
CONFIRM_SECONDS = 0.5
UNHEALTHY_PROBE_SECONDS = 0.5
# Shutdown: how long after the stop began the held calls are answered (transport/gate.py).
RELEASE_AFTER_STOP_SECONDS = 0.05
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def load_keyring(settings: Settings) -> Keyring:
    if settings.keyring is not None:
        return Keyring.parse(settings.keyring.get_secret_value())
    if settings.env is Environment.PRODUCTION:  # pragma: no cover - Settings refuses it first
        raise ConfigurationError("MFA_KEYRING is required in production")
    path = settings.resolved_key_file()
    keyring, created = load_or_create_key_file(path)
    log.warning("using development keys from a local key file; set MFA_KEYRING in production",
                extra={"key_file": str(path), "key_file_created": created})
    return keyring


def _is_loopback(listen_addr: str) -> bool:
    return is_loopback_host(listen_addr.rpartition(":")[0])


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ConfigurationError("set both MFA_TLS_CERT_FILE and MFA_TLS_KEY_FILE")
    try:
        chain = settings.tls_cert_file.read_bytes()
        key = settings.tls_key_file.read_bytes()
        client_ca = (settings.tls_client_ca_file.read_bytes()
                     if settings.tls_client_ca_file else None)
    except OSError as exc:
        raise ConfigurationError(f"cannot read a TLS file: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def build_senders(settings: Settings, http_transport: Any = None) -> dict[Channel, Sender]:
    """One sender per channel, from settings (console only outside production).

    ``http_transport``: the HTTP providers' httpx transport (OpenTelemetry's when tracing)."""
    email: Sender
    if settings.email_provider == "smtp":
        email = SmtpSender(
            settings.smtp_host, settings.smtp_port, settings.smtp_tls, settings.smtp_username,
            settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            settings.smtp_from, timeout=settings.smtp_timeout_seconds)
    else:
        email = ConsoleSender()
    phone: Sender
    if settings.phone_provider == "webhook":
        assert settings.phone_webhook_url is not None
        headers = ({"Authorization": f"Bearer {settings.phone_webhook_token.get_secret_value()}"}
                   if settings.phone_webhook_token else None)
        phone = WebhookSender(settings.phone_webhook_url, headers=headers,
                              timeout=settings.provider_timeout_seconds,
                              transport=http_transport)
    elif settings.phone_provider == "twilio":
        assert settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from
        phone = TwilioSender(settings.twilio_base_url, settings.twilio_account_sid,
                             settings.twilio_auth_token.get_secret_value(), settings.twilio_from,
                             timeout=settings.provider_timeout_seconds,
                             transport=http_transport)
    else:
        phone = email if isinstance(email, ConsoleSender) else ConsoleSender()
    return {Channel.EMAIL: email, Channel.SMS: phone, Channel.VOICE: phone}


@dataclass
class App:
    """A built server and what it owns; ``stop`` releases everything."""

    server: aio.Server
    port: int
    database: Database
    health: health.aio.HealthServicer
    settings: Settings
    dispatcher: Dispatcher
    senders: list[Sender]
    gate: CallGate = field(default_factory=CallGate)
    # The plaintext health-only listener (MFA_HEALTH_LISTEN_ADDR), if any.
    health_server: aio.Server | None = None
    health_port: int | None = None
    revocations: RevocationListener | None = None
    telemetry: telemetry.Telemetry = field(default_factory=telemetry.Telemetry)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a call found the database unavailable: the probe looks at once.
    _recheck: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """Stop serving, losing no call that was received (transport/gate.py).

        Health turns NOT_SERVING at once and every call is still served for ``drain``
        seconds (load balancers and clients move away). Then new calls are held, the
        calls already running get up to ``grace`` seconds, the server stops taking calls
        and only then are the held ones answered UNAVAILABLE. Background work finishes
        its current pass (a task cancelled inside a SQLite transaction could leave the
        file's write lock held by a connection still closing in its thread); the outbox
        dispatcher finishes the messages it claimed.
        """
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        drain = self.settings.shutdown_drain_seconds if drain is None else drain
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()  # NOT_SERVING; later sets are ignored
        if drain > 0:
            await asyncio.sleep(drain)
        end = loop.time() + grace
        self.gate.close()
        self._stopping.set()
        self.dispatcher.stop()
        if self.revocations is not None:
            self.revocations.stop()
        settled = await self.gate.settle(end)
        stopping = asyncio.create_task(self.server.stop(max(0.0, end - loop.time())))
        # The held calls are answered once the stop has begun (GOAWAY on its way): a
        # client's next attempt then cannot land in this server's queue.
        await asyncio.sleep(RELEASE_AFTER_STOP_SECONDS)
        self.gate.release()
        await stopping
        log.info("stopped serving", extra={
            "drain_seconds": drain, "grace_seconds": grace, "settled": settled,
            "calls_answered_unavailable": self.gate.held})
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=max(end - loop.time(), 2.0))
            except TimeoutError:
                log.warning("background task did not stop in time", extra={
                    "task": task.get_name()})
            except asyncio.CancelledError:  # pragma: no cover - cancelled elsewhere
                pass
        if self.health_server is not None:
            await self.health_server.stop(0)
        for sender in self.senders:
            await sender.aclose()
        await self.telemetry.shutdown()  # flush the last spans and metrics
        # Calls cut off by the grace period may leave a connection closing in its thread;
        # never let that hold the process up.
        try:
            await asyncio.wait_for(self.database.dispose(), timeout=5)
        except TimeoutError:
            log.warning("database pool did not close within 5 s")

    def store_unavailable(self) -> None:
        """A call found the database unavailable: the probe confirms and flips health."""
        self._recheck.set()


async def _set_health(app: App, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    log.warning("database health changed", extra={"serving": serving})
    for name in ("", SERVICE_NAME):
        await app.health.set(name, status)


async def _database_answers(app: App, within: float) -> bool:
    try:
        await asyncio.wait_for(app.database.ping(), timeout=within)
    except (StoreError, TimeoutError):
        return False
    return True


async def _probe_database(app: App, interval: float) -> None:
    """Health follows the database: NOT_SERVING while it does not answer.

    Every ``interval`` seconds, and at once when a call found the database unavailable:
    then one ping bounded by CONFIRM_SECONDS decides (a single dead pooled connection
    after a database restart does not take the server out; a database that is gone, or
    does not answer within that time, does). While NOT_SERVING it looks every
    UNHEALTHY_PROBE_SECONDS at most, so SERVING returns soon after the database.
    """
    serving = True
    timeout = app.settings.database_timeout_seconds
    while not app._stopping.is_set():
        wait = interval if serving else min(interval, UNHEALTHY_PROBE_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(app._stopping, app._recheck), timeout=wait)
        if app._stopping.is_set():
            return
        if app._recheck.is_set():
            app._recheck.clear()
            timeout = CONFIRM_SECONDS
        ok = await _database_answers(app, timeout)
        timeout = app.settings.database_timeout_seconds
        if ok != serving:
            serving = ok
            await _set_health(app, ok)


async def _first(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _purge_periodically(app: App, clock: Clock, interval: float) -> None:
    """Retention: ended sessions, closed challenges, sent messages and idle lockout
    counters are deleted after their keep period (store/retention.py)."""
    while not app._stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app._stopping.wait(), timeout=interval)
        if app._stopping.is_set():
            return
        try:
            total: dict[str, int] = {}
            while True:
                async with app.database.transaction() as tx:
                    counts = await purge(tx.conn, clock.now(), Retention())
                for key, value in counts.items():
                    total[key] = total.get(key, 0) + value
                if not any(counts.values()) or app._stopping.is_set():
                    break
            if any(total.values()):
                log.info("purged ended rows", extra=total)
        except StoreError:
            log.warning("purge skipped: database unavailable")


def _register_reflection_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto into the default pool.

    grpcio-reflection ships only the v1alpha file. v1 is the same file under another
    package, so we derive it; without it, reflection would list grpc.reflection.v1 but
    fail to describe it (grpcurl's `describe` stops on the unresolvable symbol).
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                setattr(method, attr, getattr(method, attr).replace(old, new))
    pool.Add(proto)


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """Keepalive and connection age (docs/OPERATIONS.md, "Processes and connections").

    The kernel (SO_REUSEPORT) and a Kubernetes Service balance connections, not calls: a
    client that keeps one HTTP/2 connection sends every call to one process for good.
    ``max_connection_age`` makes the server send GOAWAY after that long (gRPC core adds
    +-10 % jitter so clients do not reconnect together); calls in flight get the grace
    period, later calls go over a new connection, which may land elsewhere.
    """
    options = [
        # Accept client keepalive pings this often (the default refuses < 5 min).
        ("grpc.http2.min_ping_interval_without_data_ms",
         int(settings.keepalive_min_client_ping_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Ping idle clients: a peer that vanished (NAT, node lost) is noticed and dropped.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
    ]
    if settings.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms",
             int(settings.max_connection_age_grace_seconds * 1000)),
        ]
    return options


def _add_reflection(server: aio.Server) -> None:
    """Server reflection under v1alpha (grpcio-reflection) *and* v1 (what grpcurl asks first).

    The two services are identical on the wire, so the v1alpha servicer also answers v1.
    """
    _register_reflection_v1_descriptor()
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )}),))


async def create_server(settings: Settings, *, clock: Clock | None = None,
                        keyring: Keyring | None = None,
                        observability: telemetry.Telemetry | None = None) -> App:
    """Build and start the server; returns once it listens (and the database answered).

    ``observability``: telemetry built by the caller (tests: in-memory exporters); by
    default from settings (``telemetry.configure``), stopped with the App."""
    clock = clock or SystemClock()
    credentials = _server_credentials(settings)
    callers = (CallerRegistry.from_file(settings.callers_file)
               if settings.callers_file is not None else None)
    if settings.env is Environment.PRODUCTION and (credentials is None or callers is None):
        raise ConfigurationError(  # pragma: no cover - Settings refuses it first
            "MFA_ENV=production needs TLS and a callers file")
    if callers is None and not _is_loopback(settings.listen_addr):
        raise ConfigurationError(
            "without caller authentication (MFA_CALLERS_FILE) the server listens on "
            f"loopback only; {settings.listen_addr} is not loopback")
    if callers is None:
        log.warning("no caller authentication: development mode on loopback only")
    keyring = keyring or load_keyring(settings)

    database = open_database(settings)
    engine = database.engine
    tel = observability if observability is not None else telemetry.configure(settings)
    metrics = tel.metrics
    tel.instrument_engine(engine)
    if metrics is not None:
        database.event_listeners.append(metrics.audit_events)
    try:
        await database.ping()
        if settings.is_sqlite:
            # The embedded default migrates itself; only when behind, so that a server
            # starting on a file already at head takes no write lock (another process
            # or server on the same file may be writing).
            if await migrate.current_revision(engine) != migrate.head_revision():
                await migrate.upgrade(engine)
        else:
            await migrate.require_current_schema(engine)
    except BaseException:
        await engine.dispose()
        await tel.shutdown()
        raise

    codes = SentCode(keyring, settings.code_length)
    registry = FactorRegistry([
        AuthenticatorApp(keyring, settings.totp_issuer, settings.totp_window),
        EmailCode(codes),
        PhoneCode(codes),
        RecoveryCodes(keyring),
        *([Passkey(keyring, RelyingParty(
            rp_id=settings.rp_id, name=settings.webauthn_rp_name or settings.product_name,
            origins=settings.origins))] if settings.passkeys_enabled else []),
    ])
    senders = build_senders(settings, tel.http_transport())
    dispatcher = Dispatcher(
        database, keyring, clock, senders,
        lease=timedelta(seconds=settings.outbox_lease_seconds),
        backoff_max=settings.outbox_backoff_max_seconds,
        poll_seconds=settings.outbox_poll_seconds,
        tracer=tel.tracer("mfa_service.delivery"), metrics=metrics)
    database.outbox_listeners.append(dispatcher.wake)
    cache, revocations = None, None
    # Not through PgBouncer: LISTEN needs a session of its own, which transaction pooling
    # does not keep, so invalidations would be lost without a sound.
    if (not settings.is_sqlite and settings.session_cache_size > 0
            and settings.database_pooler != "pgbouncer"):
        cache = SessionCache(settings.session_cache_size)
        revocations = RevocationListener(
            cache, engine.url.set(drivername="postgresql").render_as_string(
                hide_password=False), connect_timeout=settings.database_timeout_seconds)
    sessions = SessionService(database, keyring, clock,
                              ttl=timedelta(seconds=settings.session_ttl_seconds),
                              idle=timedelta(seconds=settings.session_idle_seconds),
                              cache=cache)
    services = Services.build(Context(
        db=database, registry=registry, keyring=keyring, clock=clock, sessions=sessions,
        notifier=Notifier(keyring, settings.product_name,
                          timedelta(seconds=settings.notice_ttl_seconds),
                          settings.default_locale,
                          # Every change to a user's factors forgets their remembered
                          # browsers (service/devices.py).
                          on_factor_change=ForgetOnFactorChange(sessions)),
        rules=Rules(code_ttl=timedelta(seconds=settings.code_ttl_seconds),
                    max_attempts=settings.max_attempts,
                    max_factors_per_user=settings.max_factors_per_user,
                    resend_cooldown=timedelta(seconds=settings.resend_cooldown_seconds),
                    max_sends=settings.max_sends_per_window,
                    send_window=timedelta(seconds=settings.send_window_seconds),
                    max_sends_per_destination=settings.max_sends_per_destination,
                    max_sends_per_phone_prefix=settings.max_sends_per_phone_prefix,
                    max_sends_per_phone_country=settings.max_sends_per_phone_country,
                    phone_daily_budget=settings.phone_daily_budget,
                    change_proof_max_age=timedelta(
                        seconds=settings.change_proof_max_age_seconds),
                    pending_ttl=timedelta(minutes=settings.pending_ttl_minutes),
                    new_credential_hold=timedelta(
                        hours=settings.new_credential_hold_hours),
                    product=settings.product_name, default_locale=settings.default_locale)),
        devices=DeviceRules(
            lifetime=timedelta(days=settings.trusted_device_days),
            idle=timedelta(days=settings.trusted_device_idle_days),
            misses_per_address=settings.trusted_device_misses_per_ip),
        assurance=Assurance(email_counts_for_aal2=settings.email_counts_for_aal2))

    gate = CallGate()
    tracing = tel.server_interceptor()
    server = aio.server(
        # The gate first: it counts calls, passes on the deadline and holds calls at the
        # end of a shutdown (transport/gate.py).
        # OpenTelemetry's interceptor only when spans go somewhere: with nothing exported
        # it would still build a span per call for nobody (issue #8's profile).
        interceptors=[GateInterceptor(gate),
                      *([tracing] if tracing is not None else []),
                      ServiceInterceptor(callers, metrics)],
        options=[
            # On by default on Linux: a second server on the same port would silently
            # share it. Several workers on one port are opt-in (MFA_WORKERS), not an accident.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", 64 * 1024),
            *connection_options(settings),
        ])
    pb_grpc.add_TwoFactorServiceServicer_to_server(TwoFactorServicer(services, metrics),
                                                   server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server)

    try:
        port = (server.add_secure_port(settings.listen_addr, credentials) if credentials
                else server.add_insecure_port(settings.listen_addr))
    except RuntimeError as exc:
        await engine.dispose()
        await tel.shutdown()
        raise ConfigurationError(f"cannot listen on {settings.listen_addr}: {exc}") from exc
    health_server, health_port = None, None
    if settings.health_listen_addr is not None:
        # Plaintext, grpc.health.v1 only: for the kubelet's gRPC probe and
        # `mfa-service health`, which cannot present a client certificate.
        health_server = aio.server(options=[
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_port = health_server.add_insecure_port(settings.health_listen_addr)
        except RuntimeError as exc:
            await engine.dispose()
            await tel.shutdown()
            raise ConfigurationError(
                f"cannot listen on {settings.health_listen_addr}: {exc}") from exc
    await server.start()
    if health_server is not None:
        await health_server.start()
    app = App(server=server, port=port, database=database, health=health_servicer,
              settings=settings, dispatcher=dispatcher, senders=list(set(senders.values())),
              revocations=revocations, telemetry=tel, gate=gate,
              health_server=health_server, health_port=health_port)
    database.unavailable_listeners.append(app.store_unavailable)
    tel.start(telemetry.backlog_reader(database, clock))
    # SERVING only now: the database answered and the schema is current.
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    app._tasks.append(asyncio.create_task(
        _probe_database(app, settings.health_probe_seconds), name="db-health-probe"))
    if revocations is not None:
        app._tasks.append(asyncio.create_task(revocations.run(), name="session-revocations"))
    if settings.outbox_dispatcher:
        app._tasks.append(asyncio.create_task(dispatcher.run(), name="outbox-dispatcher"))
    if settings.purge_interval_seconds > 0:
        app._tasks.append(asyncio.create_task(
            _purge_periodically(app, clock, settings.purge_interval_seconds), name="purge"))
    log.info("listening", extra={"listen_addr": settings.listen_addr, "port": port,
                                 "health_listen_addr": settings.health_listen_addr,
                                 "tls": credentials is not None,
                                 "database": engine.url.render_as_string(hide_password=True)})
    return app
