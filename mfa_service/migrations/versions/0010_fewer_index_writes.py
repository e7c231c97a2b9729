"""fewer index writes per login: two redundant indexes gone, the send counters' partial

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20 10:00:00

A login writes a challenge, updates it, and writes audit rows; each index of those tables
is one more write (and its WAL) per row. Measured on the login benchmark
(docs/BENCHMARKS.md):

- ``ix_challenges_factor_id`` repeated the leading column of
  ``uq_challenges_factor_request``, and ``ix_audit_events_user_id`` that of
  ``ix_audit_events_user_time``: each query that used one uses the other.
- The three send counters (per destination, number range, country) index only
  challenges that sent a code. An app or passkey challenge has NULL there and is never
  counted, so it now costs those indexes nothing. Their queries compare with ``=``,
  which implies ``IS NOT NULL``, so PostgreSQL and SQLite both still use them.

The new indexes are built inside the migration's transaction (``challenges`` holds
recent challenges only: the retention job deletes old ones).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SENT = (
    ('ix_challenges_destination_time', 'destination_key'),
    ('ix_challenges_phone_prefix_time', 'phone_prefix_key'),
    ('ix_challenges_phone_region_time', 'phone_region'),
)


def upgrade() -> None:
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.drop_index('ix_challenges_factor_id')
        for name, column in _SENT:
            batch_op.drop_index(name)
            where = sa.text(f'{column} IS NOT NULL')
            batch_op.create_index(name, [column, 'created_at'], unique=False,
                                  postgresql_where=where, sqlite_where=where)
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_user_id')


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_user_id', ['user_id'], unique=False)
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        for name, column in _SENT:
            batch_op.drop_index(name)
            batch_op.create_index(name, [column, 'created_at'], unique=False)
        batch_op.create_index('ix_challenges_factor_id', ['factor_id'], unique=False)
