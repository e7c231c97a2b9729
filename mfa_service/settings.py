"""Typed settings, read once from ``MFA_*`` environment variables (and an optional .env).

Nothing below the entry point reads ``os.environ``: ``cli`` builds one ``Settings`` and
hands it to ``app.create_server``. Bounds come from NIST SP 800-63B and RFC 6238
(docs/API.md, "Codes, limits and delivery").
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./mfa-service.db"


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (``[::1]`` brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_safe_url(url: str) -> bool:
    """https://, or http:// to this host only."""
    parsed = urlsplit(url)
    if parsed.scheme == "https":
        return True
    return parsed.scheme == "http" and is_loopback_host(parsed.hostname or "")


MULTI_HOST_EXAMPLE = ("postgresql+asyncpg://USER@/DB?host=HOST1:PORT1&host=HOST2:PORT2"
                      "&target_session_attrs=read-write")
# What asyncpg may connect to when several hosts are listed: only the primary will do
# (a standby refuses every write).
PRIMARY_SESSION_ATTRS = ("read-write", "primary")


def _split_netloc(value: str) -> tuple[str, str, str, str, str] | None:
    """scheme, user (no password), host part, path and query of a URL, by hand: the
    spelling SQLAlchemy cannot parse must still be explained. None: no ``://``."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return None
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostpart = netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    path, _, query = tail.partition("?")
    return scheme, user, hostpart, path, query


def _multi_host_spelling(scheme: str, user: str, hosts: list[str], path: str,
                         query: str) -> str:
    """The working spelling of a multi-host URL (no password: MFA_DATABASE_PASSWORD)."""
    params = [f"host={h}" for h in hosts]
    kept = [q for q in query.split("&") if q and not q.startswith("target_session_attrs=")]
    params += [*kept, "target_session_attrs=read-write"]
    return f"{scheme}://{user + '@' if user else ''}{path or '/DB'}?{'&'.join(params)}"


def database_url_problem(value: str) -> str | None:
    """What is wrong with MFA_DATABASE_URL, in words that never repeat its password.

    Several PostgreSQL hosts (a primary and its standbys) are spelled
    ``?host=h1:p1&host=h2:p2&target_session_attrs=read-write``: asyncpg tries them in
    order and keeps the one that accepts writes, so the service follows a failover. The
    libpq spelling ``h1:p1,h2:p2`` in the host part fails inside SQLAlchemy (``invalid
    literal for int()``) at the first connection; it is refused here, with the spelling
    that works.
    """
    parts = _split_netloc(value)
    if parts is not None and "," in parts[2]:
        scheme, user, hostpart, path, query = parts
        hosts = [h.strip() for h in hostpart.split(",") if h.strip()]
        return ("MFA_DATABASE_URL lists several hosts in its host part (h1:p1,h2:p2), which "
                "SQLAlchemy cannot parse; write them as query parameters: "
                f"{_multi_host_spelling(scheme, user, hosts, path, query)}")
    try:
        url = make_url(value)
    except (ValueError, ArgumentError):
        return ("MFA_DATABASE_URL cannot be parsed; use sqlite+aiosqlite:///PATH, "
                "postgresql+asyncpg://USER@HOST:PORT/DB or, with standbys, "
                + MULTI_HOST_EXAMPLE)
    if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        return "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
    if url.drivername == "postgresql+asyncpg":
        return _postgres_hosts_problem(url)
    return None


def _postgres_hosts_problem(url: URL) -> str | None:
    listed = url.query.get("host")
    if listed is not None and url.host:
        return ("MFA_DATABASE_URL names a host both before the path and in ?host=: "
                "SQLAlchemy would ignore the first; list every host as ?host=, e.g. "
                + MULTI_HOST_EXAMPLE)
    try:
        # What create_engine does with it at the first connection, done now.
        _, args = url.get_dialect()().create_connect_args(url)
    except (ValueError, ArgumentError):
        return ("MFA_DATABASE_URL: the hosts and ports in ?host= cannot be parsed; "
                f"write each as host=NAME:PORT, e.g. {MULTI_HOST_EXAMPLE}")
    hosts = args.get("host")
    if isinstance(hosts, list) and len(hosts) > 1:
        attrs = url.query.get("target_session_attrs")
        if attrs not in PRIMARY_SESSION_ATTRS:
            return ("MFA_DATABASE_URL lists several hosts: add target_session_attrs="
                    "read-write, or writes may reach a standby (which refuses them) "
                    f"after a failover, e.g. {MULTI_HOST_EXAMPLE}")
    return None


DEV_RP_ID = "localhost"
DEV_ORIGINS = "http://localhost:8080,http://localhost:8081"


def _webauthn_problems(rp_id: str, origins: tuple[str, ...], *, production: bool) -> list[str]:
    """What is wrong with an RP ID and its origins, caught at start-up rather than as
    every passkey ceremony failing later. WebAuthn (7.1 step 9, 7.2 step 13) accepts an
    origin only when the RP ID is its host or a registrable suffix of it, and needs a
    secure context: https, or http on localhost only."""
    problems: list[str] = []
    if not rp_id or "/" in rp_id or ":" in rp_id or " " in rp_id:
        problems.append("MFA_WEBAUTHN_RP_ID must be a bare domain such as example.com")
        return problems
    if not origins:
        problems.append("MFA_WEBAUTHN_ORIGINS needs at least one origin")
    for origin in origins:
        parts = urlsplit(origin)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("https", "http") or not host or parts.path or parts.query:
            problems.append(f"MFA_WEBAUTHN_ORIGINS: {origin!r} is not an origin "
                            "(scheme://host[:port], no path)")
        elif parts.scheme == "http" and (production or host != "localhost"):
            problems.append(f"MFA_WEBAUTHN_ORIGINS: {origin!r} must be https "
                            "(http only for localhost in development)")
        elif host != rp_id and not host.endswith("." + rp_id):
            problems.append(f"MFA_WEBAUTHN_ORIGINS: {origin!r} is not on the RP ID "
                            f"{rp_id!r} (its host must be the RP ID or a subdomain of it)")
    return problems


class Settings(BaseSettings):
    """Every knob of the service; see the configuration table in docs/OPERATIONS.md."""

    model_config = SettingsConfigDict(
        env_prefix="MFA_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        frozen=True,
        # A refused value is not repeated in the error: MFA_DATABASE_URL may carry a
        # password, and the cli prints the error.
        hide_input_in_errors=True,
    )

    env: Environment = Environment.DEVELOPMENT
    listen_addr: str = "127.0.0.1:50051"
    # Server processes sharing the port (SO_REUSEPORT); 1 = this process serves.
    workers: int = Field(default=1, ge=1, le=64)
    # Set by the supervisor in each worker it starts (0 for a lone process).
    worker_index: int = Field(default=0, ge=0, le=63)
    # Connections, not calls, are balanced (by the kernel over workers, by a Service over
    # replicas): a client keeps its connection for good unless the server ends it. Every
    # MFA_MAX_CONNECTION_AGE_SECONDS (+-10 % jitter, gRPC core) the server sends GOAWAY;
    # calls in flight get the grace period, new calls go to a new connection, which may
    # land on another worker or replica. 0 turns it off.
    max_connection_age_seconds: float = Field(default=300.0, ge=0, le=86400)
    max_connection_age_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Server keepalive: ping an idle client this often, drop it when no answer in time.
    keepalive_time_seconds: float = Field(default=60.0, ge=10, le=7200)
    keepalive_timeout_seconds: float = Field(default=20.0, ge=1, le=600)
    # Clients may ping this often (mfa_client's channel pings every 30 s); more often is
    # refused (GOAWAY too_many_pings).
    keepalive_min_client_ping_seconds: float = Field(default=20.0, ge=1, le=3600)

    # Store. The password lives in its own secret field so it never shows in a repr or log.
    database_url: str = DEFAULT_DATABASE_URL
    database_password: SecretStr | None = None
    database_pool_size: int = Field(default=10, ge=1, le=50)  # fixed: no overflow
    database_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # "pgbouncer": the database is reached through PgBouncer in transaction pooling mode
    # (1.18 keeps no prepared statements across transactions): no statement caches, unique
    # statement names, and reads inside a transaction (store/engine.py).
    database_pooler: Literal["none", "pgbouncer"] = "none"

    # Keys: "kid:base64url(32 bytes)[,kid:...]", the first is primary. Without it (development
    # only) a key file is generated beside the SQLite database (or in the working directory).
    keyring: SecretStr | None = None
    key_file: Path | None = None

    # TLS. With a client CA, callers must present a certificate it signed (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    # Callers: a TOML file naming each backend, its bearer-token hashes and/or certificate
    # names, and the applications it may act for (see mfa_service/transport/auth.py).
    callers_file: Path | None = None

    # Authenticator app (RFC 6238 defaults: SHA1, 6 digits, 30 s; +-1 step of clock drift).
    totp_issuer: str = Field(default="Cloud Platform", min_length=1, max_length=64)
    totp_window: int = Field(default=1, ge=0, le=1)

    # One-time codes (email/SMS/voice) and challenges.
    code_length: int = Field(default=6, ge=6, le=8)
    code_ttl_seconds: int = Field(default=300, ge=60, le=600)  # NIST: at most 10 minutes
    max_attempts: int = Field(default=5, ge=1, le=10)
    max_factors_per_user: int = Field(default=20, ge=1, le=100)
    resend_cooldown_seconds: int = Field(default=30, ge=0, le=300)
    # Codes per user and method per send window. 10, not 5: a normal user's phone day
    # (enrol, log in by text, switch to a call, change the number - a code to each number
    # - and log in on the new one) is six codes in ten minutes. What this cap stops is an
    # account rotating destinations; the per-destination cap (5: no one number or inbox
    # gets more than a factor's share), the per-range and per-country caps and the daily
    # budget stop pumping and flooding whatever this one allows.
    max_sends_per_window: int = Field(default=10, ge=1, le=50)
    send_window_seconds: int = Field(default=600, ge=60, le=86400)
    # Codes to one address or number per send window, whichever users asked
    # (SMS pumping / toll fraud); notices do not count.
    max_sends_per_destination: int = Field(default=5, ge=1, le=100)
    # Phone codes across users (SMS pumping / toll fraud: Twilio "SMS pumping fraud",
    # OWASP), each number still under the limit above:
    # - per range (the number less its last 4 digits), an hour. 30: a company's block of
    #   numbers (DIDs behind a PBX, a corporate mobile contract) is one range, and 15
    #   colleagues logging in within the same hour with a resend each still pass; a
    #   pumping run through a rented range drops from 30 an hour per number to 30 for
    #   all its 10,000 numbers.
    max_sends_per_phone_prefix: int = Field(default=30, ge=1, le=100_000)
    # - per country (phonenumbers' region: US, CA and JM apart), an hour. 1,000: above
    #   the busiest hour of a service that sends up to ~6,000 phone codes a day to one
    #   country (a login peak is ~15 % of the day); a run against one expensive country
    #   stays at 1,000 an hour. Raise it with the traffic: it must sit above your
    #   busiest country's busiest hour.
    max_sends_per_phone_country: int = Field(default=1000, ge=1, le=10_000_000)
    # - per UTC day, SMS and voice together, the whole service: the ceiling on a day's
    #   spend when the caps above were not enough (10,000: a few thousand dollars at
    #   worst, premium-rate international included; 1.6x the ~6,000 a day the country
    #   cap is sized for). A UTC day, not 24 rolling hours: one counter row per day
    #   (O(1) per send), the way providers bill and alert, and RetryInfo can say when
    #   the next budget starts. Spent, only phone codes stop: other methods still work.
    phone_daily_budget: int = Field(default=10_000, ge=1, le=100_000_000)
    # CheckSession answers from memory while a session's last answer holds (PostgreSQL
    # only; revocations evict at once here and within a second elsewhere, via NOTIFY).
    # Entries, about 2 KB each (the session, and its answer built once:
    # transport/servicer.py); 0 turns the cache off.
    session_cache_size: int = Field(default=100_000, ge=0, le=10_000_000)
    change_proof_max_age_seconds: int = Field(default=600, ge=60, le=600)
    # The proof model (docs/SECURITY.md). A PENDING factor is gone this long after
    # Enroll (a QR code left on a screen must not become a factor later).
    pending_ttl_minutes: int = Field(default=15, ge=5, le=60)
    # A factor added, or recovery codes regenerated, after the first factor is "new" for
    # this long: it logs in, but cannot remove or replace what the user had (disable
    # with a recovery code, regenerate codes), so a stolen fresh session cannot take the
    # account over before the user has had a day of notices to react.
    new_credential_hold_hours: int = Field(default=24, ge=1, le=168)

    # Messages.
    product_name: str = Field(default="Cloud Platform", min_length=1, max_length=32)
    default_locale: str = Field(default="en", min_length=2, max_length=16)
    email_provider: Literal["console", "smtp"] = "console"
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "no-reply@localhost"
    smtp_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    phone_provider: Literal["console", "webhook", "twilio"] = "console"
    phone_webhook_url: str | None = None
    phone_webhook_token: SecretStr | None = None
    twilio_base_url: str = "https://api.twilio.com"
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_from: str | None = None
    provider_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    # The outbox dispatcher (off: this process only enqueues; another one sends).
    outbox_dispatcher: bool = True
    outbox_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # A claimed message is this process's alone for the lease; a message the provider
    # accepted is settled (retried while the database is away) within it, so it must
    # outlast a send plus a failover. 90: Patroni's defaults (ttl 30 s, loop_wait 10 s)
    # promote a standby ~45 s after the primary died at worst, CloudNativePG within a
    # few probe periods (~30 s); plus a send that was under way (provider timeout, 10 s)
    # and one settle attempt still waiting on the dead host (database timeout, 5 s):
    # ~60 s, and a margin. The cost: a message claimed by a process that then crashed
    # waits this long before another one sends it, well inside a code's default 5 min.
    outbox_lease_seconds: int = Field(default=90, ge=15, le=3600)
    outbox_backoff_max_seconds: float = Field(default=120.0, ge=1, le=3600)
    notice_ttl_seconds: int = Field(default=24 * 3600, ge=300, le=7 * 86400)

    # 2FA sessions (NIST AAL2: at most 12 h absolute, 30 min idle).
    session_ttl_seconds: int = Field(default=12 * 3600, ge=60, le=12 * 3600)
    session_idle_seconds: int = Field(default=30 * 60, ge=60, le=30 * 60)
    # Remembered browsers (trusted devices, service/devices.py): a browser the user asked
    # to remember logs in without a code for this many days after the code that
    # remembered it (30, the usual "remember this browser for 30 days"; at most 90: a
    # bearer credential of the browser should not outlive a season)...
    trusted_device_days: int = Field(default=30, ge=1, le=90)
    # ... unless it went unused this long (14: a browser left alone for two weeks is
    # more likely a shared or abandoned computer than the user's own); at most the above.
    trusted_device_idle_days: int = Field(default=14, ge=1, le=90)
    # Unknown device tokens from one client address (an IPv6 /64) an hour, whichever
    # users they name, before RecognizeDevice refuses that address (RESOURCE_EXHAUSTED).
    # A real browser presents an unknown token only after its device was purged, so 20
    # is far above honest traffic even behind a shared NAT; each user's own unknown
    # tokens also count against that user's lockout.
    trusted_device_misses_per_ip: int = Field(default=20, ge=1, le=100_000)
    # CheckSession's aal2 for sessions established with an email code. NIST SP 800-63B-4
    # says email SHALL NOT be used for out-of-band authentication, so by default such a
    # session is not AAL2; an operator whose policy accepts email sets this.
    email_counts_for_aal2: bool = False

    # Passkeys (WebAuthn, factors/passkey.py). The RP ID is the domain the credentials are
    # bound to (the portal's registrable domain); the origins are the exact
    # scheme://host[:port] of the pages that run navigator.credentials (W3C WebAuthn
    # 7.1 step 9 / 7.2 step 13). Development defaults fit the reference portal and
    # backoffice on localhost:8080/8081; production needs both set explicitly.
    passkeys_enabled: bool = True
    webauthn_rp_id: str | None = None
    webauthn_rp_name: str | None = None  # shown by the browser; default the product name
    webauthn_origins: str | None = None  # comma-separated origins

    # Operations.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # None: text when stderr is a terminal, JSON lines otherwise (decided by the cli).
    log_format: Literal["json", "text"] | None = None
    # Telemetry (mfa_service/telemetry.py). "console" prints spans and metrics (development);
    # OTLP export is on when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    otel_exporter: Literal["none", "console"] = "none"
    # The standard OpenTelemetry variables, by their own names (no MFA_ prefix). The OTLP
    # exporters read their other OTEL_EXPORTER_OTLP_* settings (headers, timeout,
    # certificate, compression) themselves.
    otlp_endpoint: str | None = Field(default=None, validation_alias=AliasChoices(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"))
    otlp_protocol: Literal["grpc", "http/protobuf"] = Field(
        default="http/protobuf", validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "otlp_protocol"))
    otel_service_name: str = Field(default="mfa-service", min_length=1, validation_alias=(
        AliasChoices("OTEL_SERVICE_NAME", "otel_service_name")))
    otel_resource_attributes: str = Field(default="", validation_alias=AliasChoices(
        "OTEL_RESOURCE_ATTRIBUTES", "otel_resource_attributes"))
    otel_traces_sampler: Literal[
        "always_on", "always_off", "traceidratio", "parentbased_always_on",
        "parentbased_always_off", "parentbased_traceidratio"] = Field(
        default="parentbased_always_on", validation_alias=AliasChoices(
            "OTEL_TRACES_SAMPLER", "otel_traces_sampler"))
    otel_traces_sampler_arg: float | None = Field(
        default=None, ge=0, le=1, validation_alias=AliasChoices(
            "OTEL_TRACES_SAMPLER_ARG", "otel_traces_sampler_arg"))
    otel_metric_export_interval_ms: int = Field(
        default=60_000, ge=100, le=3_600_000, validation_alias=AliasChoices(
            "OTEL_METRIC_EXPORT_INTERVAL", "otel_metric_export_interval_ms"))
    # Prometheus scrape endpoint, HOST:PORT (worker i of MFA_WORKERS listens on PORT+i);
    # unset: none.
    metrics_addr: str | None = None
    # How often the gauges that need the database (outbox depth and age) are read.
    metrics_poll_seconds: float = Field(default=15.0, gt=0, le=3600)
    # SIGTERM: health NOT_SERVING at once, every call still served for the drain period
    # (load balancers move away), then calls already received get the grace period.
    shutdown_drain_seconds: float = Field(default=5.0, ge=0, le=60)
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=60)
    # An extra plaintext listener that serves grpc.health.v1 only (the kubelet's gRPC
    # probe and `mfa-service health` cannot present a client certificate).
    health_listen_addr: str | None = None
    health_probe_seconds: float = Field(default=5.0, gt=0, le=300)
    # How often ended sessions/challenges/sent messages are deleted (0: never, e.g. when a
    # separate job does it).
    purge_interval_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400)

    @field_validator("listen_addr", "health_listen_addr")
    @classmethod
    def _check_listen_addr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:50051")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        problem = database_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems: list[str] = []
        if self.env is Environment.PRODUCTION:
            if self.tls_cert_file is None or self.tls_key_file is None:
                problems.append("MFA_TLS_CERT_FILE and MFA_TLS_KEY_FILE are required when "
                                "MFA_ENV=production (no plaintext gRPC)")
            if self.callers_file is None:
                problems.append("MFA_CALLERS_FILE is required when MFA_ENV=production "
                                "(caller authentication)")
            if self.keyring is None:
                problems.append("MFA_KEYRING is required when MFA_ENV=production "
                                "(generate one with `mfa-service keys generate`)")
            if self.email_provider == "console":
                problems.append("MFA_EMAIL_PROVIDER=console only logs messages: "
                                "not allowed when MFA_ENV=production")
            if self.phone_provider == "console":
                problems.append("MFA_PHONE_PROVIDER=console only logs messages: "
                                "not allowed when MFA_ENV=production")
            # Codes, the SMTP password and the provider token must not cross a network
            # in clear; a relay on this host (loopback) may stay plaintext.
            if (self.email_provider == "smtp" and self.smtp_tls == "none"
                    and not is_loopback_host(self.smtp_host)):
                problems.append("MFA_SMTP_TLS=none to a remote MFA_SMTP_HOST sends codes and "
                                "the SMTP password in clear: not allowed when "
                                "MFA_ENV=production (use starttls or tls)")
            for name, url in (("MFA_PHONE_WEBHOOK_URL", self.phone_webhook_url
                               if self.phone_provider == "webhook" else None),
                              ("MFA_TWILIO_BASE_URL", self.twilio_base_url
                               if self.phone_provider == "twilio" else None)):
                if url is not None and not _is_safe_url(url):
                    problems.append(f"{name} must be https:// (or http:// to loopback) when "
                                    "MFA_ENV=production: codes and the provider token would "
                                    "travel in clear")
            if self.passkeys_enabled and (not self.webauthn_rp_id or not self.webauthn_origins):
                problems.append("MFA_WEBAUTHN_RP_ID and MFA_WEBAUTHN_ORIGINS are required when "
                                "MFA_ENV=production with passkeys on (the development "
                                "defaults name localhost); set them, or "
                                "MFA_PASSKEYS_ENABLED=false")
        if self.passkeys_enabled:
            problems.extend(_webauthn_problems(
                self.rp_id, self.origins, production=self.env is Environment.PRODUCTION))
        if self.health_listen_addr is not None:
            health_port = self.health_listen_addr.rpartition(":")[2]
            if health_port != "0" and health_port == self.listen_addr.rpartition(":")[2]:
                problems.append("MFA_HEALTH_LISTEN_ADDR needs a port of its own, not the "
                                "one of MFA_LISTEN_ADDR")
        if self.workers > 1 and self.listen_addr.endswith(":0"):
            problems.append("MFA_WORKERS > 1 needs a fixed port in MFA_LISTEN_ADDR")
        slowest_send = max(self.smtp_timeout_seconds, self.provider_timeout_seconds)
        if self.outbox_lease_seconds <= slowest_send + self.database_timeout_seconds:
            problems.append("MFA_OUTBOX_LEASE_SECONDS must exceed the slowest provider "
                            "timeout plus MFA_DATABASE_TIMEOUT_SECONDS (a send and its "
                            "settle), or a message still being sent could be claimed and "
                            "sent again")
        if self.trusted_device_idle_days > self.trusted_device_days:
            problems.append("MFA_TRUSTED_DEVICE_IDLE_DAYS must not exceed "
                            "MFA_TRUSTED_DEVICE_DAYS (a browser ends at the absolute limit "
                            "however often it is used)")
        if self.phone_provider == "webhook" and not self.phone_webhook_url:
            problems.append("MFA_PHONE_PROVIDER=webhook needs MFA_PHONE_WEBHOOK_URL")
        if self.phone_provider == "twilio" and not (
                self.twilio_account_sid and self.twilio_auth_token and self.twilio_from):
            problems.append("MFA_PHONE_PROVIDER=twilio needs MFA_TWILIO_ACCOUNT_SID, "
                            "MFA_TWILIO_AUTH_TOKEN and MFA_TWILIO_FROM")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def rp_id(self) -> str:
        """The WebAuthn relying party id (development default ``localhost``)."""
        return (self.webauthn_rp_id or DEV_RP_ID).strip().lower()

    @property
    def origins(self) -> tuple[str, ...]:
        """The origins a passkey ceremony may come from (development default: the
        reference portal and backoffice)."""
        raw = self.webauthn_origins or DEV_ORIGINS
        return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())

    @property
    def telemetry_enabled(self) -> bool:
        return bool(self.otel_exporter != "none" or self.otlp_endpoint or self.metrics_addr)

    def worker_metrics_addr(self) -> str:
        """MFA_METRICS_ADDR for this process: worker i listens on the port + i."""
        assert self.metrics_addr is not None
        host, _, port = self.metrics_addr.rpartition(":")
        return f"{host}:{int(port) + self.worker_index}"

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).get_backend_name() == "sqlite"

    def resolved_key_file(self) -> Path:
        """Where the development key file lives: beside the SQLite file, else in the cwd."""
        if self.key_file is not None:
            return self.key_file
        url = make_url(self.database_url)
        if self.is_sqlite and url.database and url.database != ":memory:":
            return Path(url.database).with_suffix(".keys")
        return Path("mfa-service.keys")
