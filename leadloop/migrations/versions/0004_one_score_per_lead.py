"""The store keeps one score per lead: its latest.

A score row was kept per lead and model version, and every weekly retrain added one for each
active lead, while the report and the export read them all to keep each lead's latest. The
superseded rows go (the latest by `scored_at`, then `id`, stays: what both readers took), and
the unique key becomes the lead alone, so a new model's score replaces the old one.

Revision ID: 0004_one_score_per_lead
Revises: 0003_rejected_record_ref
"""

from alembic import op

revision = "0004_one_score_per_lead"
down_revision = "0003_rejected_record_ref"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM score WHERE EXISTS (SELECT 1 FROM score AS newer "
        "WHERE newer.lead_id = score.lead_id AND (newer.scored_at > score.scored_at "
        "OR (newer.scored_at = score.scored_at AND newer.id > score.id)))"
    )
    with op.batch_alter_table("score") as batch:
        batch.drop_constraint("uq_score", type_="unique")
        batch.create_unique_constraint("uq_score_lead", ["lead_id"])
