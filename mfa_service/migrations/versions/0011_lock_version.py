"""user_lockouts.lock_version: the per-user lock and the first read in one round trip

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-20 12:00:00

Every lock of a user's row adds one to ``lock_version``. Verify takes the lock and reads
the challenge and its factor in one statement, whose snapshot is taken before the lock is
granted; comparing the version it saw with the one it wrote tells whether another
transaction of the user committed in between, and only then is the read repeated
(store/hot.py). Rows are never deleted from now on (the admin reset clears the counters in
place, and the purge keeps them), so the version only grows. Existing rows start at 0; adding a column with a
constant default rewrites nothing on PostgreSQL 11 and later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('user_lockouts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lock_version', sa.BigInteger(),
                                      server_default=sa.text('0'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('user_lockouts', schema=None) as batch_op:
        batch_op.drop_column('lock_version')
