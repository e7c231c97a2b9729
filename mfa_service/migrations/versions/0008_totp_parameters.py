"""an authenticator app's own TOTP parameters (algorithm, digits, period)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-19 10:00:00

Factors imported from another system (``mfa-service import``) keep the TOTP parameters
their app was set up with: SHA1, SHA256 or SHA512; 6 or 8 digits; 30- or 60-second steps.
All three NULL means RFC 6238's SHA1, 6 digits, 30 s, which is what every factor before
this revision and every factor enrolled through the API uses: nothing is rewritten, and
adding nullable columns without a default is a catalogue change only on PostgreSQL.
Downgrading drops them: an imported app with other parameters would then be checked as
SHA1/6/30 and refuse its user's codes (``mfa-service admin reset-user`` those first).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('totp_algorithm', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('totp_digits', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('totp_period', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('factors', schema=None) as batch_op:
        batch_op.drop_column('totp_period')
        batch_op.drop_column('totp_digits')
        batch_op.drop_column('totp_algorithm')
