"""codes per destination, one pending factor per method

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 22:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination_key', sa.LargeBinary(length=32), nullable=True))
        batch_op.create_index('ix_challenges_destination_time', ['destination_key', 'created_at'], unique=False)
        batch_op.create_index('ix_challenges_user_time', ['user_id', 'created_at'], unique=False)
    # Before the unique index: an older release could leave several PENDING factors of
    # one method (parallel Enroll on PostgreSQL); keep the newest, supersede the rest
    # exactly as Enroll does (secret wiped).
    op.execute(sa.text("""
        UPDATE factors SET status = 'disabled', disabled_at = created_at,
               secret_ciphertext = NULL, secret_key_id = NULL
        WHERE status = 'pending' AND EXISTS (
            SELECT 1 FROM factors AS newer
            WHERE newer.user_id = factors.user_id AND newer.method = factors.method
              AND newer.status = 'pending'
              AND (newer.created_at > factors.created_at
                   OR (newer.created_at = factors.created_at AND newer.id > factors.id)))
    """))
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.create_index('uq_factors_one_pending_per_method', ['user_id', 'method'], unique=True, sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.drop_index('uq_factors_one_pending_per_method', sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.drop_index('ix_challenges_user_time')
        batch_op.drop_index('ix_challenges_destination_time')
        batch_op.drop_column('destination_key')
