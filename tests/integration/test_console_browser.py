"""The web console in a real browser: Debian's chromium driven by Playwright against the real server
(uvicorn in a thread, via ``start_web``) over a seeded database.

Logs in, opens the worklist and a study, sees its key image load, re-sends the results, and finds those
actions in the audit viewer; an anonymous browser is sent to the login page (pages) or refused (API); a
viewer cannot re-run even with the disabled button forced on.

Screenshots of the worklist and a study page are written to the test's temporary folder, and to
docs/screenshots/ when FACESYM_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, require_peer
from sqlalchemy import select

from service.api import start_web
from service.audit import AuditTrail
from service.config import Destination, Settings
from service.store.db import Delivery, DeliveryState, Job, JobState, Patient, Study, open_database
from service.users import add_user

pytestmark = [pytest.mark.peers, pytest.mark.slow]

PASSWORD = "phantom-console-pw"
T0 = datetime(2024, 3, 12, 9, 30, tzinfo=UTC)
PACS = "PACS@127.0.0.1:11113"
FHIR = "fhir:https://ehr.example.org/fhir"
UID = "1.2.826.0.1.3680043.10.543.{}"
POST_OP, PRE_OP = UID.format(2), UID.format(1)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# --- the phantom study -----------------------------------------------------------------------------------


def _task(task: str, left: float, right: float, as_: float, cs: float, gate: float = 1.0) -> dict[str, Any]:
    ai = abs(left - right) / max(left, right)
    weaker = None if gate * ai < 0.1 else ("left" if left < right else "right")
    return {
        "task": task, "frames": [8, 60], "rest_frames": [0, 7], "peak_frames": [30, 42], "unit": "D",
        "left": {"magnitude": left}, "right": {"magnitude": right}, "asymmetry_index": round(ai, 4),
        "activation_gate": gate, "asymmetry_score": as_, "cosine_score": cs, "weaker_side": weaker,
        "insufficient_activation": False, "method": "landmarks", "notes": [],
    }


def _doc(sop: str, hint: str, tasks: list[dict[str, Any]], ok: bool = True) -> dict[str, Any]:
    return {
        "facesym_version": "0.1.0", "sop_instance_uid": sop, "task_hint": hint,
        "input": {"frames": 72, "fps": 24.0, "source": "dicom"},
        "quality": {"ok": ok, "reasons": [] if ok else ["no face in 60% of the frames"],
                    "valid_frames": 72 if ok else 29, "warnings": []},
        "tasks": tasks if ok else [],
    }


def _figures(folder: Path) -> None:
    """A key image and a motion plot like the report's (drawn here: the test needs pictures, not science)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Ellipse, FancyArrowPatch

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6.4), dpi=100)
    fig.patch.set_facecolor("#101418")
    ax.set_facecolor("#1d2329")
    ax.add_patch(Ellipse((0, 0), 2.6, 3.4, color="#c9a48a"))
    for x in (-0.55, 0.55):
        ax.add_patch(Ellipse((x, 0.45), 0.5, 0.22, color="#f4efe9"))
        ax.add_patch(Ellipse((x, 0.45), 0.16, 0.16, color="#3a2b22"))
    ax.plot([-0.75, -0.3], [0.85, 0.9], color="#4b3426", lw=5)
    ax.plot([0.3, 0.75], [0.9, 0.85], color="#4b3426", lw=5)
    mouth_x = np.linspace(-0.55, 0.55, 40)
    ax.plot(mouth_x, -0.75 + 0.22 * (mouth_x / 0.55) ** 2 * (mouth_x > 0) + 0.06 * (mouth_x / 0.55) ** 2,
            color="#8c3b3b", lw=4)
    rest = np.array([[-0.55, -0.72], [-0.3, -0.75], [0.3, -0.75], [0.55, -0.72]])
    peak = rest + np.array([[-0.05, 0.05], [-0.02, 0.02], [0.06, 0.1], [0.14, 0.22]])
    for a, b, c in zip(rest, peak, ["#3f8fd2", "#3f8fd2", "#e07b39", "#e07b39"], strict=True):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, color=c, lw=2.5))
        ax.plot(*a, "o", color="white", ms=4)
    ax.text(-1.55, 1.55, "R", color="#3f8fd2", fontsize=22, weight="bold")
    ax.text(1.4, 1.55, "L", color="#e07b39", fontsize=22, weight="bold")
    ax.set_xlim(-1.7, 1.7)
    ax.set_ylim(-1.9, 1.9)
    ax.axis("off")
    ax.set_title("Smile: AS 78.4 · CS 83.1 · weaker side: right (patient's)", color="white", fontsize=11)
    fig.savefig(folder / "smile_key.png", facecolor=fig.get_facecolor())
    plt.close(fig)

    t = np.arange(72) / 24.0
    ramp = np.clip((t - 0.35) / 0.8, 0, 1) * np.clip((2.8 - t) / 0.5, 0, 1)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.axvspan(0, 7 / 24, color="#9aa5ad", alpha=0.25, label="rest")
    ax.axvspan(30 / 24, 42 / 24, color="#e8b04a", alpha=0.25, label="peak")
    ax.plot(t, 0.21 * ramp, color="#e07b39", lw=2, label="left")
    ax.plot(t, 0.165 * ramp, color="#3f8fd2", lw=2, label="right")
    ax.axhline(0.02, color="#777", ls=":", lw=1)
    ax.axhline(0.12, color="#777", ls="--", lw=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("displacement (D)")
    ax.set_title("Smile: motion, left vs right (patient's)")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "smile_motion.png")
    plt.close(fig)


