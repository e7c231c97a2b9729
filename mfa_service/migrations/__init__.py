"""Alembic migrations (script_location ``mfa_service:migrations``).

Run them with ``mfa-service migrate``.
"""
