"""sessions: room on each page for the idle deadline's slide (fillfactor 80, PostgreSQL)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-21 10:00:00

A session's row is written once at login and then updated in place: its idle deadline
slides (at most once a minute while the session is used) and it may be revoked. Neither
column is indexed, so PostgreSQL can make each update a heap-only tuple (HOT): the new
version goes on the same page and none of the table's three indexes (primary key, token
hash, user) gets an entry. That needs free space on the page, and a table filled by
inserts alone has little: measured with 50,000 seeded sessions each sliding once, one
update in ten found no room and wrote a new version elsewhere and three index entries
(at a million sessions, three index pages that are rarely in memory); with this room,
none did (docs/BENCHMARKS.md).

Only pages written from now on keep the room; existing ones get it as rows are purged and
their space reused. No rewrite, so the migration takes no lock worth the name. SQLite has
no such setting.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 80


def upgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.execute(f'ALTER TABLE sessions SET (fillfactor = {FILLFACTOR})')


def downgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.execute('ALTER TABLE sessions RESET (fillfactor)')
