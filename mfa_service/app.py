"""The composition root: ``create_server(settings)`` builds every collaborator once.

Nothing else constructs engines, keyrings, services or servicers. Tests call it with
``listen_addr=127.0.0.1:0`` and a FixedClock to get an in-process server.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
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
from mfa_service.errors import ConfigurationError
from mfa_service.factors.email_code import EmailCode
from mfa_service.factors.passkey import Passkey, RelyingParty
from mfa_service.factors.phone_code import PhoneCode
from mfa_service.factors.recovery import RecoveryCodes
from mfa_service.factors.registry import FactorRegistry
from mfa_service.factors.sent_code import SentCode
from mfa_service.factors.totp import AuthenticatorApp
from mfa_service.runtime import SERVICE_NAME, App, start_background
from mfa_service.service import Services
from mfa_service.service.assurance import Assurance
from mfa_service.service.devices import DeviceRules, ForgetOnFactorChange
from mfa_service.service.notices import Notifier
from mfa_service.service.rules import Rules
from mfa_service.service.session_cache import RevocationListener, SessionCache
from mfa_service.service.sessions import SessionService
from mfa_service.settings import Environment, Settings, is_loopback_host
from mfa_service.store import migrate, open_database
from mfa_service.store.engine import statistics_warning
from mfa_service.transport.auth import CallerRegistry
from mfa_service.transport.gate import CallGate, WrappingRegistrar
from mfa_service.transport.interceptors import around_service_calls
from mfa_service.transport.servicer import TwoFactorServicer

__all__ = ["App", "build_senders", "connection_options", "create_server", "load_keyring"]

log = logging.getLogger("mfa_service")

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

    # Every resource is closed if a later step fails (the exit stack unwinds in reverse);
    # once the server runs, App.stop owns them and closes them in its own order.
    async with contextlib.AsyncExitStack() as stack:
        app = await _build(stack, settings, clock, keyring, credentials, callers,
                           observability)
        stack.pop_all()
    start_background(app, clock)
    log.info("listening", extra={
        "listen_addr": settings.listen_addr, "port": app.port,
        "health_listen_addr": settings.health_listen_addr, "tls": credentials is not None,
        "database": app.database.engine.url.render_as_string(hide_password=True)})
    return app


async def _build(stack: contextlib.AsyncExitStack, settings: Settings, clock: Clock,
                 keyring: Keyring, credentials: grpc.ServerCredentials | None,
                 callers: CallerRegistry | None,
                 observability: telemetry.Telemetry | None) -> App:
    """Everything create_server builds, each resource registered on ``stack`` as it is
    made; returns a started, SERVING server."""
    database = open_database(settings)
    engine = database.engine
    stack.push_async_callback(database.dispose)
    tel = observability if observability is not None else telemetry.configure(settings)
    stack.push_async_callback(tel.shutdown)
    metrics = tel.metrics
    tel.instrument_engine(engine)
    if metrics is not None:
        database.event_listeners.append(metrics.audit_events)
    await database.ping()
    if settings.is_sqlite:
        # The embedded default migrates itself; only when behind, so that a server
        # starting on a file already at head takes no write lock (another process
        # or server on the same file may be writing).
        if await migrate.current_revision(engine) != migrate.head_revision():
            await migrate.upgrade(engine)
    else:
        await migrate.require_current_schema(engine)
        if (warning := await statistics_warning(engine)) is not None:
            log.warning(warning)

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
    for sender in set(senders.values()):
        stack.push_async_callback(sender.aclose)
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
    services = Services.build(
        db=database, registry=registry, keyring=keyring, clock=clock, sessions=sessions,
        notifier=Notifier(keyring, settings.product_name,
                          timedelta(seconds=settings.notice_ttl_seconds),
                          settings.default_locale,
                          # Every change to a user's factors forgets their remembered
                          # browsers (service/devices.py).
                          on_factor_change=ForgetOnFactorChange(sessions)),
        rules=Rules.from_settings(settings),
        devices=DeviceRules(
            lifetime=timedelta(days=settings.trusted_device_days),
            idle=timedelta(days=settings.trusted_device_idle_days),
            misses_per_address=settings.trusted_device_misses_per_ip),
        assurance=Assurance(email_counts_for_aal2=settings.email_counts_for_aal2))

    gate = CallGate()
    tracing = tel.server_interceptor()
    server = aio.server(
        # OpenTelemetry's interceptor only when spans go somewhere: with nothing exported
        # it would still build a span per call for nobody (issue #8's profile). Everything
        # else is wrapped around the handlers once, at registration (below).
        interceptors=[tracing] if tracing is not None else [],
        options=[
            # On by default on Linux: a second server on the same port would silently
            # share it. Several workers on one port are opt-in (MFA_WORKERS), not an accident.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", 64 * 1024),
            *connection_options(settings),
        ])
    # Every unary call behind the gate (it counts calls, passes on the deadline and holds
    # calls at the end of a shutdown), the service's calls in their envelope too: wrapped
    # once here, not by interceptors on every call (transport/gate.py).
    registrar = cast(aio.Server, WrappingRegistrar(server, gate,
                                                   around_service_calls(callers, metrics)))
    # CheckSession's answers are kept for as many sessions as the session cache holds.
    servicer = TwoFactorServicer(services, metrics, answers_kept=settings.session_cache_size)
    pb_grpc.add_TwoFactorServiceServicer_to_server(servicer, registrar)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    _add_reflection(server)

    try:
        port = (server.add_secure_port(settings.listen_addr, credentials) if credentials
                else server.add_insecure_port(settings.listen_addr))
    except RuntimeError as exc:
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
            raise ConfigurationError(
                f"cannot listen on {settings.health_listen_addr}: {exc}") from exc
    await server.start()
    stack.push_async_callback(server.stop, None)
    if health_server is not None:
        await health_server.start()
        stack.push_async_callback(health_server.stop, None)
    app = App(server=server, port=port, database=database, health=health_servicer,
              settings=settings, dispatcher=dispatcher, senders=list(set(senders.values())),
              revocations=revocations, telemetry=tel, gate=gate,
              health_server=health_server, health_port=health_port)
    database.unavailable_listeners.append(app.store_unavailable)
    tel.start(telemetry.backlog_reader(database, clock))
    # SERVING only now: the database answered and the schema is current.
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return app
