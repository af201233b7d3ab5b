"""The outbox build watermark gets its own table, `outbox_watermark`.

It lived in `sync_state` as the rows of source "outbox" (`object_type` the config fingerprint,
`cursor_updated_at` the last build's start). Those rows move, with their value, so the next
export after the upgrade still rebuilds only the leads changed since its last build.

Revision ID: 0002_types_outbox_watermark
Revises: 0001_baseline
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_types_outbox_watermark"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbox_watermark',
        sa.Column('config_key', sa.String(), nullable=False),
        sa.Column('last_build_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('config_key')
    )
    op.execute("INSERT INTO outbox_watermark (config_key, last_build_started_at) "
               "SELECT object_type, cursor_updated_at FROM sync_state WHERE source = 'outbox'")
    op.execute("DELETE FROM sync_state WHERE source = 'outbox'")
