"""OHIF Viewer v3 (the npm registry's prebuilt ``@ohif/app`` ``dist/``, unpacked by ``make ohif`` into
``var/ohif``) served on loopback, same origin as the DICOMweb of an :class:`orthanc_peer.OrthancPeer`.

:class:`ViewerServer` serves the app's files, its own ``app-config.js`` (one DICOMweb data source: this
server's ``/dicom-web``), and proxies ``/dicom-web/`` and ``/wado`` to Orthanc, so the browser sees one
origin (no CORS). Unknown paths get ``index.html`` (OHIF routes in the browser). Nothing is downloaded at
test time: without the unpacked app the test skips, or fails under FACESYM_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import http.server
import json
import mimetypes
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Where ``make ohif`` (run by .ci/run) unpacks ``npm pack @ohif/app``; FACESYM_OHIF_DIST overrides.
DEFAULT_DIST = ROOT / "var" / "ohif" / "current" / "package" / "dist"

#: MPEG-4 AVC/H.264 and HEVC transfer syntaxes (PS3.5 A.4.5–A.4.7): 1.2.840.10008.1.2.4.100 … .108.
MPEG4_SYNTAX_PREFIX = "1.2.840.10008.1.2.4.10"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'dicomweb',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicomweb',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      dicomUploadEnabled: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def ohif_dist() -> Path:
    """The unpacked OHIF app; skips (fails under FACESYM_REQUIRE_PEERS=1) when .ci/run has not made it."""
    dist = Path(os.environ.get("FACESYM_OHIF_DIST", DEFAULT_DIST))
    if not (dist / "index.html").is_file():
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"OHIF app not found at {dist} but FACESYM_REQUIRE_PEERS=1 (.ci/run unpacks it)")
        pytest.skip(f"OHIF app not found at {dist} (make ohif)")
    return dist


class ViewerServer:
    """``with ViewerServer(dist, orthanc_http_port) as url: ...`` — OHIF and Orthanc's DICOMweb on one
    loopback origin; stops with the block."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc = f"http://127.0.0.1:{orthanc_port}"
        self.httpd: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.requests: list[str] = []
        #: Proxied requests Orthanc refused ("status path (Accept: …)"), for the test's messages.
        self.failures: list[str] = []

    def video_stream(self, path: str) -> bytes | None:
        """The MPEG-4 stream of a video instance for WADO-RS ``…/instances/{uid}/rendered``: Debian's
        DICOMweb plugin (1.7) renders only images and answers 400 for video, so this origin takes the
        stream from Orthanc's REST API (the encapsulated fragments after the offset table), as a DICOMweb
        gateway in front of the PACS would. None for anything that is not an MPEG-4 video."""
        uid = path.rstrip("/").split("/")[-2]
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
        found = self._orthanc_json("POST", "/tools/find", query)
        if not found:
            return None
        ident = found[0]
        syntax = self._orthanc("GET", f"/instances/{ident}/metadata/TransferSyntax").decode()
        if not syntax.startswith(MPEG4_SYNTAX_PREFIX):
            return None
        fragments = self._orthanc_json("GET", f"/instances/{ident}/content/7fe0-0010")
        return b"".join(self._orthanc("GET", f"/instances/{ident}/content/7fe0-0010/{k}")
                        for k in sorted(int(f) for f in fragments)[1:])

    def _orthanc(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.orthanc + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError:
            return b"null"

    def _orthanc_json(self, method: str, path: str, payload: object = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        return json.loads(self._orthanc(method, path, body) or b"null")

    def __enter__(self) -> str:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
                server.requests.append(self.path)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                video = server.video_stream(path) if path.endswith("/rendered") else None
                if video is not None:
                    self._send(200, video, "video/mp4")
                elif path.startswith(("/dicom-web/", "/wado")):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                else:
                    target = (server.dist / path.lstrip("/")).resolve()
                    if not target.is_file() or server.dist not in target.parents:
                        target = server.dist / "index.html"
                    kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                    if target.suffix == ".wasm":
                        kind = "application/wasm"
                    self._send(200, target.read_bytes(), kind)

            def _proxy(self) -> None:
                req = urllib.request.Request(server.orthanc + self.path)
                # Orthanc's DICOMweb writes absolute BulkDataURIs from the request's Host: this origin's.
                for name in ("Accept", "Range", "Host"):
                    if self.headers.get(name):
                        req.add_header(name, self.headers[name])
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        self._send(resp.status, resp.read(), resp.headers.get("Content-Type", ""))
                except urllib.error.HTTPError as exc:
                    server.failures.append(f"{exc.code} {self.path} (Accept: {self.headers.get('Accept')})")
                    self._send(exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain"))

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                if kind:
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
