"""Crash safety: 300+ instances over DCMTK storescu into `facesym serve` while it is SIGKILLed at random
moments (aimed at receiving, analysing and delivering) and restarted; the "modality" re-sends whatever did
not get a success status, as a real one does. Then: nothing acknowledged is lost, every study is analysed
once and its report (SR, key images, PDF) reaches the PACS (DCMTK storescp) under one set of UIDs, and the
audit trail verifies.

The random seed is printed and recorded in the figures; FACESYM_CRASH_SEED=<seed> replays its choices
(the timing of a 2-core machine still varies).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, require_peer, require_private_netns
from reliability_kit import (
    ROOT,
    Serve,
    StoreSCP,
    StudyFiles,
    Template,
    answers,
    clone_study,
    is_success,
    run_storescu,
    templates_once,
    wait_for,
)

from service.store.ingest import dataset_sha256

pytestmark = [pytest.mark.slow, pytest.mark.peers]

N_STUDIES = 30  # x 10 instances (1 video, 9 photos) = 300
MAX_KILLS = 15
BACKLOG = 3  # the modality sends the next study while at most this many wait for their analysis
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
PHASES = ("receive", "analysis", "delivery")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[StudyFiles]:
    require_peer("storescu"), require_peer("storescp")  # skip before making 300 files for nothing
    require_private_netns("DCMTK storescp (the PACS)")
    templates = templates_once(tmp_path_factory)
    out = tmp_path_factory.mktemp("crash-studies")
    return [clone_study(templates, out, n) for n in range(N_STUDIES)]


class Modality(threading.Thread):
    """Sends study after study with storescu; files without a success status are sent again (after
    waiting for FaceSym to answer C-ECHO), like a modality's retry queue."""

    def __init__(self, storescu: str, serve: Serve, studies: list[StudyFiles], rng: random.Random) -> None:
        super().__init__(name="modality", daemon=True)
        self.storescu, self.serve, self.studies, self.rng = storescu, serve, studies, rng
        self.sending = False
        self.done = threading.Event()
        self.succeeded: set[Path] = set()
        self.attempts = 0
        self.runs = 0
        self.resent = 0  # files sent again because their C-STORE got no success
        self.refusals: list[tuple[str, str]] = []  # (file, status) answered with a failure status
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for study in self.studies:
                todo: list[Template] = list(study.files)
                while todo:
                    self.sending = True
                    try:
                        status, _ = run_storescu(self.storescu, self.serve.port, todo)
                    finally:
                        self.sending = False
                    self.runs += 1
                    self.attempts += sum(1 for text in status.values() if text)
                    for path, text in status.items():
                        if is_success(text):
                            self.succeeded.add(path)
                        elif text:
                            self.refusals.append((path.name, text))
                    todo = [t for t in todo if t.path not in self.succeeded]
                    if todo:  # FaceSym is down (or went down): wait for it, then resend
                        self.resent += len(todo)
                        wait_for(lambda: answers(self.serve.port), 180,
                                 "FaceSym to come back", tick=0.1)
                # Pace the exams so that receiving overlaps analysing and delivering all along.
                time.sleep(self.rng.uniform(0.0, 0.4))
                wait_for(lambda: _backlog(self.serve) < BACKLOG, 300, "the analysis backlog to shrink")
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc
        finally:
            self.done.set()


def _counts(serve: Serve) -> dict[str, int]:
    """What is going on right now, from the database."""
    out = {"instances": 0, "running": 0, "reported": 0, "delivered": 0, "jobs": 0}
    rows = serve.query("select state, count(*) from job group by state")
    for state, n in rows:
        out["jobs"] += n
        out[state.lower()] = out.get(state.lower(), 0) + n
    out["instances"] = (serve.query("select count(*) from instance") or [(0,)])[0][0]
    return out


def _backlog(serve: Serve) -> int:
    return int((serve.query("select count(*) from job where state in ('RECEIVED', 'QUEUED', 'RUNNING')")
                or [(0,)])[0][0])


def _reported_studies(serve: Serve) -> set[str]:
    return {uid for (uid,) in serve.query(
        "select s.study_uid from job j join study s on s.id = j.study_pk where j.state = 'REPORTED'")}


