"""Shared fixtures and helpers for every test layer.

Keep this generic: fixtures for one layer live beside that layer's tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES_DIR = REPO.parent / "shared" / "data" / "faces"


def require_peer(tool: str) -> str:
    """Return the path of the external ``tool``.

    Skips the test when it is missing, or fails it when FACESYM_REQUIRE_PEERS=1 (CI installs the peers).
    """
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"{tool} not installed but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"{tool} not installed")
    return found


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real test faces (see its SOURCES.md); skips when the shared data folder is absent."""
    if not FACES_DIR.is_dir():
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"test faces not found at {FACES_DIR} but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"test faces not found at {FACES_DIR}")
    return FACES_DIR
