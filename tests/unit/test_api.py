"""The web console and REST API (service.api) over a seeded SQLite database, through FastAPI's TestClient:
authentication everywhere, roles, CSRF, re-run / re-send changing the database and the audit trail,
API tokens, /metrics in the Prometheus text format, /healthz."""

from __future__ import annotations

import json
import re
import stat
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.api import ServiceHooks, create_app, start_web
from service.api.security import Signer, hash_password, verify_password
from service.audit import AuditTrail
from service.config import Destination, Settings
from service.errors import InvalidParameterError
from service.store.db import (
    AuditRecord,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Patient,
    Study,
    User,
    open_database,
    utcnow,
)
from service.users import add_user, issue_token

with warnings.catch_warnings():  # Starlette >= 1.10 would rather have httpx2 than httpx behind TestClient
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

PRE_UID = "1.2.826.0.1.3680043.10.1.1"
POST_UID = "1.2.826.0.1.3680043.10.1.2"
OTHER_UID = "1.2.826.0.1.3680043.10.1.3"
PACS = "PACS@127.0.0.1:11113"
PASSWORD = "correct horse battery"
# a 1x1 PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a1a3c5"
    "5b0000000049454e44ae426082"
)


def task_doc(task: str, as_: float, cs: float, weaker: str | None) -> dict[str, Any]:
    return {
        "task": task, "frames": [0, 40], "rest_frames": [0, 5], "peak_frames": [20, 30], "unit": "D",
        "left": {"magnitude": 0.05}, "right": {"magnitude": 0.12}, "asymmetry_index": 0.58,
        "activation_gate": 1.0, "asymmetry_score": as_, "cosine_score": cs, "weaker_side": weaker,
        "insufficient_activation": False, "method": "landmarks", "notes": [],
    }


#: A task's "head_motion" JSON object (README, "JSON schema"); the pre-op study's results have none.
HEAD_MOTION = {"roll_deg": 4.2, "yaw_deg": 7.65, "pitch_deg": 2.3, "scale_pct": 3.2, "shift_d": 0.1234,
               "residual_d": 0.0123, "corrected": True}


def result(tasks: list[dict[str, Any]], ok: bool = True) -> str:
    return json.dumps([{
        "facesym_version": "0.1.0", "sop_instance_uid": "1.2.3.4.5", "task_hint": "smile",
        "input": {"frames": 40, "fps": 25.0},
        "quality": {"ok": ok, "reasons": [] if ok else ["no face"], "valid_frames": 40, "warnings": []},
        "tasks": tasks,
    }])


