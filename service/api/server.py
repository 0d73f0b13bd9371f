"""Run the console in the service process: uvicorn in a daemon thread, stopped with the service."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import ServiceHooks, create_app
from service.audit import AuditTrail
from service.tls import server_context

log = logging.getLogger(__name__)


class WebHandle:
    """The running web server: ``url``, ``port``, and ``stop()``."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int, tls: bool = False
    ) -> None:
        self._server, self._thread = server, thread
        self.host, self.port, self.tls = host, port, tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
        log.info("web console stopped")


def start_web(
    settings: Any,
    sessions: sessionmaker[Session],
    audit: AuditTrail,
    service_hooks: ServiceHooks | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> WebHandle:
    """Serve the console and the API on ``settings.web_host``:``settings.web_port`` (127.0.0.1:8080 when
    the settings lack them; ``host``/``port`` override; port 0 picks a free one). With ``web_tls_cert`` and
    ``web_tls_key`` it speaks HTTPS only (TLS 1.2+). Returns once listening; raises OSError when the
    address is taken, InvalidParameterError for unusable certificate or key files."""
    host = host if host is not None else str(getattr(settings, "web_host", "127.0.0.1") or "127.0.0.1")
    port = port if port is not None else int(getattr(settings, "web_port", 8080))
    cert = str(getattr(settings, "web_tls_cert", "") or "")
    key = str(getattr(settings, "web_tls_key", "") or "")
    tls = server_context(cert, key, what="web_tls") if cert else None  # a clear error before uvicorn's
    app = create_app(settings, sessions, audit, service_hooks)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    port = int(sock.getsockname()[1])
    # No access log: URLs carry study UIDs and search text (PHI stays out of the logs).
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            proxy_headers=False, lifespan="off",
                            ssl_certfile=cert or None, ssl_keyfile=key or None)
    if tls is not None:
        config.load()
        config.ssl = tls  # ours: TLS 1.2 at least, and a passphrase-protected key never prompts
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="facesym-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the web console did not start")
        time.sleep(0.02)
    handle = WebHandle(server, thread, host, port, tls=tls is not None)
    log.info("web console on %s", handle.url)
    return handle
