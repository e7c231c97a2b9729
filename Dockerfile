# syntax=docker/dockerfile:1
# Three stages:
#   build    builds both wheels (mfa-service-client from generated/, mfa-service from .) and
#            every dependency wheel, then installs them into /opt/venv;
#   wheels   just the two project wheels: `docker build --target wheels --output dist .`
#            publishes the client wheel for the portal and backoffice;
#   runtime  (the default target) the virtualenv on a slim image: no compiler, no pip
#            cache, non-root, MFA_ENV=production.
# Migrations are their own command (`mfa-service migrate`, e.g. a Kubernetes Job) run
# before a new version serves; on PostgreSQL `serve` refuses an outdated schema.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for a dependency that has no wheel for the target platform; it stays here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY generated ./generated
COPY pyproject.toml README.md ./
COPY mfa_service ./mfa_service
# One pip command for both: the server pins mfa-service-client, which is no index's.
RUN python -m pip wheel --wheel-dir /wheels ./generated . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels mfa-service \
 && /opt/venv/bin/pip uninstall -y pip \
 && mkdir /dist && cp /wheels/mfa_service-*.whl /wheels/mfa_service_client-*.whl /dist/

FROM scratch AS wheels
COPY --from=build /dist/ /

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mfa \
 && useradd --system --uid 10001 --gid mfa --home-dir /data --shell /usr/sbin/nologin mfa \
 && mkdir -p /data && chown mfa:mfa /data
COPY --from=build /opt/venv /opt/venv
# Production by default: the server then refuses to start without TLS, a callers file,
# MFA_KEYRING and real email/phone providers (docs/OPERATIONS.md, Configuration). The
# SQLite default in /data serves a single container; set MFA_DATABASE_URL for PostgreSQL.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MFA_ENV=production \
    MFA_LISTEN_ADDR=0.0.0.0:50051 \
    MFA_DATABASE_URL=sqlite+aiosqlite:////data/mfa-service.db
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051
# Asks the server's own grpc.health.v1 service (SERVING only once the database answers) on
# MFA_HEALTH_LISTEN_ADDR (plaintext, health only) when set, else on MFA_LISTEN_ADDR, where
# with TLS the certificate must also name 127.0.0.1 (IP SAN) and mTLS cannot pass.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["mfa-service", "health", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mfa-service"]
CMD ["serve"]
