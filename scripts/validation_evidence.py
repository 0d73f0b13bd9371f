"""Regenerate the validation evidence in conformance/evidence/ (or OUT_DIR):

- dciodvfy on a Comprehensive SR made from a phantom study,
- fhir.resources (R4B) validation of the FHIR Bundle for the same study,
- `facesym audit verify` on a sample trail written by the same code the service uses.

Usage: .venv/bin/python scripts/validation_evidence.py [OUT_DIR]   (needs dicom3tools' dciodvfy)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(out_dir: Path) -> int:
    from pydicom import dcmread

    from service import phantom
    from service.audit import AuditTrail, analysis_event, application_activity, export
    from service.audit.commands import verify_command
    from service.config import Settings
    from service.domain import Task
    from service.engine import ENGINE_VERSION
    from service.engine.pipeline import analyze_frames
    from service.media.decode import open_media
    from service.media.dicom_io import build_video_photographic, write_dicom
    from service.media.encode import encode_mp4
    from service.report.fhir import build_bundle, read_bundle, study_identity_from_dicom, validate_bundle
    from service.report.sr import InstanceFinding
    from service.report.sr_io import write_report
    from service.store.db import open_database

    out_dir.mkdir(parents=True, exist_ok=True)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        print("dciodvfy not found (apt-get install dicom3tools)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="facesym-evidence-") as tmp_name:
        tmp = Path(tmp_name)
        face = phantom.load_face(ROOT / "service/phantom/data/demo_face.jpg")
        clip = phantom.render(
            face, phantom.PhantomSpec(motions=(phantom.TaskMotion(Task.SMILE, 0.25, 0.05),))
        )
        ds = build_video_photographic(
            encode_mp4(clip.frames(), clip.fps),
            width=clip.width,
            height=clip.height,
            n_frames=clip.n_frames,
            fps=clip.fps,
            series_description="Smile",
            patient_id="PHANTOM-EVIDENCE",
        )
        ds.IssuerOfPatientID = "1.2.826.0.1.3680043.10.999"
        video = write_dicom(ds, tmp / "smile.dcm")
        source = open_media(video)
        analysis = analyze_frames(source.frames(), source.info.fps)
        finding = InstanceFinding(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), int(ds.NumberOfFrames), analysis
        )

        sr_path, sr_uid = write_report([video], [finding], tmp / "sr", ENGINE_VERSION)
        run = subprocess.run([dciodvfy, str(sr_path)], capture_output=True, text=True)
        (out_dir / "dciodvfy-sr.txt").write_text(
            f"$ dciodvfy <FaceSym SR {sr_uid}>\n(exit {run.returncode})\n{run.stderr}{run.stdout}"
        )
        shutil.copy(sr_path, out_dir / "sample-sr.dcm")

        bundle = build_bundle(
            study_identity_from_dicom(video),
            [finding],
            sr_sop_instance_uid=sr_uid,
            engine_version=ENGINE_VERSION,
            patient_identifier_system="",
            issued=datetime.now(UTC),
        )
        validate_bundle(bundle)
        (out_dir / "sample-bundle.json").write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n")
        (out_dir / "fhir-validation.txt").write_text(
            "fhir.resources R4B Bundle.model_validate: OK\n"
            f"entries: {len(bundle['entry'])}\nread back: {json.dumps(read_bundle(bundle), indent=1)}\n"
        )

        settings = Settings(data_dir=tmp / "var")
        settings.data_dir.mkdir()
        trail = AuditTrail(open_database(settings.effective_database_url), resolve_patients=False)
        trail.append(application_activity("start"))
        trail.append(analysis_event("begun", 1, str(ds.StudyInstanceUID)))
        trail.append(analysis_event("finished", 1, str(ds.StudyInstanceUID), sr_uid=sr_uid))
        trail.append(export(str(ds.StudyInstanceUID), "PACS@127.0.0.1:4242", "SR", report_uid=sr_uid))
        trail.append(application_activity("stop"))
        buf = io.StringIO()
        code = verify_command(settings, out=buf)
        (out_dir / "audit-verify.txt").write_text(f"$ facesym audit verify\n(exit {code})\n{buf.getvalue()}")
        (out_dir / "sample-audit.jsonl").write_text("\n".join(trail.export()) + "\n")
    errors = run.returncode != 0 or code != 0
    print(f"evidence written to {out_dir}: dciodvfy exit {run.returncode}, audit verify exit {code}")
    dcmread(out_dir / "sample-sr.dcm")  # the copy reads back
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "conformance" / "evidence"))
