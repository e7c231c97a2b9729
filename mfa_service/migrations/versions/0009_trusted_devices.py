"""trusted devices (remembered browsers), and how each session was established

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-19 10:00:00

``trusted_devices``: browsers a user asked to remember (Verify with remember_device);
RecognizeDevice opens a 2FA session on one without a code. Only the HMAC of the browser's
token is stored. ``device_misses``: unknown device tokens per client IP address in the
current window (RecognizeDevice's per-IP limit).

``sessions.channel`` and ``sessions.device_id``: what CheckSession reports about how a
session was established (RFC 8176 amr, AAL2, trusted_device), on the row its one read
already returns. Sessions from before this revision have neither: they were opened by a
code or a passkey (no remembered browser existed), and a phone session's channel is
unknown (its amr is then only "mfa").
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'trusted_devices',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('user_id', sa.String(length=128), nullable=False),
        sa.Column('token_hash', sa.LargeBinary(), nullable=False),
        sa.Column('token_key_id', sa.String(length=64), nullable=False),
        sa.Column('label', sa.String(length=64), nullable=False),
        sa.Column('application', sa.String(length=32), nullable=False),
        sa.Column('factor_id', sa.String(length=36), nullable=False),
        sa.Column('method', sa.String(length=32), nullable=False),
        sa.Column('caller', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('idle_expires_at', sa.DateTime(), nullable=False),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_trusted_devices')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_trusted_devices_token_hash')),
    )
    with op.batch_alter_table('trusted_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_trusted_devices_user_id'), ['user_id'],
                              unique=False)
    op.create_table(
        'device_misses',
        sa.Column('ip_key', sa.LargeBinary(length=32), nullable=False),
        sa.Column('misses', sa.Integer(), nullable=False),
        sa.Column('window_started_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('ip_key', name=op.f('pk_device_misses')),
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('channel', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('device_id', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('device_id')
        batch_op.drop_column('channel')
    op.drop_table('device_misses')
    with op.batch_alter_table('trusted_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_trusted_devices_user_id'))
    op.drop_table('trusted_devices')