def _aim(phase: str, serve: Serve, modality: Modality, pacs: StoreSCP, rng: random.Random) -> bool:
    """Wait for a moment in ``phase`` (plus random timing); False when it did not come in time."""
    deadline = time.monotonic() + 20
    if phase == "receive":
        if modality.done.is_set():
            return False
        extra = rng.randint(0, 4)
        base = None
        while time.monotonic() < deadline and not modality.done.is_set():
            if modality.sending:
                n = _counts(serve)["instances"]
                base = n if base is None else base
                if n >= base + extra:
                    return True
            else:
                base = None
            time.sleep(0.01)
        return False
    if phase == "analysis":
        while time.monotonic() < deadline:
            if _counts(serve)["running"]:
                time.sleep(rng.uniform(0.0, 2.0))  # anywhere in the analysis: decode, engine, SR, figures
                return True
            time.sleep(0.05)
        return False
    if phase == "delivery":
        seen = len(list(pacs.out.iterdir()))
        while time.monotonic() < deadline:
            now = len(list(pacs.out.iterdir()))
            if now > seen:  # an association with the PACS is delivering a report right now
                time.sleep(rng.uniform(0.0, 0.05))
                return True
            time.sleep(0.005)
        return False
    time.sleep(rng.uniform(0.0, 3.0))  # "random"
    return True


