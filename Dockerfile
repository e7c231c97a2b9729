# syntax=docker/dockerfile:1
# Multi-stage: build a virtualenv with the service, then copy it into a slim, non-root image.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mfa_service ./mfa_service
COPY generated ./generated
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 mfa \
 && useradd --system --uid 10001 --gid mfa --home-dir /data --shell /usr/sbin/nologin mfa \
 && mkdir -p /data && chown mfa:mfa /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MFA_LISTEN_ADDR=0.0.0.0:50051 \
    MFA_DATABASE_URL=sqlite+aiosqlite:////data/mfa-service.db
USER mfa
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051
# Asks the server's own grpc.health.v1 service (SERVING only once the database answers).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["mfa-service", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mfa-service"]
CMD ["serve"]
