"""Alembic migrations (script_location ``mfa_service:migrations``); run with ``mfa-service migrate``."""