def _phase_now(aimed: str, serve: Serve, modality: Modality) -> str:
    """The phase a kill now interrupts: the aimed one when it is still going on, else what is."""
    c = _counts(serve)
    if aimed == "receive" and modality.sending or aimed == "analysis" and c["running"] or aimed == "delivery":
        return aimed
    if modality.sending:
        return "receive"
    if c["running"]:
        return "analysis"
    if c["reported"]:
        return "delivery"
    return "idle"


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    corpus: list[StudyFiles], tmp_path: Path, figures: object
) -> None:
    storescu, storescp = require_peer("storescu"), require_peer("storescp")
    require_private_netns("DCMTK storescp (the PACS)")
    from service.engine import ENGINE_VERSION

    seed = int(os.environ.get("FACESYM_CRASH_SEED") or secrets.randbits(32))
    print(f"\ncrash test seed: FACESYM_CRASH_SEED={seed}", file=sys.stderr)
    figures.record("crash", "seed (replay: FACESYM_CRASH_SEED)", seed)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    started = time.monotonic()

    pacs = StoreSCP(storescp, tmp_path / "pacs", free_port())
    pacs.start()
    serve = Serve(tmp_path / "var", free_port(), tmp_path / "serve.log",
                  FACESYM_DESTINATIONS=pacs.destination, FACESYM_QUIET_SECONDS="3",
                  FACESYM_RETRY_BASE_SECONDS="0.5", FACESYM_RETRY_MAX_SECONDS="2", FACESYM_WORKERS="2")
    modality = Modality(storescu, serve, corpus, random.Random(rng.randrange(2**32)))
    kills: Counter[str] = Counter()
    aimed_missed = 0
    # Studies whose report may legitimately reach the PACS twice under the same UIDs: a kill came while
    # their delivery was pending or in flight (sent, but not yet recorded as delivered).
    interrupted_delivery: set[str] = set()
    try:
        serve.start()
        modality.start()
        plan: list[str] = []
        while sum(kills.values()) < MAX_KILLS:
            c = _counts(serve)
            if modality.done.is_set() and c["jobs"] == N_STUDIES and c["delivered"] == N_STUDIES:
                break
            if not plan:
                plan = [*PHASES, "random"]
                rng.shuffle(plan)
                plan.sort(key=lambda p: p in PHASES and kills[p] == 0)  # not hit yet: popped first
            phase = plan.pop()
            time.sleep(rng.uniform(0.2, 1.5))
            if not _aim(phase, serve, modality, pacs, rng):
                aimed_missed += 1
                continue
            seen = _phase_now(phase, serve, modality)
            serve.kill()
            kills[seen] += 1
            interrupted_delivery |= _reported_studies(serve)  # as the kill left them
            time.sleep(rng.uniform(0.0, 1.0))  # down for a moment
            serve.start()
        assert modality.error is None, modality.error
        # No more kills: everything must now arrive by itself.
        modality.done.wait(300)
        assert modality.done.is_set(), "the modality did not finish sending"
        assert modality.error is None, modality.error
        wait_for(lambda: (c := _counts(serve))["delivered"] == N_STUDIES == c["jobs"], 300,
                 f"all {N_STUDIES} studies delivered (seed {seed})")
        time.sleep(1.0)  # a straggling duplicate delivery would arrive now
        serve.stop()
        assert serve.proc is not None and serve.proc.returncode == 0, serve.tail()
    finally:
        serve.stop()
        pacs.stop()
    why = f"(seed {seed}; log {serve.log})"

    # 1. Every instance whose C-STORE got success is on disk, readable, in the DB with the right SHA-256.
    files = [t.path for s in corpus for t in s.files]
    assert len(files) >= 300
    assert set(files) == modality.succeeded, why
    assert modality.refusals == [], f"FaceSym refused objects: {modality.refusals[:5]} {why}"
    lost = []
    rows = {uid: (path, sha, version) for uid, path, sha, version in serve.query(
        "select sop_instance_uid, path, sha256, version from instance")}
    for study in corpus:
        for path, uid in study.sop_uids.items():
            row = rows.get(uid)
            stored = serve.data_dir / "files" / row[0] if row else None
            if row is None or row[2] != 1 or stored is None or not stored.is_file():
                lost.append(path.name)
                continue
            ds = pydicom.dcmread(stored)
            if str(ds.SOPInstanceUID) != uid or row[1] != dataset_sha256(path) or \
                    dataset_sha256(stored) != row[1]:
                lost.append(path.name)
    assert lost == [], f"{len(lost)} acknowledged instance(s) lost or altered: {lost[:5]} {why}"
    assert len(rows) == len(files), f"{len(rows)} instance rows for {len(files)} objects sent {why}"
    # No file in the store that the database does not know (a kill between rename and commit).
    known = {r[0] for r in rows.values()}
    store = serve.data_dir / "files"
    orphans = [p for p in store.rglob("*.dcm") if ".incoming" not in p.parts and "reports" not in p.parts
               and str(p.relative_to(store)) not in known]
    assert orphans == [], f"unreferenced files in the store: {orphans[:3]} {why}"

    # 2. Every study analysed exactly once for this engine version: one job, DELIVERED, one SR on disk.
    jobs = serve.query("select s.study_uid, j.engine_version, j.state, j.sr_sop_instance_uid, j.report_files "
                       "from job j join study s on s.id = j.study_pk")
    assert sorted(j[0] for j in jobs) == sorted(s.study_uid for s in corpus), why
    assert {(j[1], j[2]) for j in jobs} == {(ENGINE_VERSION, "DELIVERED")}, why
    expected: dict[str, set[str]] = {}
    for study_uid, _, _, sr_uid, report_files in jobs:
        on_disk = [pydicom.dcmread(p, stop_before_pixels=True)
                   for p in (store / "reports" / study_uid).glob("*.dcm")]
        srs = [str(ds.SOPInstanceUID) for ds in on_disk if ds.SOPClassUID == SR_CLASS]
        assert srs == [sr_uid], f"study {study_uid}: SR(s) on disk {srs}, job says {sr_uid} {why}"
        import json

        expected[study_uid] = {sr_uid} | {Path(p).stem for p in json.loads(report_files)}
        assert len(expected[study_uid]) >= 3, f"study {study_uid}: no key images / PDF {why}"

    # 3. Each report object reached the PACS: one SR UID per study, exactly the objects the job made;
    #    the same object twice only where a kill interrupted that study's delivery (sent, not recorded).
    received = pacs.received()
    by_study: dict[str, Counter[str]] = defaultdict(Counter)
    sr_by_study: dict[str, set[str]] = defaultdict(set)
    for sop_class, sop_uid, study_uid in received:
        by_study[study_uid][sop_uid] += 1
        if sop_class == SR_CLASS:
            sr_by_study[study_uid].add(sop_uid)
    assert set(by_study) == set(expected), why
    duplicates = 0  # objects under a UID the final report does not have (e.g. a second, different SR)
    resent = 0  # the same object received again after a kill during its delivery
    for study_uid, uids in expected.items():
        assert len(sr_by_study[study_uid]) == 1, f"study {study_uid}: SRs {sr_by_study[study_uid]} {why}"
        duplicates += len(set(by_study[study_uid]) - uids)
        assert set(by_study[study_uid]) == uids, f"study {study_uid}: {by_study[study_uid]} vs {uids} {why}"
        again = sum(n - 1 for n in by_study[study_uid].values())
        if again:
            assert study_uid in interrupted_delivery, f"study {study_uid} received twice, no kill {why}"
            resent += again
    # The SR covers the whole study (never a partial one analysed before a resend completed it).
    sources = {s.study_uid: set(s.sop_uids.values()) for s in corpus}
    for path in pacs.out.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == SR_CLASS:
            evidence = {str(ref.ReferencedSOPInstanceUID)
                        for st in ds.CurrentRequestedProcedureEvidenceSequence
                        for se in st.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}
            study = str(ds.StudyInstanceUID)
            # Besides the sources, the evidence lists the key images its drawings are on (its own report).
            own = evidence - sources[study]
            assert own <= expected[study], f"the SR of study {study} cites objects of no report {why}"
            assert evidence - own == sources[study], \
                f"the SR of study {study} covers {len(evidence - own)} of its 10 instances {why}"

    # 4. The audit trail is intact; every completed analysis is recorded at most once.
    verify = subprocess.run([sys.executable, "-m", "service.cli", "audit", "verify"], cwd=ROOT,
                            env=dict(os.environ, FACESYM_DATA_DIR=str(serve.data_dir)),
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr
    finished = Counter()
    for (xml,) in serve.query("select xml from audit_record where event_id = '110103'"):
        if "FSY-AUD-ANAEND" in xml and 'EventActionCode="C"' in xml:
            for study in corpus:
                if study.study_uid in xml:
                    finished[study.study_uid] += 1
    assert max(finished.values(), default=0) <= 1, f"a study analysed to completion twice {why}"
    # Every acknowledged object is in a 110104 "Instances Transferred" record: written when its association
    # closed, or, for an association that a kill cut short, at the next start (instance.audited).
    audited: Counter[str] = Counter()
    for (xml,) in serve.query("select xml from audit_record where event_id = '110104'"):
        m = re.search(r'ParticipantObjectID="([0-9.]+)" ParticipantObjectTypeCode="2"', xml)
        if m and 'UserID="MODALITY" UserIsRequestor="true"' in xml:
            audited[m.group(1)] += sum(int(n) for n in re.findall(r'NumberOfInstances="(\d+)"', xml))
    unaudited = sum(max(0, 10 - audited[s.study_uid]) for s in corpus)
    assert unaudited == 0, f"{unaudited} acknowledged instance(s) in no 110104 record {why}"
    assert serve.query("select count(*) from instance where not audited") == [(0,)], why
    leftovers = len(list((store / ".incoming").iterdir()))

    # 5. No patient data in the logs (names and IDs of the phantom patients).
    log_text = serve.log.read_text(errors="replace")
    assert not re.search(r"RELIABILITY-\d{4}|PHANTOM\^STUDY", log_text), "patient data in the service log"

    elapsed = time.monotonic() - started
    record = figures.record  # type: ignore[attr-defined]
    record("crash", "instances sent (videos + photos)", f"{len(files)} ({N_STUDIES} videos)")
    record("crash", "studies", N_STUDIES)
    record("crash", "C-STOREs answered (storescu runs)", f"{modality.attempts} ({modality.runs})")
    record("crash", "files re-sent by the modality", modality.resent)
    record("crash", "  of which stored before the kill (duplicate)", log_text.count("duplicate SOP Instance"))
    record("crash", "kills (SIGKILL) total", sum(kills.values()))
    for phase in (*PHASES, "idle"):
        record("crash", f"kills during {phase}", kills[phase])
    record("crash", "aimed kills whose moment did not come", aimed_missed)
    record("crash", "lost", len(lost))
    record("crash", "duplicates (other UIDs than the report's)", duplicates)
    record("crash", "same object re-sent after a kill mid-delivery", resent)
    record("crash", "analyses completed per study (audit)", f"max {max(finished.values(), default=0)}")
    record("crash", "audit chain", verify.stdout.strip())
    record("crash", "acknowledged instances in no 110104 audit record", unaudited)
    record("crash", "110104 records written at start for associations cut short",
           sum("ended without closing" in xml
               for (xml,) in serve.query("select xml from audit_record where event_id = '110104'")))
    record("crash", "temp files left in .incoming by kills (removed after 1 h)", leftovers)
    record("crash", "seconds", f"{elapsed:.0f}")
    assert sum(kills.values()) >= 8, f"only {sum(kills.values())} kills {why}"
    assert all(kills[p] >= 1 for p in PHASES), f"a phase was never hit: {dict(kills)} {why}"
