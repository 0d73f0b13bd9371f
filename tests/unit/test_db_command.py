"""`facesym db current|upgrade` on SQLite: a look never creates a database."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.store.schema import head_revision


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FACESYM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FACESYM_DATABASE_URL", raising=False)
    return tmp_path / "data"


def test_current_on_a_missing_database_says_so_and_creates_nothing(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "current"]) == 1
    expected = f"none (no database at {data_dir / 'facesym.db'}; newest is {head_revision()})"
    assert expected in capsys.readouterr().out
    assert not data_dir.exists()


def test_upgrade_then_current_is_head(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A missing database is an error (a wrong data dir must not become an empty database) ...
    assert main(["db", "upgrade"]) == 1
    assert "no database at" in capsys.readouterr().out and not data_dir.exists()
    # ... unless --create asks for one.
    assert main(["db", "upgrade", "--create"]) == 0
    assert "schema created" in capsys.readouterr().out
    assert main(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"{head_revision()} (head)"


def test_the_database_and_data_dir_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """Issue 14: under the usual umask 022 facesym.db was world-readable (0644). Started with 022, `db
    upgrade` makes the data dir 0700 and the database 0600; `private_files` closes an open data dir."""
    import os
    import stat
    import subprocess
    import sys

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "FACESYM_DATABASE_URL"}
    env["FACESYM_DATA_DIR"] = str(data)
    run = subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade", "--create"], env=env,
                         text=True, capture_output=True, timeout=120, preexec_fn=lambda: os.umask(0o022),
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "facesym.db").stat().st_mode) == 0o600
    opened = tmp_path / "open"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    probe = ("import os, sys; from pathlib import Path; from service.cli import private_files; "
             "private_files(Path(sys.argv[1])); open(Path(sys.argv[1]) / 'f', 'w').close()")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", probe, str(opened)], text=True, capture_output=True,
                         timeout=60, preexec_fn=lambda: os.umask(0o022), cwd=root)
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(opened.stat().st_mode) == 0o700
    assert stat.S_IMODE((opened / "f").stat().st_mode) == 0o600
