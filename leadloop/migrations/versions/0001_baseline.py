"""Baseline: the store as the last release without migrations created it (commit eec5278).

`leadloop db upgrade` also runs this revision on a store made by any release before
migrations (it has no `alembic_version` table): tables it has are kept as they are, indexes it
lacks are created, and the indexes earlier versions made and then retired are dropped (each
cost every sync write and served no query: those on `lead_id` or `source` alone duplicated the
first column of a unique index, and no query filters on an event's name or a lead's
utm_source alone). On an empty database it creates the whole schema.

Revision ID: 0001_baseline
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

_JOB_OUTCOME = sa.Enum('running', 'ok', 'failed', 'interrupted', name='joboutcome')
_LEAD_STATUS = sa.Enum('active', 'deleted', 'merged', 'erased', name='leadstatus')
_CONVERSION_KIND = sa.Enum('conversion', 'restatement', 'retraction', name='conversionkind')
_CONVERSION_STATUS = sa.Enum('pending', 'held', 'sent', 'rejected', 'failed', 'dead', 'withdrawn',
                             name='conversionstatus')
_ERASED = sa.text("status = 'erased'")

_RETIRED_INDEXES = ("ix_lead_source", "ix_lead_utm_source", "ix_lead_event_lead_id",
                    "ix_lead_event_name", "ix_stage_change_lead_id", "ix_score_lead_id")


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "daemon_lease" not in have:
        op.create_table('daemon_lease',
            sa.Column('name', sa.String(), nullable=False),
            sa.Column('owner', sa.String(), nullable=False),
            sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint('name')
        )
    if "erasure" not in have:
        op.create_table('erasure',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('selector', sa.String(), nullable=False),
            sa.Column('leads', sa.Integer(), nullable=False),
            sa.Column('counts', sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint('id')
        )
    if "job_run" not in have:
        op.create_table('job_run',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('name', sa.String(), nullable=False),
            sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('outcome', _JOB_OUTCOME, nullable=False),
            sa.Column('counts', sa.JSON(), nullable=False),
            sa.Column('error', sa.String(), nullable=True),
            sa.PrimaryKeyConstraint('id')
        )
    if "lead" not in have:
        op.create_table('lead',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('source', sa.String(), nullable=False),
            sa.Column('crm_id', sa.String(), nullable=False),
            sa.Column('object_type', sa.String(), nullable=False),
            sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('crm_updated_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('status', _LEAD_STATUS, nullable=False),
            sa.Column('merged_into_id', sa.Integer(), nullable=True),
            sa.Column('email_sha256', sa.String(), nullable=True),
            sa.Column('email_google_sha256', sa.String(), nullable=True),
            sa.Column('phone_e164_sha256', sa.String(), nullable=True),
            sa.Column('phone_digits_sha256', sa.String(), nullable=True),
            sa.Column('gclid', sa.String(), nullable=True),
            sa.Column('gbraid', sa.String(), nullable=True),
            sa.Column('wbraid', sa.String(), nullable=True),
            sa.Column('fbclid', sa.String(), nullable=True),
            sa.Column('fbc', sa.String(), nullable=True),
            sa.Column('msclkid', sa.String(), nullable=True),
            sa.Column('li_fat_id', sa.String(), nullable=True),
            sa.Column('meta_lead_id', sa.String(), nullable=True),
            sa.Column('utm_source', sa.String(), nullable=True),
            sa.Column('utm_medium', sa.String(), nullable=True),
            sa.Column('utm_campaign', sa.String(), nullable=True),
            sa.Column('landing_page', sa.String(), nullable=True),
            sa.Column('country', sa.String(), nullable=True),
            sa.Column('consent_ad_user_data', sa.Boolean(), nullable=True),
            sa.Column('consent_ad_personalization', sa.Boolean(), nullable=True),
            sa.Column('current_stage', sa.String(), nullable=True),
            sa.Column('attributes', sa.JSON(), nullable=False),
            sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(['merged_into_id'], ['lead.id'], ),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('source', 'crm_id', name='uq_lead_source_crm_id')
        )
    if "rejected_record" not in have:
        op.create_table('rejected_record',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('job_run_id', sa.Integer(), nullable=True),
            sa.Column('source', sa.String(), nullable=False),
            sa.Column('object_type', sa.String(), nullable=False),
            sa.Column('record_ref', sa.String(), nullable=False),
            sa.Column('flow_stage', sa.String(), nullable=False),
            sa.Column('reason', sa.String(), nullable=False),
            sa.Column('payload', sa.JSON(), nullable=False),
            sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint('id')
        )
    if "sync_state" not in have:
        op.create_table('sync_state',
            sa.Column('source', sa.String(), nullable=False),
            sa.Column('object_type', sa.String(), nullable=False),
            sa.Column('cursor_updated_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('cursor_id', sa.String(), nullable=True),
            sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('last_job_run_id', sa.Integer(), nullable=True),
            sa.Column('extra', sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint('source', 'object_type')
        )
    if "validation_result" not in have:
        op.create_table('validation_result',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('job_run_id', sa.Integer(), nullable=True),
            sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('micro', sa.String(), nullable=False),
            sa.Column('segment', sa.String(), nullable=False),
            sa.Column('n', sa.Integer(), nullable=False),
            sa.Column('n_with', sa.Integer(), nullable=False),
            sa.Column('n_without', sa.Integer(), nullable=False),
            sa.Column('macro_with', sa.Integer(), nullable=False),
            sa.Column('macro_without', sa.Integer(), nullable=False),
            sa.Column('rate_with', sa.Float(), nullable=True),
            sa.Column('rate_without', sa.Float(), nullable=True),
            sa.Column('lift', sa.Float(), nullable=True),
            sa.Column('lift_ci_low', sa.Float(), nullable=True),
            sa.Column('lift_ci_high', sa.Float(), nullable=True),
            sa.Column('p_value', sa.Float(), nullable=True),
            sa.Column('q_value', sa.Float(), nullable=True),
            sa.Column('phi', sa.Float(), nullable=True),
            sa.Column('median_days_to_macro', sa.Float(), nullable=True),
            sa.Column('verdict', sa.String(), nullable=False),
            sa.Column('reason', sa.String(), nullable=False),
            sa.Column('role', sa.String(), nullable=False),
            sa.Column('details', sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint('id')
        )
    if "conversion" not in have:
        op.create_table('conversion',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('order_id', sa.String(), nullable=False),
            sa.Column('destination', sa.String(), nullable=False),
            sa.Column('lead_id', sa.Integer(), nullable=False),
            sa.Column('stage', sa.String(), nullable=False),
            sa.Column('revision', sa.Integer(), nullable=False),
            sa.Column('kind', _CONVERSION_KIND, nullable=False),
            sa.Column('conversion_action', sa.String(), nullable=False),
            sa.Column('conversion_time', sa.DateTime(timezone=True), nullable=False),
            sa.Column('value', sa.Numeric(precision=18, scale=4), nullable=True),
            sa.Column('currency', sa.String(), nullable=True),
            sa.Column('click_id_kind', sa.String(), nullable=True),
            sa.Column('click_id', sa.String(), nullable=True),
            sa.Column('status', _CONVERSION_STATUS, nullable=False),
            sa.Column('hold_rule', sa.String(), nullable=True),
            sa.Column('attempts', sa.Integer(), nullable=False),
            sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('last_error', sa.String(), nullable=True),
            sa.Column('platform_code', sa.String(), nullable=True),
            sa.Column('platform_response', sa.JSON(), nullable=False),
            sa.Column('request_id', sa.String(), nullable=True),
            sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
            sa.Column('job_run_id', sa.Integer(), nullable=True),
            sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('destination', 'lead_id', 'stage', 'revision', name='uq_conversion'),
            sa.UniqueConstraint('order_id')
        )
    if "lead_event" not in have:
        op.create_table('lead_event',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('lead_id', sa.Integer(), nullable=False),
            sa.Column('name', sa.String(), nullable=False),
            sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('value', sa.Float(), nullable=True),
            sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('lead_id', 'name', 'occurred_at', name='uq_lead_event')
        )
    if "score" not in have:
        op.create_table('score',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('lead_id', sa.Integer(), nullable=False),
            sa.Column('model_version', sa.String(), nullable=False),
            sa.Column('probability', sa.Float(), nullable=False),
            sa.Column('expected_value', sa.Numeric(precision=18, scale=4), nullable=True),
            sa.Column('currency', sa.String(), nullable=True),
            sa.Column('value_band', sa.String(), nullable=True),
            sa.Column('scored_at', sa.DateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('lead_id', 'model_version', name='uq_score')
        )
    if "stage_change" not in have:
        op.create_table('stage_change',
            sa.Column('id', sa.Integer(), nullable=False),
            sa.Column('lead_id', sa.Integer(), nullable=False),
            sa.Column('field', sa.String(), nullable=False),
            sa.Column('value', sa.String(), nullable=False),
            sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
            sa.Column('deal_id', sa.String(), nullable=False),
            sa.Column('amount', sa.Numeric(precision=18, scale=4), nullable=True),
            sa.Column('currency', sa.String(), nullable=True),
            sa.Column('is_lost', sa.Boolean(), nullable=False),
            sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], ),
            sa.PrimaryKeyConstraint('id'),
            sa.UniqueConstraint('lead_id', 'field', 'value', 'deal_id', name='uq_stage_change')
        )

    op.create_index('ix_job_run_name', 'job_run', ['name'], if_not_exists=True)
    op.create_index('ix_lead_created_at', 'lead', ['created_at'], if_not_exists=True)
    op.create_index('ix_lead_erased', 'lead', ['source', 'crm_id'],
                    if_not_exists=True, postgresql_where=_ERASED,
                    sqlite_where=_ERASED)
    op.create_index('ix_lead_updated_at', 'lead', ['updated_at'], if_not_exists=True)
    op.create_index('ix_rejected_record_job_run_id', 'rejected_record', ['job_run_id'], if_not_exists=True)
    op.create_index('ix_validation_result_job_run_id', 'validation_result', ['job_run_id'],
                    if_not_exists=True)
    op.create_index('ix_conversion_due', 'conversion', ['destination', 'status', 'next_attempt_at'],
                    if_not_exists=True)
    op.create_index('ix_conversion_hold', 'conversion', ['destination', 'status', 'hold_rule'],
                    if_not_exists=True)
    op.create_index('ix_conversion_job_run_id', 'conversion', ['job_run_id'], if_not_exists=True)
    op.create_index('ix_conversion_lead_id', 'conversion', ['lead_id'], if_not_exists=True)
    op.create_index('ix_conversion_status', 'conversion', ['status'], if_not_exists=True)
    op.create_index('ix_score_scored_at', 'score', ['scored_at'], if_not_exists=True)
    for name in _RETIRED_INDEXES:
        op.drop_index(name, if_exists=True)