def seed(sessions: sessionmaker[Session], files: Path) -> None:
    """One patient with a pre-op study (delivered) and a post-op study (reported, delivery failing), plus an
    unrelated failed study."""
    now = utcnow()
    with sessions.begin() as s:
        p = Patient(patient_id="PAT001", issuer="HOSP", name="Phantom^Paula", birth_date="19700101", sex="F")
        q = Patient(patient_id="PAT002", issuer="HOSP", name="Other^Otto")
        s.add_all([p, q])
        s.flush()
        pre = Study(study_uid=PRE_UID, patient_pk=p.id, study_date="20240110", study_description="pre-op",
                    last_received_at=now - timedelta(days=60))
        post = Study(study_uid=POST_UID, patient_pk=p.id, study_date="20240310", study_description="post-op",
                     study_time="143005.25", accession_number="ACC42", last_received_at=now)
        other = Study(study_uid=OTHER_UID, patient_pk=q.id, study_date="20240301", study_description="smile",
                      last_received_at=now - timedelta(days=1))
        s.add_all([pre, post, other])
        s.flush()
        j1 = Job(study_pk=pre.id, engine_version="0.1.0", state=JobState.DELIVERED, attempts=1,
                 sr_path=f"reports/{PRE_UID}/sr.dcm",
                 result_json=result([task_doc("smile", 41.0, 55.0, "left")]))
        j2 = Job(study_pk=post.id, engine_version="0.1.0", state=JobState.REPORTED, attempts=2,
                 sr_path=f"reports/{POST_UID}/sr.dcm",
                 result_json=result([
                     {**task_doc("smile", 82.5, 88.0, None), "head_motion": HEAD_MOTION},
                     {**task_doc("eye_closure", 90.0, 93.0, None),
                      "head_motion": {**HEAD_MOTION, "residual_d": 0.0912, "corrected": False}}]))
        j3 = Job(study_pk=other.id, engine_version="0.1.0", state=JobState.FAILED, attempts=5,
                 reason="RuntimeError: no face found")
        s.add_all([j1, j2, j3])
        s.flush()
        s.add_all([
            Delivery(job_pk=j1.id, destination=PACS, state=DeliveryState.DELIVERED, attempts=1,
                     delivered_at=now),
            Delivery(job_pk=j2.id, destination=PACS, state=DeliveryState.FAILED, attempts=3,
                     last_error="association rejected"),
        ])
    fig = files / "reports" / POST_UID / "figures"
    fig.mkdir(parents=True)
    (fig / "smile_key.png").write_bytes(PNG)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    settings = replace(Settings(), data_dir=tmp_path, destinations=(Destination.parse(PACS),))
    sessions = open_database(f"sqlite:///{tmp_path / 'facesym.db'}")
    audit = AuditTrail(sessions, source_id="test")
    seed(sessions, settings.files_dir)
    for role in ("viewer", "operator", "admin"):
        add_user(sessions, role, PASSWORD, role)
    woken: list[int] = []
    app = create_app(settings, sessions, audit, ServiceHooks(on_resend=woken.append, on_rerun=woken.append))
    return {"settings": settings, "sessions": sessions, "audit": audit, "app": app, "woken": woken}


def client(env: dict[str, Any]) -> TestClient:
    return TestClient(env["app"], follow_redirects=False)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]*)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(env: dict[str, Any], user: str, password: str = PASSWORD) -> TestClient:
    c = client(env)
    token = csrf_of(c.get("/login").text)
    r = c.post("/login", data={"username": user, "password": password, "csrf_token": token, "next": "/"})
    assert r.status_code == 303, r.text
    return c


def records(env: dict[str, Any], event_id: str | None = None) -> list[AuditRecord]:
    with env["sessions"]() as s:
        stmt = select(AuditRecord).order_by(AuditRecord.seq)
        if event_id:
            stmt = stmt.where(AuditRecord.event_id == event_id)
        return list(s.scalars(stmt))


def job_of(env: dict[str, Any], uid: str) -> Job:
    with env["sessions"]() as s:
        job = s.scalar(select(Job).join(Study, Job.study_pk == Study.id).where(Study.study_uid == uid))
        assert job is not None
        _ = job.deliveries
        return job


# --- authentication ------------------------------------------------------------------------------------

PUBLIC = {"/login", "/healthz", "/metrics"}


def test_every_route_refuses_anonymous_requests(env: dict[str, Any]) -> None:
    c = client(env)
    checked = 0
    for route in env["app"].routes:
        if not isinstance(route, APIRoute) or route.path in PUBLIC:
            continue
        path = route.path.replace("{study_uid}", POST_UID).replace("{name}", "smile_key.png")
        for method in route.methods or ():
            r = c.request(method, path)
            if path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
            else:
                assert r.status_code == 303, (method, path)
                assert r.headers["location"].startswith("/login?next="), (method, path)
            checked += 1
    assert checked >= 14
    assert job_of(env, POST_UID).state is JobState.REPORTED  # nothing changed
    for path in ("/healthz", "/metrics", "/login", "/static/style.css"):
        assert c.get(path).status_code == 200, path


