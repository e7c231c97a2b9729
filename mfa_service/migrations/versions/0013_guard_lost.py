"""mfa_guard_lost(): how one statement that is its own transaction undoes itself (PostgreSQL)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-22 10:00:00

A login's writes can go as one statement in autocommit, with no BEGIN or COMMIT around
them (store/unit.py, "optimistic"): the first of its data-modifying CTEs moves the user's
``lock_version`` on from the value read, and the others are the guarded writes (the
attempt, the TOTP step, the passkey counter). Every one must have matched its row, or
none of the writes may stand. The statement's last part asks that, and where one did not
it calls this function, whose error ends the statement, and with it the transaction, so
everything the statement wrote is rolled back. Its SQLSTATE (``MFA01``) is ours alone: the
caller reads it as "a guard lost its race" (errors.GuardLost) and runs the use case
again under the user's lock. Plain SQL has no way to raise an error, hence PL/pgSQL.
SQLite runs no such statement.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.execute(
            "CREATE FUNCTION mfa_guard_lost(guard integer) RETURNS integer"
            " LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'guarded write % matched no row', guard"
            " USING ERRCODE = 'MFA01'; END $$")


def downgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION mfa_guard_lost(integer)')
