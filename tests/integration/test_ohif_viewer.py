"""A radiologist's viewer: OHIF v3 in Debian's Chromium shows FaceSym's SR drawn on the key image.

The study goes the way a hospital's does: a modality (DCMTK's storescu) sends the phantom smile video to
the PACS (Orthanc, with Debian's DICOMweb plugin) and to FaceSym; FaceSym analyses it and stores its SR,
key images and PDF in the PACS; OHIF (the npm registry's prebuilt app, served on the same loopback origin)
opens the study from Orthanc's DICOMweb. Screenshots go to docs/screenshots/ when
FACESYM_SCREENSHOTS=1 (and to the test's tmp dir always).

Orthanc and storescp-like peers listen on every address: this runs only in a private network namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import free_port, phantom_smile_dicom, require_peer, require_private_netns
from ohif_viewer import ViewerServer, ohif_dist
from orthanc_peer import OrthancPeer
from PIL import Image

from service.config import Destination, Settings
from service.report.sr import read_report

pytestmark = [pytest.mark.slow, pytest.mark.peers]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
VIDEO = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
#: Headless Chromium with a software GPU (SwiftShader): OHIF's cornerstone renders with WebGL.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def _save(page: Any, name: str, tmp: Path) -> None:
    page.screenshot(path=str(tmp / name))
    if os.environ.get("FACESYM_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / name, SHOTS / name)


def test_ohif_shows_the_sr_drawn_on_the_key_image(tmp_path: Path) -> None:
    require_private_netns("Orthanc")
    storescu, chromium, dist = require_peer("storescu"), require_peer("chromium"), ohif_dist()
    from playwright.sync_api import sync_playwright

    from service.jobs.scheduler import FaceSymService

    study_uid, path = phantom_smile_dicom(tmp_path, study_description="Facial palsy follow-up")
    port = free_port()
    with OrthancPeer(dicomweb=True) as orthanc:
        settings = replace(
            Settings(), web_port=0, data_dir=tmp_path / "var", dicom_port=port, quiet_seconds=1.0,
            poll_seconds=0.2, retry_base_seconds=0.5, retry_max_seconds=2.0,
            destinations=(Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port),),
        )
        service = FaceSymService(settings)
        service.start()
        try:
            env = {**os.environ, "TCP_NODELAY": "1"}
            for aec, p in (("ORTHANC", orthanc.dicom_port), ("FACESYM", port)):
                run = subprocess.run([storescu, "-R", "-xn", "-aec", aec, "127.0.0.1", str(p), str(path)],
                                     capture_output=True, text=True, timeout=120, env=env)
                assert run.returncode == 0, run.stderr
            deadline = time.monotonic() + 240
            while True:
                classes = sorted(i.sop_class_uid for i in orthanc.study_instances(study_uid))
                # The SR, the PDF and the three key images (key image, flow overlay, motion plot).
                wanted = (COMPREHENSIVE_SR, ENCAPSULATED_PDF, SECONDARY_CAPTURE)
                if [classes.count(c) for c in wanted] == [1, 1, 3]:
                    break
                assert time.monotonic() < deadline, f"FaceSym's objects not in Orthanc: {classes}"
                time.sleep(0.5)
        finally:
            service.stop()
        sr_doc = next(i for i in orthanc.study_instances(study_uid) if i.sop_class_uid == COMPREHENSIVE_SR)
        (instance,) = read_report(pydicom.dcmread(BytesIO(orthanc.download(sr_doc.id))))
        (smile,) = instance["tasks"]
        viewer = ViewerServer(dist, orthanc.http_port)
        with viewer as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                _check_viewer(browser.new_page(viewport={"width": 1600, "height": 1000}), url, study_uid,
                              smile, tmp_path)
            finally:
                browser.close()
        assert not viewer.failures, viewer.failures
        # The PDF came from the PACS: its Encapsulated Document (0042,0011) as DICOMweb bulk data.
        assert any("/bulk/00420011" in r for r in viewer.requests), viewer.requests[-20:]


def _check_viewer(page: Any, url: str, study_uid: str, smile: dict[str, Any], tmp: Path) -> None:
    """The study in OHIF: the SR drawn on the key image with its values; the PDF; the video playing."""
    # OHIF's first-visit tour (shepherd.js) may cover the page at any moment: hidden, as a returning user's.
    page.add_init_script("document.addEventListener('DOMContentLoaded', () => { const s = "
                         "document.createElement('style'); s.textContent = '.shepherd-element, "
                         ".shepherd-modal-overlay-container { display: none !important; }'; "
                         "document.head.appendChild(s); });")
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study_uid}")
    page.get_by_text("FaceSym facial symmet").first.wait_for(timeout=60_000)
    for label in ("FaceSym key images", "FaceSym report (PDF)", "Smile"):  # the study browser's series
        page.get_by_text(label, exact=True).first.wait_for(timeout=30_000)

    page.get_by_text("FaceSym facial symmet").first.dblclick()
    viewport = page.locator("[data-cy=viewport-pane]").first
    # OHIF labels each drawn group with its values, rounded to 2 decimals (its own formatting).
    for side in ("left", "right"):
        page.get_by_text(f"Movement magnitude: {smile[side]:.2f} {{D}}").first.wait_for(timeout=60_000)
    # OHIF draws an SR's SCOORDs only on the image they are selected from: here the key image (SC).
    page.wait_for_timeout(3000)
    # Two outlines and an arrow per side, plus the TID 1501 group's two outlines: at least 8 SVG shapes.
    shapes = viewport.locator("svg path, svg polyline").count()
    assert shapes >= 8, f"{shapes} SVG shapes drawn"
    no = page.get_by_role("button", name="No")  # "continue tracking measurements?": keep the SR as is
    if no.count():
        no.first.click()
    page.wait_for_timeout(1000)
    _save(page, "ohif-sr-key-image.png", tmp)

    page.get_by_text("FaceSym report (PDF)").first.dblclick()
    page.wait_for_function("() => [...document.querySelectorAll('iframe, embed, object')].length > 0",
                           timeout=60_000)
    page.wait_for_timeout(3000)
    _save(page, "ohif-pdf.png", tmp)

    page.get_by_text("Smile", exact=True).first.dblclick()
    # Cornerstone's video viewport keeps its <video> off the document and draws it on a canvas: played
    # with OHIF's cine player, the viewport shows a face that moves.
    page.wait_for_timeout(2000)
    page.locator("[data-cy=MoreTools-split-button-secondary]").first.click()
    page.get_by_text("Cine", exact=True).first.click()  # OHIF's cine player: it plays the video
    page.wait_for_timeout(1000)
    page.locator("[data-cy=cine-player-play-pause]").first.click()
    shots = []
    for _ in range(6):
        shots.append(np.asarray(Image.open(BytesIO(viewport.screenshot())).convert("RGB"), dtype=np.int16))
        page.wait_for_timeout(400)
    _save(page, "ohif-video.png", tmp)
    assert shots[-1].mean() > 40, "the video viewport stayed dark"
    assert max(float(np.abs(a - shots[0]).mean()) for a in shots) > 0.5, "the video did not play"