def test_login_sets_a_signed_strict_cookie_and_is_audited(env: dict[str, Any]) -> None:
    c = client(env)
    page = c.get("/login?next=/system")
    r = c.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": csrf_of(page.text),
                               "next": "/system"})
    assert r.status_code == 303 and r.headers["location"] == "/system"
    cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("facesym_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert c.get("/system").status_code == 200
    ok = [x for x in records(env, "110114") if x.outcome == 0]
    assert ok and 'UserID="viewer"' in ok[-1].xml and "110122" in ok[-1].xml

    # a tampered cookie is no session
    value = cookie.split(";")[0].split("=", 1)[1]
    forged = TestClient(env["app"], follow_redirects=False, cookies={"facesym_session": "x" + value})
    assert forged.get("/").status_code == 303


def test_failed_login_is_audited_with_a_security_alert(env: dict[str, Any]) -> None:
    c = client(env)
    r = c.post("/login", data={"username": "viewer", "password": "wrong password",
                               "csrf_token": csrf_of(c.get("/login").text)})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert "facesym_session" not in r.cookies
    failed = [x for x in records(env, "110114") if x.outcome != 0]
    assert failed and 'UserID="viewer"' in failed[-1].xml
    assert any("console login failed" in x.xml for x in records(env, "110113"))
    # an unknown user reads the same
    r = c.post("/login", data={"username": "nobody", "password": PASSWORD,
                               "csrf_token": csrf_of(c.get("/login").text)})
    assert r.status_code == 401


def test_login_is_throttled_after_repeated_failures(env: dict[str, Any]) -> None:
    c = client(env)
    for _ in range(5):
        c.post("/login", data={"username": "admin", "password": "nope nope",
                               "csrf_token": csrf_of(c.get("/login").text)})
    r = c.post("/login", data={"username": "admin", "password": PASSWORD,
                               "csrf_token": csrf_of(c.get("/login").text)})
    assert r.status_code == 429


def test_logout_ends_the_session(env: dict[str, Any]) -> None:
    c = login(env, "operator")
    old = c.cookies.get("facesym_session")
    r = c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert any("110123" in x.xml for x in records(env, "110114"))
    replay = TestClient(env["app"], follow_redirects=False, cookies={"facesym_session": old or ""})
    assert replay.get("/").status_code == 303  # the old cookie no longer works


# --- CSRF and roles ------------------------------------------------------------------------------------


def test_post_without_the_csrf_token_is_rejected(env: dict[str, Any]) -> None:
    c = login(env, "operator")
    for token in ("", "forged"):
        r = c.post(f"/studies/{POST_UID}/rerun", data={"csrf_token": token})
        assert r.status_code == 403
    assert job_of(env, POST_UID).state is JobState.REPORTED
    # the login form needs its own token too
    fresh = client(env)
    r = fresh.post("/login", data={"username": "operator", "password": PASSWORD, "csrf_token": "x"})
    assert r.status_code == 403
    # the API with the session cookie needs X-CSRF-Token on POST
    assert c.post(f"/api/v1/studies/{POST_UID}/rerun").status_code == 403
    assert job_of(env, POST_UID).state is JobState.REPORTED


def test_viewer_cannot_rerun_or_resend(env: dict[str, Any]) -> None:
    c = login(env, "viewer")
    page = c.get(f"/studies/{POST_UID}")
    assert page.status_code == 200 and 'id="rerun" disabled' in page.text
    token = csrf_of(page.text)
    for action in ("rerun", "resend"):
        r = c.post(f"/studies/{POST_UID}/{action}", data={"csrf_token": token})
        assert r.status_code == 403 and "operator" in r.text
    job = job_of(env, POST_UID)
    assert job.state is JobState.REPORTED and job.attempts == 2
    assert job.deliveries[0].state is DeliveryState.FAILED
    alerts = [x for x in records(env, "110113") if "110132" in x.xml]
    assert len(alerts) == 2 and 'UserID="viewer"' in alerts[0].xml
    # nor through the API with a token
    token = issue_token(env["sessions"], "viewer")
    api = TestClient(env["app"], headers={"Authorization": f"Bearer {token}"})
    assert api.post(f"/api/v1/studies/{POST_UID}/rerun").status_code == 403
    assert job_of(env, POST_UID).state is JobState.REPORTED
    # and the audit trail is for admins
    assert c.get("/audit").status_code == 403
    assert api.get("/api/v1/audit").status_code == 403


def test_rerun_queues_the_job_again_and_is_audited(env: dict[str, Any]) -> None:
    c = login(env, "operator")
    token = csrf_of(c.get(f"/studies/{OTHER_UID}").text)
    r = c.post(f"/studies/{OTHER_UID}/rerun", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].endswith("?msg=rerun")
    job = job_of(env, OTHER_UID)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.reason == ""
    rec = [x for x in records(env, "110103") if "re-run analysis requested" in x.xml]
    assert len(rec) == 1 and 'EventActionCode="U"' in rec[0].xml and 'UserID="operator"' in rec[0].xml
    assert OTHER_UID in rec[0].xml and "PAT002" in rec[0].xml  # the patient is resolved from the study
    assert env["woken"] == [job.id]
    assert "Analysis queued again" in c.get(r.headers["location"]).text


def test_resend_sets_deliveries_pending_and_is_audited(env: dict[str, Any]) -> None:
    c = login(env, "operator")
    token = csrf_of(c.get(f"/studies/{POST_UID}").text)
    r = c.post(f"/studies/{POST_UID}/resend", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].endswith("?msg=resend")
    job = job_of(env, POST_UID)
    assert job.state is JobState.REPORTED
    assert [(d.state, d.attempts, d.last_error) for d in job.deliveries] == [(DeliveryState.PENDING, 0, "")]
    assert any("re-send to 1 destination(s) requested" in x.xml for x in records(env, "110103"))
    # a study without a report cannot be re-sent: 409-like, shown on the page, audited as a failure
    r = c.post(f"/studies/{OTHER_UID}/resend", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].endswith("?error=no-report")
    assert "the study has no report to send yet" in c.get(r.headers["location"]).text
    assert any(x.outcome == 4 and "resend refused" in x.xml for x in records(env, "110103"))
    # Text in the URL is never shown: a crafted link cannot put words on a FaceSym page.
    for page in (f"/studies/{OTHER_UID}?error=Call+0800-SCAM+now", "/login?error=Call+0800-SCAM+now"):
        assert "0800-SCAM" not in c.get(page).text


# --- pages ---------------------------------------------------------------------------------------------


def test_worklist_filters_and_audits_queries(env: dict[str, Any]) -> None:
    c = login(env, "viewer")
    page = c.get("/").text
    for uid in (PRE_UID, POST_UID, OTHER_UID):
        assert uid in page
    assert "QC pass" in page and "82.5" in page and "FAILED" in page
    only_failed = c.get("/?state=FAILED").text
    assert OTHER_UID in only_failed and POST_UID not in only_failed
    searched = c.get("/?q=post-op").text
    assert POST_UID in searched and PRE_UID not in searched
    assert PRE_UID in c.get(f"/?q={PRE_UID[-5:]}").text
    queries = records(env, "110112")
    assert len(queries) == 4 and all('UserID="viewer"' in q.xml for q in queries)
    # Dates carry the time where the study has one (several studies of a patient can share a day).
    assert "2024-03-10 14:30" in page and "2024-01-10" in page and "2024-01-10 " not in page


@pytest.mark.parametrize(("date", "time", "shown"), [
    ("20240310", "143005.25", "2024-03-10 14:30"), ("20240310", "0905", "2024-03-10 09:05"),
    ("20240310", "", "2024-03-10"), ("20240310", "9999", "2024-03-10"), ("", "1430", ""),
])
def test_study_dates_show_the_time_when_there_is_one(date: str, time: str, shown: str) -> None:
    from service.api.data import fmt_when

    assert fmt_when(date, time) == shown


def test_study_page_shows_scores_comparison_figures_and_is_audited(env: dict[str, Any]) -> None:
    c = login(env, "viewer")
    page = c.get(f"/studies/{POST_UID}").text
    assert "post-op" in page and "82.5" in page and "eye closure" in page
    assert "Comparison with earlier studies" in page and "pre-op" in page and "41.0 / 55.0" in page
    assert f"/studies/{POST_UID}/figures/smile_key.png" in page and 'id="key-image"' in page
    assert "association rejected" in page
    # per-task head motion (quality), with a warning where it could not be removed
    assert "head motion: roll 4.2°, yaw 7.7°, pitch 2.3°, scale 3.2 %, shift 0.123 D; residual 0.012 D" in (
        page)
    assert "head motion NOT corrected (residual 0.091 D above the limit)" in page
    # The page leads with the finding and the scores; the figures come after them.
    finding = page.index('id="finding"')
    assert finding < page.index("<h2>Scores</h2>") < page.index("<h2>Figures</h2>")
    sentence = "Smile symmetric (AI 0.58, AS 82); eye closure symmetric (AI 0.58, AS 90)."
    assert f"Finding:</b> {sentence}</p>" in page
    access = [x for x in records(env, "110103") if POST_UID in x.xml]
    assert len(access) == 1 and 'EventActionCode="R"' in access[0].xml and "PAT001" in access[0].xml
    fig = c.get(f"/studies/{POST_UID}/figures/smile_key.png")
    assert fig.status_code == 200 and fig.headers["content-type"] == "image/png" and fig.content == PNG
    # no figures: a placeholder; the earlier study has no comparison of its own nor head motion (old result)
    pre = c.get(f"/studies/{PRE_UID}").text
    assert "No figures for this study yet" in pre and "Comparison with earlier studies" not in pre
    assert "head motion:" not in pre
    # nothing outside the figures folder
    for bad in ("..%2F..%2Ffacesym.db", "sr.dcm", "x.png"):
        assert c.get(f"/studies/{POST_UID}/figures/{bad}").status_code == 404
    assert c.get("/studies/9.9.9").status_code == 404


def test_audit_viewer_filters_and_shows_verify_status(env: dict[str, Any]) -> None:
    c = login(env, "admin")
    c.get(f"/studies/{POST_UID}")
    page = c.get(f"/audit?study_uid={POST_UID}&event_id=110103&user=admin").text
    assert "Chain intact" in page
    rows = re.findall(r'<tr class="ev-(\d+)">', page)
    assert rows == ["110103"]
    assert 'UserID' not in page and "admin" in page
    logins = c.get("/audit?event_id=110114").text
    assert re.findall(r'<tr class="ev-(\d+)">', logins) == ["110114"]


def test_system_page(env: dict[str, Any]) -> None:
    c = login(env, "viewer")
    page = c.get("/system").text
    assert "RuntimeError: no face found" in page  # failed job with its reason
    assert "association rejected" in page and PACS in page  # destination health
    assert "Versions" in page and "engine" in page and "Used by FaceSym" in page


# --- the API -------------------------------------------------------------------------------------------


def test_api_token_auth(env: dict[str, Any]) -> None:
    token = issue_token(env["sessions"], "operator")
    with env["sessions"]() as s:
        user = s.scalar(select(User).where(User.username == "operator"))
        assert user is not None and user.token_hash and token not in user.token_hash  # only a hash is kept
    api = TestClient(env["app"], headers={"Authorization": f"Bearer {token}"})
    studies = api.get("/api/v1/studies", params={"state": "REPORTED"}).json()
    assert studies["total"] == 1 and studies["studies"][0]["study_uid"] == POST_UID
    assert studies["studies"][0]["tasks"]["smile"]["asymmetry_score"] == 82.5
    assert studies["studies"][0]["deliveries"][0]["state"] == "FAILED"
    detail = api.get(f"/api/v1/studies/{POST_UID}").json()
    assert detail["earlier_studies"][0]["study_uid"] == PRE_UID
    assert detail["earlier_studies"][0]["tasks"]["smile"]["weaker_side"] == "left"
    assert detail["figure_urls"] == [f"/studies/{POST_UID}/figures/smile_key.png"]
    assert api.get("/api/v1/studies/1.2.3").status_code == 404
    assert api.post(f"/api/v1/studies/{POST_UID}/resend").json()["deliveries"] == 1
    assert job_of(env, POST_UID).deliveries[0].state is DeliveryState.PENDING
    assert api.post(f"/api/v1/studies/{OTHER_UID}/rerun").json()["action"] == "rerun"
    assert job_of(env, OTHER_UID).state is JobState.QUEUED
    assert api.get("/api/v1/system").json()["queue"]["FAILED"] == 0
    assert "/api/v1/studies" in api.get("/api/openapi.json").json()["paths"]
    # the same token, wrong: refused and audited
    bad = TestClient(env["app"], headers={"Authorization": f"Bearer {token}x"})
    assert bad.get("/api/v1/studies").status_code == 401
    assert any(x.outcome != 0 and "unknown token" in x.xml for x in records(env, "110114"))
    # a new token replaces the old one
    issue_token(env["sessions"], "operator")
    assert api.get("/api/v1/studies").status_code == 401


def test_api_audit_for_admins(env: dict[str, Any]) -> None:
    api = TestClient(env["app"], headers={"Authorization": f"Bearer {issue_token(env['sessions'], 'admin')}"})
    api.get(f"/api/v1/studies/{PRE_UID}")
    body = api.get("/api/v1/audit", params={"study_uid": PRE_UID}).json()
    assert body["verify"]["ok"] is True
    assert [r["event_id"] for r in body["records"]] == ["110103"]
    assert body["records"][0]["users"][0].startswith("admin")


def test_api_with_the_session_cookie_needs_the_csrf_header_for_posts(env: dict[str, Any]) -> None:
    c = login(env, "operator")
    assert c.get("/api/v1/studies").status_code == 200
    token = csrf_of(c.get("/").text)
    r = c.post(f"/api/v1/studies/{OTHER_UID}/rerun", headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and job_of(env, OTHER_UID).state is JobState.QUEUED


# --- monitoring ----------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                     r"(-?[0-9.eE+-]+|\+Inf|NaN)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """A strict reading of the text exposition format 0.0.4: HELP/TYPE lines, then samples."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            typed[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"{name} has no TYPE"
        samples[line.rsplit(" ", 1)[0]] = float(m.group(4))
    return samples


def test_metrics_text_format(env: dict[str, Any]) -> None:
    from service.audit import analysis_event

    audit: AuditTrail = env["audit"]
    t0 = utcnow()
    audit.append(analysis_event("begun", 7, POST_UID, time=t0))
    audit.append(analysis_event("finished", 7, POST_UID, sr_uid="1.2.3", time=t0 + timedelta(seconds=12.5)))
    r = client(env).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(r.text)
    assert m['facesym_jobs{state="REPORTED"}'] == 1 and m['facesym_jobs{state="FAILED"}'] == 1
    assert m['facesym_deliveries{state="FAILED"}'] == 1 and m['facesym_deliveries{state="DELIVERED"}'] == 1
    assert m["facesym_job_retries"] == 1 + 4  # attempts beyond the first: 2 → 1, 5 → 4
    assert m["facesym_delivery_retries"] == 2
    assert m["facesym_analysis_seconds_count"] == 1 and m["facesym_analysis_seconds_sum"] == 12.5
    assert m['facesym_analysis_seconds_bucket{le="10"}'] == 0
    assert m['facesym_analysis_seconds_bucket{le="20"}'] == 1
    assert m['facesym_analysis_seconds_bucket{le="+Inf"}'] == 1
    assert POST_UID not in r.text and "PAT001" not in r.text  # no identifiers
    # incremental: a second scrape does not count the same analysis twice
    assert parse_prometheus(client(env).get("/metrics").text)["facesym_analysis_seconds_count"] == 1


def test_healthz(env: dict[str, Any]) -> None:
    r = client(env).get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# --- pieces --------------------------------------------------------------------------------------------


def test_passwords_are_salted_scrypt() -> None:
    a, b = hash_password("secret pass"), hash_password("secret pass")
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert verify_password("secret pass", a) and not verify_password("secret pas", a)
    assert not verify_password("x", "garbage") and not verify_password("x", "scrypt$1$2$3$@@$@@")


def test_add_user_validates(env: dict[str, Any]) -> None:
    s = env["sessions"]
    with pytest.raises(InvalidParameterError):
        add_user(s, "viewer", PASSWORD, "viewer")  # exists
    with pytest.raises(InvalidParameterError):
        add_user(s, "eve", PASSWORD, "root")
    with pytest.raises(InvalidParameterError):
        add_user(s, "eve", "short", "viewer")
    with pytest.raises(InvalidParameterError):
        add_user(s, "bad name", PASSWORD, "viewer")
    # What a guesser tries first (issue 14: "password" was accepted for an admin), each with its rule.
    for weak, rule in (("password", "at least 10"), ("Password123!", "most common"),
                       ("Welcome2024", "common"), ("12345678901", "too simple"),
                       ("aaaaaaaaaaaa", "too simple"), ("eve-is-great", "username")):
        with pytest.raises(InvalidParameterError, match=rule):
            add_user(s, "eve", weak, "admin")
    with pytest.raises(InvalidParameterError):
        issue_token(s, "nobody")
    add_user(s, "viewer", "another password", "operator", update=True)
    login(env, "viewer", "another password")
    assert any("user viewer updated" in x.xml for x in records(env, "110113"))


def test_session_secret_file_is_private_and_kept(env: dict[str, Any]) -> None:
    path = env["settings"].data_dir / "web_secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_text()
    create_app(env["settings"], env["sessions"], env["audit"])
    assert path.read_text() == before


def test_expired_session_is_refused() -> None:
    signer = Signer(b"k" * 32, max_age_seconds=-1)
    assert signer.read_session(signer.new_session("a", 0)) is None
    assert Signer(b"k" * 32, 60).read_session(Signer(b"j" * 32, 60).new_session("a", 0)) is None


def test_start_web_serves_and_stops(env: dict[str, Any]) -> None:
    handle = start_web(env["settings"], env["sessions"], env["audit"], port=0)
    try:
        assert handle.port > 0 and handle.host == "127.0.0.1"
        assert httpx.get(f"{handle.url}/healthz", timeout=5).json()["status"] == "ok"
        assert httpx.get(f"{handle.url}/api/v1/studies", timeout=5).status_code == 401
    finally:
        handle.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{handle.url}/healthz", timeout=2)


def test_pages_escape_what_came_from_dicom(env: dict[str, Any]) -> None:
    with env["sessions"].begin() as s:
        study = s.scalar(select(Study).where(Study.study_uid == OTHER_UID))
        assert study is not None
        study.study_description = '<img src=x onerror="alert(1)">'
    c = login(env, "viewer")
    for page in (c.get("/").text, c.get(f"/studies/{OTHER_UID}").text):
        assert "<img src=x" not in page and "&lt;img src=x" in page
    r = c.get("/")
    assert "script-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"


def test_figure_captions_say_what_each_figure_shows() -> None:
    from service.api.data import figure_caption

    assert figure_caption("0-smile-key.png") == "Smile — Key image: rest → peak displacement per side"
    assert figure_caption("0-smile-flow.png") == "Smile — Optical-flow overlay by region"
    motion = figure_caption("1-eye_closure-motion.png")
    assert motion == "Eye closure — Motion plot: per-side signal over time"


def test_huge_integer_parameters_are_422_not_500(env: dict[str, Any]) -> None:
    """Integers beyond 64 bits used to reach SQLite ("Python int too large") and answer 500."""
    api = TestClient(env["app"], headers={"Authorization": f"Bearer {issue_token(env['sessions'], 'admin')}"})
    huge = str(10**30)
    for url, params in (("/api/v1/studies", {"offset": huge}), ("/api/v1/audit", {"before": huge}),
                        ("/api/v1/studies", {"offset": "-1"})):
        assert api.get(url, params=params).status_code == 422, (url, params)
    assert api.get("/api/v1/studies", params={"offset": str(2**62)}).json()["studies"] == []
    c = login(env, "admin")
    assert c.get("/audit", params={"before": huge}).status_code == 422


def test_unknown_tokens_are_throttled_and_cannot_flood_the_audit_trail(env: dict[str, Any]) -> None:
    """Issue 14: every unknown bearer token wrote two audit rows with no limit (400 rows in 6.8 s). Now 20
    per address a minute are refused (401) and audited; the rest get 429 and no rows, except one alert
    when the limit is reached; a valid token from the same address still works."""
    good = issue_token(env["sessions"], "operator")
    before = len(records(env, "110114")) + len(records(env, "110113"))
    bad = TestClient(env["app"], headers={"Authorization": "Bearer not-a-token"})
    codes = [bad.get("/api/v1/studies").status_code for _ in range(60)]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
    after = len(records(env, "110114")) + len(records(env, "110113"))
    assert after - before <= 2 * 20 + 1
    ok = TestClient(env["app"], headers={"Authorization": f"Bearer {good}"})
    assert ok.get("/api/v1/studies").status_code == 200


def test_brute_force_neither_locks_out_the_real_user_nor_floods_the_audit_trail(env: dict[str, Any]) -> None:
    """Issue 14, finding 5: five wrong passwords used to lock the admin out for 5 minutes and every failure
    wrote two audit rows. Now an attacker's guesses are slowed (429 + Retry-After, the password not even
    checked), the admin's own browser (device cookie from an earlier login) still logs in at once with
    the right password, and the attack leaves a handful of audit rows plus one aggregated count."""
    web = env["app"].state.web
    admin = login(env, "admin")  # the admin's browser: it holds the device cookie from now on
    assert admin.cookies.get("facesym_device")
    before = len(records(env))
    attacker = client(env)
    codes = []
    for k in range(60):
        r = attacker.post("/login", data={"username": "admin", "password": f"guess {k}",
                                          "csrf_token": csrf_of(attacker.get("/login").text)})
        codes.append(r.status_code)
    assert codes[:3] == [401, 401, 401] and codes.count(429) >= 50, codes
    refused = attacker.post("/login", data={"username": "admin", "password": "guess x",
                                            "csrf_token": csrf_of(attacker.get("/login").text)})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    # The real admin, from the known browser, with the right password: in, during the attack.
    r = admin.post("/login", data={"username": "admin", "password": PASSWORD,
                                   "csrf_token": csrf_of(admin.get("/login").text), "next": "/"})
    assert r.status_code == 303, r.text
    # The right password from an unknown client waits like a guess (it could be the attacker).
    stranger = client(env)
    r = stranger.post("/login", data={"username": "admin", "password": PASSWORD,
                                      "csrf_token": csrf_of(stranger.get("/login").text)})
    assert r.status_code == 429
    failures = [x for x in records(env)[before:] if x.event_id in ("110114", "110113") and x.outcome != 0]
    assert len(failures) <= 2, [x.xml[:200] for x in failures]  # the first failure and its alert
    from service.api.app import flush_login_summaries

    flush_login_summaries(web, everything=True)
    summary = [x for x in records(env)[before:] if "(aggregated)" in x.xml]
    assert len(summary) == 1 and "failed 61 more time(s)" in summary[0].xml, [x.xml for x in summary]


def test_login_delays_grow_and_are_capped() -> None:
    from service.api.login_guard import FREE_FAILURES, MAX_DELAY_S, LoginGuard

    now = [1000.0]
    guard = LoginGuard(clock=lambda: now[0])
    waits = []
    for _ in range(FREE_FAILURES + 8):
        waits.append(guard.wait_seconds("admin", "10.0.0.9", device=False))
        guard.failed("admin", "10.0.0.9", device=False)
    assert waits[: FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert waits[FREE_FAILURES:] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_DELAY_S, MAX_DELAY_S]
    now[0] += MAX_DELAY_S  # waited: one more try
    assert guard.wait_seconds("admin", "10.0.0.9", device=False) == 0.0
    assert guard.wait_seconds("admin", "10.0.0.9", device=True) == 0.0  # the user's own browser
    assert guard.wait_seconds("other", "10.0.0.9", device=False) == 0.0  # another user, same address
