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
    assert main(["db", "upgrade"]) == 0
    assert "schema created" in capsys.readouterr().out
    assert main(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"{head_revision()} (head)"
