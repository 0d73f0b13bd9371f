"""A throw-away PostgreSQL server from Debian's packages (``postgresql-15``), for the scale-out tests and
bench/scale.py: initdb in a temporary folder, ``postgres`` on 127.0.0.1 and a free port (its unix socket in
that folder too, never in /var/run), stopped and deleted at the end.

PostgreSQL refuses to run as root: when we are root, the folder is chowned to the ``postgres`` OS user and
initdb, postgres and pg_ctl run as that user through ``runuser``. Durability is off (fsync,
synchronous_commit, full_page_writes): the server is disposable, and the tests measure FaceSym, not disks.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "facesym"


def find_bindir() -> Path | None:
    """The folder holding initdb/postgres/pg_ctl: $FACESYM_PG_BINDIR, else Debian's newest
    /usr/lib/postgresql/<version>/bin (15 preferred: what CI installs), else initdb on the PATH."""
    env = os.environ.get("FACESYM_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None

    def version(path: str) -> tuple[int, int]:
        m = re.search(r"/postgresql/(\d+)/", path)
        n = int(m.group(1)) if m else 0
        return (n == 15, n)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``with PostgresServer(bindir) as pg: url = pg.create_database("x")``."""

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="facesym-pg-"))  # under /tmp: the postgres user can reach it
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _cmd(self, tool: str, *args: str) -> list[str]:
        exe = str(self.bindir / tool)
        return (["runuser", "-u", "postgres", "--", exe] if self._as_postgres else [exe]) + list(args)

    def start(self, timeout: float = 60.0) -> PostgresServer:
        subprocess.run(
            self._cmd("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                      "--no-locale", "--no-sync"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root,
        )
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                self._cmd("postgres", "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                          "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off",
                          "-c", "full_page_writes=off", "-c", "max_connections=300",
                          "-c", "shared_buffers=64MB"),
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("SELECT 1")
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not start: {self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def url(self, database: str) -> str:
        """The FaceSym ``database_url`` of one database on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database,
                             autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql.encode())
            return list(cur.fetchall()) if cur.description else []

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}")
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            subprocess.run(self._cmd("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