def seed(settings: Settings) -> None:
    sessions = open_database(settings.effective_database_url)
    with sessions.begin() as s:
        paula = Patient(patient_id="PH-0042", issuer="FACESYM-PHANTOM", name="Phantom^Paula",
                        birth_date="19710304", sex="F")
        omar = Patient(patient_id="PH-0043", issuer="FACESYM-PHANTOM", name="Phantom^Omar", sex="M")
        lena = Patient(patient_id="PH-0044", issuer="FACESYM-PHANTOM", name="Phantom^Lena", sex="F")
        s.add_all([paula, omar, lena])
        s.flush()

        def study(n: int, patient: Patient, date: str, desc: str, days_ago: float) -> Study:
            st = Study(study_uid=UID.format(n), patient_pk=patient.id, study_date=date, study_time="093000",
                       study_description=desc, accession_number=f"A{1000 + n}",
                       last_received_at=T0 - timedelta(days=days_ago))
            s.add(st)
            s.flush()
            return st

        pre = study(1, paula, "20240108", "Facial palsy pre-op", 64)
        post = study(2, paula, "20240312", "Facial palsy post-op", 0)
        o1 = study(3, omar, "20240311", "Facial nerve follow-up", 1)
        l1 = study(4, lena, "20240311", "Bell's palsy baseline", 1.2)
        o2 = study(5, omar, "20240312", "Facial nerve follow-up", 0.01)

        def job(st: Study, state: JobState, docs: list[dict[str, Any]], **kw: Any) -> Job:
            j = Job(study_pk=st.id, engine_version="0.1.0", state=state,
                    result_json=json.dumps(docs) if docs else "", created_at=st.last_received_at,
                    updated_at=st.last_received_at + timedelta(minutes=2),
                    sr_path=f"reports/{st.study_uid}/sr.dcm" if docs else "",
                    sr_sop_instance_uid=f"{st.study_uid}.99" if docs else "",
                    attempts=kw.pop("attempts", 1), **kw)
            s.add(j)
            s.flush()
            return j

        j_pre = job(pre, JobState.DELIVERED, [
            _doc(f"{pre.study_uid}.1.1", "smile", [_task("smile", 0.21, 0.06, 31.2, 40.5)]),
            _doc(f"{pre.study_uid}.1.2", "eye_closure", [_task("eye_closure", 0.62, 0.25, 48.0, 55.7)]),
            _doc(f"{pre.study_uid}.1.3", "brow_raise", [_task("brow_raise", 0.18, 0.07, 44.6, 52.3)]),
        ])
        j_post = job(post, JobState.DELIVERED, [
            _doc(f"{post.study_uid}.1.1", "smile", [_task("smile", 0.21, 0.165, 78.4, 83.1)]),
            _doc(f"{post.study_uid}.1.2", "eye_closure", [_task("eye_closure", 0.61, 0.55, 90.2, 92.4)]),
            _doc(f"{post.study_uid}.1.3", "brow_raise", [_task("brow_raise", 0.17, 0.14, 82.4, 86.0)]),
        ])
        j_o1 = job(o1, JobState.REPORTED, [
            _doc(f"{o1.study_uid}.1.1", "smile", [_task("smile", 0.19, 0.18, 94.7, 96.2)]),
            _doc(f"{o1.study_uid}.1.2", "rest", [], ok=False),
        ])
        job(l1, JobState.FAILED, [], attempts=5, reason="NotAnalysableError: no face found in any frame")
        job(o2, JobState.RUNNING, [])
        delivered = T0 + timedelta(minutes=3)
        for j in (j_pre, j_post):
            s.add(Delivery(job_pk=j.id, destination=PACS, state=DeliveryState.DELIVERED, attempts=1,
                           delivered_at=j.updated_at + timedelta(minutes=1)))
            s.add(Delivery(job_pk=j.id, destination=FHIR, state=DeliveryState.DELIVERED, attempts=1,
                           delivered_at=delivered))
        s.add(Delivery(job_pk=j_o1.id, destination=PACS, state=DeliveryState.PENDING, attempts=2,
                       last_error="association rejected by PACS: calling AE title not recognised"))
        s.add(Delivery(job_pk=j_o1.id, destination=FHIR, state=DeliveryState.DELIVERED, attempts=1,
                       delivered_at=delivered))
    _figures(settings.files_dir / "reports" / POST_OP / "figures")
    add_user(sessions, "olivia", PASSWORD, "operator")
    add_user(sessions, "adam", PASSWORD, "admin")
    add_user(sessions, "vera", PASSWORD, "viewer")


