"""Rejected records get an index on (source, record_ref).

Every synced page that rejects a record looks up the rejects already kept for the same records
(so a re-read adds no copies); without the index each lookup read the whole table, which grows
with every bad record a CRM or CSV ever sent.

Revision ID: 0003_rejected_record_ref
Revises: 0002_types_outbox_watermark
"""

from alembic import op

revision = "0003_rejected_record_ref"
down_revision = "0002_types_outbox_watermark"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rejected_record_ref", "rejected_record", ["source", "record_ref"])

