"""``facesym audit verify`` and ``facesym audit export``: the trail found through the same settings as
``serve`` (``settings.effective_database_url``)."""

from __future__ import annotations

import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

from service.audit.anchor import AuditAnchor
from service.audit.trail import AuditTrail

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


def missing_sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL when it does not exist (then the trail is empty)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    path = Path(url[len(prefix):].split("?", 1)[0])
    return None if path.exists() else path


def open_trail(settings: Any) -> AuditTrail | None:
    """The service's trail, or None when its SQLite database does not exist yet (nothing is created)."""
    from service.store.db import open_database

    url = settings.effective_database_url
    if missing_sqlite_file(url) is not None:
        return None
    return AuditTrail(open_database(url), resolve_patients=False, anchor=AuditAnchor(settings.data_dir))


def verify_command(settings: Any, out: TextIO | None = None) -> int:
    """Print ``OK`` and the record count (exit 0), or the first broken record (exit 1). A data dir with no
    database fails too (exit 1): an intact-looking "OK: 0" would hide a wrong ``--config``/data dir or a
    deleted database."""
    out = out or sys.stdout
    trail = open_trail(settings)
    if trail is None:
        missing = missing_sqlite_file(settings.effective_database_url)
        print(f"BROKEN: no audit database at {missing} (wrong --config or FACESYM_DATA_DIR, or the database "
              "was removed): nothing could be verified", file=out)
        return EXIT_BROKEN
    result = trail.verify()
    if result.ok:
        print(f"OK: audit trail intact, {result.count} record(s)", file=out)
        return EXIT_OK
    print(f"BROKEN: audit record {result.first_broken_seq}: {result.reason}", file=out)
    return EXIT_BROKEN


def parse_since(text: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    text = text.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since must be an ISO date or date-time, got {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def export_command(
    settings: Any, since: str | None = None, fmt: str = "jsonl", out: TextIO | None = None
) -> int:
    """Print the records (time >= ``since``) as JSON lines or one XML document; exit 2 on bad arguments."""
    out = out or sys.stdout
    if fmt not in ("jsonl", "xml"):
        print(f"error: --format must be jsonl or xml, got {fmt!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        when = parse_since(since) if since else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    trail = open_trail(settings)
    if trail is None:
        print(f"note: no audit database at {missing_sqlite_file(settings.effective_database_url)}: "
              "no records", file=sys.stderr)
        lines: Any = iter(['<?xml version="1.0" encoding="UTF-8"?>', "<AuditMessages>", "</AuditMessages>"]
                          if fmt == "xml" else [])
    else:
        lines = trail.export(when, "xml" if fmt == "xml" else "jsonl")
    try:
        for line in lines:
            print(line, file=out)
        out.flush()
    except BrokenPipeError:
        # `facesym audit export | head`: the reader has what it wanted. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        if out is sys.stdout:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
