-- Schema of a store created by leadloop at commit 732beb8 (sqlite); generated from that
-- commit's tables.py with SQLAlchemy's DDL compiler. Used by tests/test_migrations.py.

CREATE TABLE lead (
	id INTEGER NOT NULL, 
	source VARCHAR NOT NULL, 
	crm_id VARCHAR NOT NULL, 
	object_type VARCHAR NOT NULL, 
	created_at DATETIME NOT NULL, 
	crm_updated_at DATETIME, 
	status VARCHAR(7) NOT NULL, 
	merged_into_id INTEGER, 
	email_sha256 VARCHAR, 
	email_google_sha256 VARCHAR, 
	phone_e164_sha256 VARCHAR, 
	phone_digits_sha256 VARCHAR, 
	gclid VARCHAR, 
	gbraid VARCHAR, 
	wbraid VARCHAR, 
	fbclid VARCHAR, 
	fbc VARCHAR, 
	msclkid VARCHAR, 
	li_fat_id VARCHAR, 
	meta_lead_id VARCHAR, 
	utm_source VARCHAR, 
	utm_medium VARCHAR, 
	utm_campaign VARCHAR, 
	landing_page VARCHAR, 
	country VARCHAR, 
	consent_ad_user_data BOOLEAN, 
	consent_ad_personalization BOOLEAN, 
	current_stage VARCHAR, 
	attributes JSON NOT NULL, 
	ingested_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_lead_source_crm_id UNIQUE (source, crm_id), 
	FOREIGN KEY(merged_into_id) REFERENCES lead (id)
);

CREATE INDEX ix_lead_utm_source ON lead (utm_source);

CREATE INDEX ix_lead_created_at ON lead (created_at);

CREATE INDEX ix_lead_source ON lead (source);

CREATE INDEX ix_lead_updated_at ON lead (updated_at);

CREATE TABLE sync_state (
	source VARCHAR NOT NULL, 
	object_type VARCHAR NOT NULL, 
	cursor_updated_at DATETIME, 
	cursor_id VARCHAR, 
	last_started_at DATETIME, 
	last_success_at DATETIME, 
	last_job_run_id INTEGER, 
	extra JSON NOT NULL, 
	PRIMARY KEY (source, object_type)
);

CREATE TABLE rejected_record (
	id INTEGER NOT NULL, 
	job_run_id INTEGER, 
	source VARCHAR NOT NULL, 
	object_type VARCHAR NOT NULL, 
	record_ref VARCHAR NOT NULL, 
	flow_stage VARCHAR NOT NULL, 
	reason VARCHAR NOT NULL, 
	payload JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_rejected_record_job_run_id ON rejected_record (job_run_id);

CREATE TABLE job_run (
	id INTEGER NOT NULL, 
	name VARCHAR NOT NULL, 
	started_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	outcome VARCHAR(11) NOT NULL, 
	counts JSON NOT NULL, 
	error VARCHAR, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_job_run_name ON job_run (name);

CREATE TABLE validation_result (
	id INTEGER NOT NULL, 
	job_run_id INTEGER, 
	computed_at DATETIME NOT NULL, 
	micro VARCHAR NOT NULL, 
	segment VARCHAR NOT NULL, 
	n INTEGER NOT NULL, 
	n_with INTEGER NOT NULL, 
	n_without INTEGER NOT NULL, 
	macro_with INTEGER NOT NULL, 
	macro_without INTEGER NOT NULL, 
	rate_with FLOAT, 
	rate_without FLOAT, 
	lift FLOAT, 
	lift_ci_low FLOAT, 
	lift_ci_high FLOAT, 
	p_value FLOAT, 
	q_value FLOAT, 
	phi FLOAT, 
	median_days_to_macro FLOAT, 
	verdict VARCHAR NOT NULL, 
	reason VARCHAR NOT NULL, 
	role VARCHAR NOT NULL, 
	details JSON NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_validation_result_job_run_id ON validation_result (job_run_id);

CREATE TABLE daemon_lease (
	name VARCHAR NOT NULL, 
	owner VARCHAR NOT NULL, 
	acquired_at DATETIME NOT NULL, 
	heartbeat_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE erasure (
	id INTEGER NOT NULL, 
	requested_at DATETIME NOT NULL, 
	selector VARCHAR NOT NULL, 
	leads INTEGER NOT NULL, 
	counts JSON NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE lead_event (
	id INTEGER NOT NULL, 
	lead_id INTEGER NOT NULL, 
	name VARCHAR NOT NULL, 
	occurred_at DATETIME NOT NULL, 
	value FLOAT, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_lead_event UNIQUE (lead_id, name, occurred_at), 
	FOREIGN KEY(lead_id) REFERENCES lead (id)
);

CREATE INDEX ix_lead_event_name ON lead_event (name);

CREATE INDEX ix_lead_event_lead_id ON lead_event (lead_id);

CREATE TABLE stage_change (
	id INTEGER NOT NULL, 
	lead_id INTEGER NOT NULL, 
	field VARCHAR NOT NULL, 
	value VARCHAR NOT NULL, 
	entered_at DATETIME NOT NULL, 
	deal_id VARCHAR NOT NULL, 
	amount NUMERIC(18, 4), 
	currency VARCHAR, 
	is_lost BOOLEAN NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_stage_change UNIQUE (lead_id, field, value, deal_id), 
	FOREIGN KEY(lead_id) REFERENCES lead (id)
);

CREATE INDEX ix_stage_change_lead_id ON stage_change (lead_id);

CREATE TABLE score (
	id INTEGER NOT NULL, 
	lead_id INTEGER NOT NULL, 
	model_version VARCHAR NOT NULL, 
	probability FLOAT NOT NULL, 
	expected_value NUMERIC(18, 4), 
	currency VARCHAR, 
	value_band VARCHAR, 
	scored_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_score UNIQUE (lead_id, model_version), 
	FOREIGN KEY(lead_id) REFERENCES lead (id)
);

CREATE INDEX ix_score_lead_id ON score (lead_id);

CREATE TABLE conversion (
	id INTEGER NOT NULL, 
	order_id VARCHAR NOT NULL, 
	destination VARCHAR NOT NULL, 
	lead_id INTEGER NOT NULL, 
	stage VARCHAR NOT NULL, 
	revision INTEGER NOT NULL, 
	kind VARCHAR(11) NOT NULL, 
	conversion_action VARCHAR NOT NULL, 
	conversion_time DATETIME NOT NULL, 
	value NUMERIC(18, 4), 
	currency VARCHAR, 
	click_id_kind VARCHAR, 
	click_id VARCHAR, 
	status VARCHAR(9) NOT NULL, 
	hold_rule VARCHAR, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME, 
	last_error VARCHAR, 
	platform_code VARCHAR, 
	platform_response JSON NOT NULL, 
	request_id VARCHAR, 
	created_at DATETIME NOT NULL, 
	sent_at DATETIME, 
	job_run_id INTEGER, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_conversion UNIQUE (destination, lead_id, stage, revision), 
	UNIQUE (order_id), 
	FOREIGN KEY(lead_id) REFERENCES lead (id)
);

CREATE INDEX ix_conversion_lead_id ON conversion (lead_id);

CREATE INDEX ix_conversion_status ON conversion (status);

CREATE INDEX ix_conversion_due ON conversion (destination, status, next_attempt_at);
