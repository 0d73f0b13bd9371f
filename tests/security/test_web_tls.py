"""The web console behind TLS (a real uvicorn on 127.0.0.1, HTTPS requests verified against the test CA):
security headers on every kind of response, cookie flags, HSTS only on TLS."""

from __future__ import annotations

import re
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from security_pki import Pki, shared_pki

from service.api import start_web
from service.audit import AuditTrail
from service.config import Settings
from service.errors import InvalidParameterError
from service.store.db import open_database
from service.users import add_user, issue_token

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _console(tmp: Path, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    settings = replace(Settings(), data_dir=tmp, **overrides)
    sessions = open_database(settings.effective_database_url)
    add_user(sessions, "admin", PASSWORD, "admin")
    add_user(sessions, "viewer", PASSWORD, "viewer")
    web = start_web(settings, sessions, AuditTrail(sessions), host="127.0.0.1", port=0)
    return web, {"sessions": sessions, "token": issue_token(sessions, "viewer")}


@pytest.fixture
def https(tmp_path: Path, pki: Pki) -> Iterator[tuple[Any, dict[str, Any]]]:
    web, env = _console(tmp_path, web_tls_cert=str(pki.server.cert), web_tls_key=str(pki.server.key))
    env["verify"] = ssl.create_default_context(cafile=str(pki.ca))
    yield web, env
    web.stop()
    env["sessions"].kw["bind"].dispose()


def _headers_ok(r: httpx.Response, tls: bool = True) -> None:
    where = f"{r.request.method} {r.request.url.path} ({r.status_code})"
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, where
    assert r.headers.get("x-frame-options") == "DENY", where
    assert r.headers.get("x-content-type-options") == "nosniff", where
    assert r.headers.get("referrer-policy") == "no-referrer", where
    hsts = r.headers.get("strict-transport-security", "")
    if tls:
        assert re.fullmatch(r"max-age=(\d+)", hsts) and int(hsts.split("=")[1]) >= 15552000, where
    else:
        assert hsts == "", f"{where}: HSTS over plain http"


def _cookie_ok(r: httpx.Response, name: str, secure: bool = True) -> None:
    (line,) = [h for h in r.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    flags = {f.strip().lower() for f in line.split(";")[1:]}
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags, line
    assert ("secure" in flags) is secure, line


def _login(client: httpx.Client, user: str) -> httpx.Response:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    return client.post("/login", data={"username": user, "password": PASSWORD, "csrf_token": token[1],
                                       "next": "/"})


def test_console_over_https_headers_and_cookies(https, monkeypatch: pytest.MonkeyPatch, figures) -> None:
    web, env = https
    assert web.url.startswith("https://127.0.0.1:")
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = httpx.Client(base_url=web.url, verify=env["verify"], timeout=10, follow_redirects=False)
    with client:
        login_page = client.get("/login")  # the login page
        assert login_page.status_code == 200 and login_page.url.scheme == "https"
        _headers_ok(login_page)
        _cookie_ok(login_page, "facesym_login")
        done = _login(client, "viewer")
        assert done.status_code == 303, done.text[:300]
        _headers_ok(done)
        _cookie_ok(done, "facesym_session")
        worklist = client.get("/")  # an authenticated page
        assert worklist.status_code == 200 and "Log in" not in worklist.text
        forbidden = client.get("/audit")  # an error page: a viewer may not read the audit trail
        assert forbidden.status_code == 403 and "text/html" in forbidden.headers["content-type"]
        missing = client.get("/studies/1.2.3.4")  # an error page: no such study
        assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
        not_a_route = client.get("/no/such/route")
        assert not_a_route.status_code == 404
        from service.api import data

        def broken(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError("simulated failure")

        monkeypatch.setattr(data, "system_info", broken)
        crashed = client.get("/system")  # an unhandled exception: Starlette's 500, outside the middleware
        assert crashed.status_code == 500
        for r in (worklist, forbidden, missing, not_a_route, crashed):
            _headers_ok(r)
        checked += 7
    api = httpx.Client(base_url=web.url, verify=env["verify"], timeout=10,
                       headers={"Authorization": f"Bearer {env['token']}"})
    with api:
        studies = api.get("/api/v1/studies")  # an API response
        assert studies.status_code == 200 and studies.headers["content-type"].startswith("application/json")
        refused = api.get("/api/v1/studies", headers={"Authorization": "Bearer fsy_wrong"})  # an API error
        assert refused.status_code == 401
        for r in (studies, refused, api.get("/healthz")):
            _headers_ok(r)
        checked += 3
    figures.record("security", "web over TLS: responses with all security headers", checked)


def test_plain_http_console_has_no_hsts_and_no_secure_cookie(tmp_path: Path) -> None:
    web, env = _console(tmp_path)
    try:
        assert web.url.startswith("http://")
        with httpx.Client(base_url=web.url, timeout=10) as client:
            page = client.get("/login")
            _headers_ok(page, tls=False)
            _cookie_ok(page, "facesym_login", secure=False)
    finally:
        web.stop()
        env["sessions"].kw["bind"].dispose()


def test_https_console_refuses_plain_http_and_is_verified(https, pki: Pki) -> None:
    web, env = https
    with pytest.raises(httpx.HTTPError):
        httpx.get(web.url.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        rogue = ssl.create_default_context(cafile=str(pki.rogue_ca))
        httpx.get(web.url + "/healthz", verify=rogue, timeout=5)


def test_unusable_web_tls_files_are_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    settings = replace(Settings(), data_dir=tmp_path, web_tls_cert=str(pki.server.cert),
                       web_tls_key=str(pki.client.key))
    sessions = open_database(settings.effective_database_url)
    with pytest.raises(InvalidParameterError, match="web_tls"):
        start_web(settings, sessions, AuditTrail(sessions), host="127.0.0.1", port=0)
    with pytest.raises(InvalidParameterError, match="together"):
        replace(Settings(), web_tls_cert=str(pki.server.cert)).validate()
