"""The store: SQLAlchemy tables, the engine, and one narrow repository per aggregate.

SQLAlchemy is the schema authority (Alembic migrations in mfa_service/migrations).
Repositories speak SQLAlchemy Core on an AsyncConnection rather than the ORM: on this
machine Core costs roughly half the CPU of the ORM per statement (shared/BASELINES.md),
and the hot paths (Verify, CheckSession) are a handful of statements each.
"""
