"""Schema migrations: Alembic, configured in code (no alembic.ini at run time); the revisions ship with the
package in ``service/store/migrations/versions``.

:func:`upgrade` brings any database to the head revision and is what :func:`service.store.db.open_database`
(hence ``facesym serve``, ``facesym worker`` and the tests) runs first:

- a database already at head costs one query;
- an empty database is upgraded from nothing;
- a database made by the old ``Base.metadata.create_all`` (FaceSym's tables but no ``alembic_version``) is
  stamped at the baseline revision (``0001_baseline`` = that schema), then upgraded;
- a database at a revision this FaceSym does not know (a newer FaceSym migrated it) is refused with a clear
  error instead of being touched.

Several processes may start at once on one database (``facesym serve`` + N ``facesym worker``): the check and
the migration run in one transaction under a lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped
advisory lock on PostgreSQL, whose DDL is transactional), so one process migrates and the others find the
database at head.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Alembic announces each of its autogenerate plugins at INFO when imported: noise in every service log.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import inspect, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402
from sqlalchemy.exc import InterfaceError, OperationalError  # noqa: E402

from service.errors import FaceSymError  # noqa: E402

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001_baseline"
#: A table every create_all-era database has: its presence without alembic_version means "stamp baseline".
_MARKER_TABLE = "job"
_PG_LOCK_KEY = 0x4653594D  # "FSYM": serialises migrations on PostgreSQL
_LOCAL = threading.Lock()  # and within one process


class SchemaError(FaceSymError):
    """The database's schema cannot be brought to this FaceSym's head revision (the message says why)."""


class DatabaseUnavailableError(FaceSymError):
    """The database cannot be reached or opened (the message names it without any password)."""


@contextmanager
def _reachable(engine: Engine) -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as exc:  # cannot connect, refused, no such file, locked...
        where = engine.url.render_as_string(hide_password=True)
        first = str(exc.orig or exc).strip().splitlines()[0]
        raise DatabaseUnavailableError(f"cannot use the database {where}: {first}") from None


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` found and did: ``before`` is None for an empty or create_all-era database."""

    before: str | None
    after: str
    stamped: bool = False

    @property
    def changed(self) -> bool:
        return self.stamped or self.before != self.after


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config without a file: the script location is the package's migrations folder; the
    connection (if any) reaches env.py through ``config.attributes``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None, "no migrations found"
    return head


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or None when it has no alembic_version (empty, or made by create_all)."""
    with _reachable(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _lock(conn: Connection) -> None:
    dialect = conn.dialect.name
    if dialect == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})


def upgrade(engine: Engine) -> UpgradeResult:
    """Bring the database behind ``engine`` to the head revision (see the module docstring)."""
    head = head_revision()
    before = current_revision(engine)
    if before == head:
        return UpgradeResult(before, head)
    with _LOCAL, _reachable(engine), engine.connect() as conn:
        _lock(conn)
        before = MigrationContext.configure(conn).get_current_revision()  # another process may have done it
        if before == head:
            conn.rollback()
            return UpgradeResult(before, head)
        if before is not None and before not in known_revisions():
            conn.rollback()
            raise SchemaError(
                f"the database is at schema revision {before}, which this FaceSym does not know (its newest "
                f"is {head}): a newer FaceSym has migrated it; run that version"
            )
        cfg = alembic_config(conn)
        stamped = before is None and inspect(conn).has_table(_MARKER_TABLE)
        if stamped:
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
        conn.commit()
    return UpgradeResult(before, head, stamped)
