"""phone codes per number range and country, daily phone budget

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-12 09:00:00

Challenges that sent a phone code record the keyed hash of the number's prefix (the
number less its last 4 digits) and the number's region, so codes per range and per
country can be counted across users (SMS pumping, toll fraud); both NULL on older rows
and on every other challenge. ``phone_budget_days`` counts the phone codes of each UTC
day against MFA_PHONE_DAILY_BUDGET.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phone_prefix_key', sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column('phone_region', sa.String(length=8), nullable=True))
        batch_op.create_index('ix_challenges_phone_prefix_time', ['phone_prefix_key', 'created_at'], unique=False)
        batch_op.create_index('ix_challenges_phone_region_time', ['phone_region', 'created_at'], unique=False)
    op.create_table(
        'phone_budget_days',
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('used', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('day', name=op.f('pk_phone_budget_days')),
    )


def downgrade() -> None:
    op.drop_table('phone_budget_days')
    with op.batch_alter_table('challenges', schema=None) as batch_op:
        batch_op.drop_index('ix_challenges_phone_region_time')
        batch_op.drop_index('ix_challenges_phone_prefix_time')
        batch_op.drop_column('phone_region')
        batch_op.drop_column('phone_prefix_key')
