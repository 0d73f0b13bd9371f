"""A throw-away Orthanc (Debian's ``orthanc``) as the PACS in integration tests.

Orthanc 1.10 listens on every address and cannot be told otherwise, so callers must first call
``conftest.require_private_netns("Orthanc")``. Each instance gets its own temp dir (config, Lua, storage,
log), free loopback ports, no plugins (or only DICOMweb, for a web viewer), no authentication, and a Lua
``OnStableStudy`` that forwards the study's non-SR instances to FaceSym (never the SR FaceSym sent back,
so no loop).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from conftest import free_port, require_peer, stop_process

FALLBACK_BINARY = "/usr/sbin/Orthanc"  # Debian installs it in sbin, which is not on a normal user's PATH
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage class

# Forward what is new and not an SR: Orthanc calls OnStableStudy again once FaceSym's SR has made the study
# change, and that call must not resend the video (noise) nor send the SR back to FaceSym (a loop).
_LUA = """
forwarded = forwarded or {}

function OnStableStudy(studyId, tags, metadata)
  local todo = {}
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    local id = instance['ID']
    if not forwarded[id] then
      local sopClass = RestApiGet('/instances/' .. id .. '/metadata/SopClassUid')
      -- FaceSym's own objects (SR, key images, PDF) have Manufacturer's Model Name "FaceSym": never send
      -- them back (phantom videos say "FaceSym phantom" and are forwarded like any camera's).
      local ok, model = pcall(RestApiGet, '/instances/' .. id .. '/content/0008-1090')
      if not ok then model = '' end
      model = string.gsub(model, '%%s+$', '')
      if string.sub(sopClass, 1, string.len('%(sr)s')) ~= '%(sr)s' and model ~= 'FaceSym' then
        table.insert(todo, id)
      end
    end
  end
  print('stable study ' .. studyId .. ': ' .. #todo .. ' new instance(s) to analyse')
  if #todo > 0 then
    print('forwarding ' .. #todo .. ' instance(s) of study ' .. studyId .. ' to %(name)s')
    RestApiPost('/modalities/%(name)s/store', DumpJson(todo, true))
    for _, id in pairs(todo) do forwarded[id] = true end
  end
end
"""


def orthanc_binary() -> str:
    """The Orthanc executable; skips (or fails under FACESYM_REQUIRE_PEERS=1) when it is not installed."""
    if shutil.which("Orthanc") is None and os.access(FALLBACK_BINARY, os.X_OK):
        return FALLBACK_BINARY
    return require_peer("Orthanc")


@dataclass(frozen=True)
class OrthancInstance:
    id: str  # Orthanc's resource id
    sop_class_uid: str
    sop_instance_uid: str


class OrthancPeer:
    """``with OrthancPeer(forward_to=("FACESYM", "127.0.0.1", port)) as orthanc: ...``"""

    def __init__(
        self,
        forward_to: tuple[str, str, int] | None = None,
        aet: str = "ORTHANC",
        stable_age: int = 2,
        start_timeout: float = 30.0,
        dicomweb: bool = False,
    ) -> None:
        self.binary = orthanc_binary()
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.forward_to = forward_to
        self.stable_age = stable_age
        self.start_timeout = start_timeout
        self.dicomweb = dicomweb
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> OrthancPeer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        # Our own dir under /tmp: pytest's tmp_path sits below a 0700 dir the orthanc user cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="facesym-orthanc-"))
        storage = self.dir / "storage"
        storage.mkdir()
        config: dict[str, Any] = {
            "Name": "FaceSymTestPACS",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "TemporaryDirectory": str(self.dir / "tmp"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "DicomAlwaysAllowStore": True,  # FaceSym stores its SR back into Orthanc
            "DicomCheckCalledAet": False,
            "StableAge": self.stable_age,
            "DicomModalities": {},
            "LuaScripts": [],
        }
        (self.dir / "tmp").mkdir()
        if self.dicomweb:  # Debian's orthanc-dicomweb: QIDO-RS / WADO-RS for a web viewer (OHIF)
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                  "WadoRoot": "/wado", "Ssl": False, "StudiesMetadata": "Full",
                                  "SeriesMetadata": "Full"}
        if self.forward_to is not None:
            ae_title, host, port = self.forward_to
            config["DicomModalities"] = {"facesym": [ae_title, host, port]}
            lua = self.dir / "forward.lua"
            lua.write_text(_LUA % {"sr": SR_CLASS_PREFIX, "name": "facesym"})
            config["LuaScripts"] = [str(lua)]
        config_path = self.dir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))

        argv = [self.binary, str(config_path)]
        if os.geteuid() == 0:  # as root (CI): run as Debian's orthanc user; setpriv execs, so proc is Orthanc
            shutil.chown(self.dir, "orthanc", "orthanc")
            for p in self.dir.rglob("*"):
                shutil.chown(p, "orthanc", "orthanc")
            argv = ["setpriv", "--reuid=orthanc", "--regid=orthanc", "--init-groups", *argv]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                pytest.fail(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"Orthanc did not answer on port {self.http_port} within {self.start_timeout:.0f} s")

    def stop(self) -> None:
        stop_process(self.proc, grace=10)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.dir is not None and os.environ.get("FACESYM_KEEP_ORTHANC") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "orthanc.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no Orthanc log)"

    # -- REST ------------------------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self._request("POST", path, json.dumps(payload).encode()))

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, ParentStudy, Status, ...)."""
        answer = json.loads(self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer
        return dict(answer)

    def study_instances(self, study_uid: str) -> list[OrthancInstance]:
        """The instances Orthanc holds for a StudyInstanceUID, with their SOP Class UIDs."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        out = []
        for inst in found:
            sop_class = self._request("GET", f"/instances/{inst['ID']}/metadata/SopClassUid").decode()
            out.append(
                OrthancInstance(inst["ID"], sop_class, inst["MainDicomTags"].get("SOPInstanceUID", ""))
            )
        return out

    def download(self, instance_id: str) -> bytes:
        """The DICOM file of one instance."""
        return self._request("GET", f"/instances/{instance_id}/file")
