"""Alembic environment. FaceSym runs migrations in code (service.store.schema.upgrade) on a connection it
already holds inside a locked transaction: that connection arrives in ``config.attributes["connection"]``.
Without one (a developer running ``alembic`` by hand with ``-x url=...``), an engine is made from the URL.
"""

from __future__ import annotations

from alembic import context

from service.store.db import Base, make_engine

config = context.config
connection = config.attributes.get("connection")


def _run(conn: object) -> None:
    context.configure(
        connection=conn,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite can only change columns by copying the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: pass -x url=... (or use `facesym db upgrade`)")
    engine = make_engine(url)
    with engine.begin() as conn:
        _run(conn)
