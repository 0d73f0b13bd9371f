-- The SQLite schema Base.metadata.create_all made before migrations (commit ac7e548), dumped with
-- sqlite_master: an 'old' FaceSym database for the upgrade test.
CREATE TABLE patient (
	id INTEGER NOT NULL,
	patient_id VARCHAR(64) NOT NULL,
	issuer VARCHAR(64) NOT NULL,
	name VARCHAR(324) NOT NULL,
	birth_date VARCHAR(8) NOT NULL,
	sex VARCHAR(16) NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_patient UNIQUE (patient_id, issuer, name)
);
CREATE TABLE audit_record (
	id INTEGER NOT NULL,
	seq INTEGER NOT NULL,
	time VARCHAR(32) NOT NULL,
	event_id VARCHAR(16) NOT NULL,
	outcome INTEGER NOT NULL,
	xml TEXT NOT NULL,
	prev_hash VARCHAR(64) NOT NULL,
	hash VARCHAR(64) NOT NULL,
	forwarded BOOLEAN NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (seq)
);
CREATE INDEX ix_audit_record_time ON audit_record (time);
CREATE INDEX ix_audit_record_forwarded ON audit_record (forwarded);
CREATE TABLE app_user (
	id INTEGER NOT NULL,
	username VARCHAR(64) NOT NULL,
	password_hash VARCHAR(256) NOT NULL,
	role VARCHAR(16) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	session_epoch INTEGER NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (username)
);
CREATE INDEX ix_app_user_token_hash ON app_user (token_hash);
CREATE TABLE study (
	id INTEGER NOT NULL,
	study_uid VARCHAR(64) NOT NULL,
	patient_pk INTEGER NOT NULL,
	accession_number VARCHAR(16) NOT NULL,
	study_id VARCHAR(16) NOT NULL,
	study_date VARCHAR(8) NOT NULL,
	study_time VARCHAR(32) NOT NULL,
	study_description VARCHAR(64) NOT NULL,
	referring_physician VARCHAR(324) NOT NULL,
	last_received_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (study_uid),
	FOREIGN KEY(patient_pk) REFERENCES patient (id)
);
CREATE TABLE series (
	id INTEGER NOT NULL,
	series_uid VARCHAR(64) NOT NULL,
	study_pk INTEGER NOT NULL,
	modality VARCHAR(16) NOT NULL,
	series_number INTEGER,
	series_description VARCHAR(64) NOT NULL,
	protocol_name VARCHAR(64) NOT NULL,
	performed_procedure_step_description VARCHAR(64) NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (series_uid),
	FOREIGN KEY(study_pk) REFERENCES study (id)
);
CREATE TABLE job (
	id INTEGER NOT NULL,
	study_pk INTEGER NOT NULL,
	engine_version VARCHAR(32) NOT NULL,
	state VARCHAR(16) NOT NULL,
	reason TEXT NOT NULL,
	attempts INTEGER NOT NULL,
	next_run_at DATETIME NOT NULL,
	claimed_by VARCHAR(128) NOT NULL,
	sr_path VARCHAR(1024) NOT NULL,
	sr_sop_instance_uid VARCHAR(64) NOT NULL,
	report_files TEXT NOT NULL,
	result_json TEXT NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_job_study_version UNIQUE (study_pk, engine_version),
	FOREIGN KEY(study_pk) REFERENCES study (id)
);
CREATE TABLE instance (
	id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	version INTEGER NOT NULL,
	series_pk INTEGER NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	transfer_syntax_uid VARCHAR(64) NOT NULL,
	instance_number INTEGER,
	number_of_frames INTEGER,
	image_comments TEXT NOT NULL,
	path VARCHAR(1024) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	size INTEGER NOT NULL,
	calling_ae VARCHAR(16) NOT NULL,
	received_at DATETIME NOT NULL,
	facesym_output BOOLEAN NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_instance_version UNIQUE (sop_instance_uid, version),
	FOREIGN KEY(series_pk) REFERENCES series (id)
);
CREATE TABLE delivery (
	id INTEGER NOT NULL,
	job_pk INTEGER NOT NULL,
	destination VARCHAR(300) NOT NULL,
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_run_at DATETIME NOT NULL,
	last_error TEXT NOT NULL,
	delivered_at DATETIME,
	PRIMARY KEY (id),
	CONSTRAINT uq_delivery UNIQUE (job_pk, destination),
	FOREIGN KEY(job_pk) REFERENCES job (id)
);
