"""`facesym serve` serves the web console beside the SCP (web_port), and stops it."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port

from service.config import Settings


def test_service_serves_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.jobs.scheduler import FaceSymService

    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    web = free_port()
    settings = replace(Settings(), data_dir=tmp_path / "var", dicom_port=free_port(), web_port=web)
    service = FaceSymService(settings)
    service.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/studies", timeout=10)
        assert refused.value.code == 401
    finally:
        service.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{web}/healthz", timeout=2)
