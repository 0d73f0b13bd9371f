"""SQLAlchemy 2 models and the session factory. Dialect-neutral: SQLite (WAL) by default, or PostgreSQL
(``postgresql://user@host:port/db``, psycopg 3) when several machines share the queue.

The job table is the queue: APScheduler only ticks, workers claim due rows. Job states:
RECEIVED → QUEUED → RUNNING → REPORTED → DELIVERED, or FAILED(reason); ``attempts`` and ``next_run_at``
drive retries with backoff. A delivery row per (job, destination) tracks sending the report. A claimed job
or delivery holds a lease (``lease_expires_at``, renewed while it runs): once it expires, the row belongs to
a worker that died and any worker may claim it.
The schema is migrated by Alembic (service.store.schema; revisions in service/store/migrations/versions):
a change to these models needs a new revision.
PHI (patient name, id, birth date) lives only here and in the DICOM files, never in logs.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class JobState(str, enum.Enum):  # noqa: UP042 (StrEnum would change str()/format())
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    REPORTED = "REPORTED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class DeliveryState(str, enum.Enum):  # noqa: UP042 (StrEnum would change str()/format())
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class Patient(Base):
    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    # A non-empty PatientID with its issuer is the patient (migration 0004); without one, the name too.
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer", "name", name="uq_patient"),
        Index("uq_patient_id_issuer", "patient_id", "issuer", unique=True,
              sqlite_where=text("patient_id != ''"), postgresql_where=text("patient_id != ''")),
    )


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(32), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    patient: Mapped[Patient] = relationship()
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    protocol_name: Mapped[str] = mapped_column(String(64), default="")
    performed_procedure_step_description: Mapped[str] = mapped_column(String(64), default="")
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received object version. A resend with different bytes is kept as a new version."""

    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_comments: Mapped[str] = mapped_column(Text, default="")
    path: Mapped[str] = mapped_column(String(1024))  # relative to the file store root
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: FaceSym's own output come back (key images, PDF): stored, never analysed.
    facesym_output: Mapped[bool] = mapped_column(default=False)
    #: A 110104 audit record covers this object: set when its association's record is written; objects of
    #: an association cut short by a stop or crash are recorded at the next start (service.audit.trail).
    audited: Mapped[bool] = mapped_column(default=False, index=True)
    series: Mapped[Series] = relationship(back_populates="instances")
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version", name="uq_instance_version"),)


class Job(Base):
    """Analysis of one study by one engine version (the unique key makes 'analysed once per version')."""

    __tablename__ = "job"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    engine_version: Mapped[str] = mapped_column(String(32))
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.RECEIVED
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_by: Mapped[str] = mapped_column(String(128), default="")
    #: While RUNNING: the claim is good until then (heartbeat-renewed); expired = its worker is gone.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sr_path: Mapped[str] = mapped_column(String(1024), default="")  # relative to the file store root
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    #: The report's other objects (key images, encapsulated PDF), relative paths as a JSON list.
    report_files: Mapped[str] = mapped_column(Text, default="[]")
    result_json: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    study: Mapped[Study] = relationship()
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")
    __table_args__ = (
        UniqueConstraint("study_pk", "engine_version", name="uq_job_study_version"),
        Index("ix_job_state_next_run", "state", "next_run_at"),
    )


class Delivery(Base):
    """Sending one job's report to one destination (AE title@host:port)."""

    __tablename__ = "delivery"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"))
    destination: Mapped[str] = mapped_column(String(300))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The worker sending it now, and until when its claim holds (one sender at a time).
    claimed_by: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    job: Mapped[Job] = relationship(back_populates="deliveries")
    __table_args__ = (
        UniqueConstraint("job_pk", "destination", name="uq_delivery"),
        Index("ix_delivery_state_next_run", "state", "next_run_at"),
    )


def engine_url(url: str) -> str:
    """``postgresql://`` (or ``postgres://``) means psycopg 3: ``postgresql+psycopg://``; others as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    """Create the engine; SQLite gets WAL, a busy timeout and foreign keys (several threads write)."""
    url = engine_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a C-STORE is acknowledged only after this commit
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def open_database(url: str) -> sessionmaker:
    """Engine + schema brought to the newest revision (service.store.schema.upgrade) → a session factory."""
    from service.store.schema import upgrade

    engine = make_engine(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)


class AuditRecord(Base):
    """One audit message (PS3.15 A.5 XML) in the append-only, hash-chained audit trail (service.audit).

    ``hash`` = SHA-256 hex of ``prev_hash`` + ``seq|time|event_id|outcome|xml`` (UTF-8); the first record's
    ``prev_hash`` is 64 zeros. ``time`` is kept as canonical ISO text (UTC, microseconds) so that every byte
    is covered by the hash. ``forwarded`` (not hashed) is set once the record reached the syslog repository.
    """

    __tablename__ = "audit_record"
    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    time: Mapped[str] = mapped_column(String(32), index=True)
    event_id: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[int] = mapped_column(Integer)
    xml: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    forwarded: Mapped[bool] = mapped_column(default=False, index=True)


class ServiceState(Base):
    """Named timestamps shared by every process on the database (``receiver_started_at``: see
    :func:`service.jobs.worker.promote_stable_studies`)."""

    __tablename__ = "service_state"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


RECEIVER_STARTED_AT = "receiver_started_at"


USER_ROLES = ("viewer", "operator", "admin")


class User(Base):
    """A local user of the web console and the REST API (service.users, ``facesym user add``).

    ``password_hash`` is ``scrypt$N$r$p$<salt>$<key>`` (hashlib.scrypt, a per-user random salt, base64);
    ``token_hash`` is the SHA-256 hex of the user's API token (the token itself is shown once, never
    stored); ``session_epoch`` is part of every session cookie, so raising it (logout) ends all of the
    user's sessions. ``role`` is one of USER_ROLES: viewer < operator (re-run, re-send) < admin (audit).
    """

    __tablename__ = "app_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="viewer")
    token_hash: Mapped[str] = mapped_column(String(64), default="", index=True)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