@pytest.fixture
def console(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = replace(Settings(), data_dir=tmp_path / "var",
                       destinations=(Destination.parse(PACS),), fhir_base_url=FHIR.split(":", 1)[1])
    settings.data_dir.mkdir()
    seed(settings)
    sessions = open_database(settings.effective_database_url)
    handle = start_web(settings, sessions, AuditTrail(sessions, source_id="browser-test"), host="127.0.0.1",
                       port=0)
    try:
        yield {"url": handle.url, "sessions": sessions, "settings": settings}
    finally:
        handle.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = require_peer("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _login(browser: Any, url: str, user: str) -> Any:
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.goto(f"{url}/")
    assert "/login" in page.url
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    return page


def _save(page: Any, name: str, tmp: Path, full_page: bool = False) -> None:
    out = tmp / name
    page.screenshot(path=str(out), full_page=full_page)
    if os.environ.get("FACESYM_UPDATE_SCREENSHOTS") == "1":
        dest = REPO / "docs" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest / name)


# --- the tests -------------------------------------------------------------------------------------------


def test_login_worklist_study_resend_and_audit(console: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    url = console["url"]
    page = _login(browser, url, "adam")
    # the worklist: every study, with scores, QC and deliveries
    rows = page.locator("table.worklist tbody tr")
    assert rows.count() == 5
    worklist = page.inner_text("table.worklist")
    assert "post-op" in worklist and "78.4 / 83.1" in worklist and "QC partial" in worklist
    page.set_viewport_size({"width": 1360, "height": 600})
    _save(page, "worklist.png", tmp_path, full_page=True)
    page.set_viewport_size({"width": 1360, "height": 900})
    # search narrows it
    page.fill("input[name=q]", "pre-op")
    page.click("form.filters button")
    assert page.locator("table.worklist tbody tr").count() == 1
    page.goto(f"{url}/")

    # the study: key image loads, comparison with the pre-op study
    page.click(f"a[href='/studies/{POST_OP}']")
    page.wait_for_url(f"{url}/studies/{POST_OP}")
    page.wait_for_load_state("load")
    width = page.eval_on_selector("#key-image", "img => img.complete ? img.naturalWidth : 0")
    assert width > 0
    comparison = page.inner_text("table.compare")
    assert "Facial palsy pre-op" in comparison and "31.2 / 40.5" in comparison and "78.4 / 83.1" in comparison
    assert "+47.2 / +42.6" in comparison  # the improvement since the pre-op study
    _save(page, "study.png", tmp_path, full_page=True)

    # re-send
    page.click("#resend")
    page.wait_for_url(f"{url}/studies/{POST_OP}?msg=resend")
    assert "queued for sending" in page.inner_text(".flash")
    with console["sessions"]() as s:
        job = s.scalar(select(Job).join(Study).where(Study.study_uid == POST_OP))
        assert job is not None and job.state is JobState.REPORTED
        assert {d.state for d in job.deliveries} == {DeliveryState.PENDING}

    # the audit viewer shows the view, the re-send and the login
    page.click("text=Audit records")
    page.wait_for_url(f"{url}/audit?study_uid={POST_OP}")
    assert "Chain intact" in page.inner_text("#verify")
    table = page.inner_text("table.audit")
    assert "re-send to 2 destination(s) requested" in table
    assert table.count("110103") >= 2 and "adam" in table
    page.select_option("select[name=event_id]", "110114")
    page.fill("input[name=study_uid]", "")
    page.fill("input[name=user]", "adam")
    page.click("form.filters button")
    logins = page.inner_text("table.audit")
    assert "User Authentication" in logins and "Login" in logins
    page.goto(f"{url}/audit?event_id=110112&user=adam")
    assert "Query" in page.inner_text("table.audit")
    page.close()


def test_anonymous_is_refused(console: dict[str, Any], browser: Any) -> None:
    url = console["url"]
    page = browser.new_page()
    figure = f"/studies/{POST_OP}/figures/smile_key.png"
    for path in ("/", f"/studies/{POST_OP}", "/audit", "/system", figure):
        page.goto(url + path)
        assert page.url.startswith(f"{url}/login"), path
        assert page.locator("input[name=password]").count() == 1
    for path in ("/api/v1/studies", f"/api/v1/studies/{POST_OP}", "/api/v1/audit", "/api/v1/system",
                 "/api/openapi.json"):
        response = page.goto(url + path)
        assert response is not None and response.status == 401, path
    assert page.goto(f"{url}/healthz").status == 200
    page.close()


def test_viewer_cannot_rerun(console: dict[str, Any], browser: Any) -> None:
    url = console["url"]
    page = _login(browser, url, "vera")
    page.goto(f"{url}/studies/{POST_OP}")
    assert page.is_disabled("#rerun") and page.is_disabled("#resend")
    assert page.locator("a[href='/audit']").count() == 0  # no audit trail for viewers
    page.evaluate("document.getElementById('rerun').disabled = false")
    with page.expect_navigation() as nav:
        page.click("#rerun")
    assert nav.value.status == 403
    assert "needs the operator role" in page.inner_text("main")
    with console["sessions"]() as s:
        job = s.scalar(select(Job).join(Study).where(Study.study_uid == POST_OP))
        assert job is not None and job.state is JobState.DELIVERED
    page.close()
