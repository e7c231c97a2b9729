"""several active passkeys per user

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 06:00:00

One ACTIVE factor per method still holds for email, phone and the app; a user may keep
one passkey per device, so the partial unique index leaves passkeys out. Passkeys store
their credential in the existing encrypted secret columns: no new column.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_WHERE = "status = 'active'"
NEW_WHERE = "status = 'active' AND method <> 'passkey'"


def _recreate(where: str) -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.drop_index('uq_factors_one_active_per_method')
        batch_op.create_index('uq_factors_one_active_per_method', ['user_id', 'method'],
                              unique=True, sqlite_where=sa.text(where),
                              postgresql_where=sa.text(where))


def upgrade() -> None:
    _recreate(NEW_WHERE)


def downgrade() -> None:
    # Only one passkey per user can survive the older index: keep the newest ACTIVE one.
    op.execute(sa.text("""
        UPDATE factors SET status = 'disabled', disabled_at = created_at,
               secret_ciphertext = NULL, secret_key_id = NULL
        WHERE method = 'passkey' AND status = 'active' AND EXISTS (
            SELECT 1 FROM factors AS newer
            WHERE newer.user_id = factors.user_id AND newer.method = 'passkey'
              AND newer.status = 'active'
              AND (newer.created_at > factors.created_at
                   OR (newer.created_at = factors.created_at AND newer.id > factors.id)))
    """))
    _recreate(OLD_WHERE)
