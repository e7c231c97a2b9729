"""the proof model: when a factor is established, which session enrolled it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 13:40:00

``factors.established_at``: from when an ACTIVE factor (or, on the recovery-code factor,
the current code set) may prove changes that remove or replace what the user had. The
user's first factor and its codes are established at once, anything added later after
MFA_NEW_CREDENTIAL_HOLD. Rows that exist before this revision predate the rule and
count as established from their confirmation (the recovery-code factor: its creation).

``factors.enrolled_session_id``: the 2FA session whose step-up allowed this enrolment;
confirming the PENDING factor needs it still live. NULL for a first factor.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('established_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('enrolled_session_id', sa.String(length=36),
                                      nullable=True))
    op.execute(sa.text(
        "UPDATE factors SET established_at = COALESCE(confirmed_at, created_at) "
        "WHERE status = 'active'"))


def downgrade() -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.drop_column('enrolled_session_id')
        batch_op.drop_column('established_at')
