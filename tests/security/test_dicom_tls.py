"""DICOM TLS on the storage SCP, the calling-AE allow-list, and TLS deliveries, against DCMTK.

Peers: `openssl` makes the certificates, DCMTK's `storescu +tls` is the sending modality, `storescp +tls` the
receiving PACS (it listens on every address: private network namespace only, as .ci/run runs the tests).
Every refusal must be a 110113 Security Alert in the audit trail; nothing refused may be stored.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port, require_peer, require_private_netns
from security_pki import Pair, Pki, shared_pki
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.audit import AuditTrail
from service.config import Destination, Settings
from service.dicom import scp as scp_module
from service.dicom.scu import DeliveryError, send_files
from service.engine import ENGINE_VERSION
from service.errors import InvalidParameterError
from service.media.dicom_io import build_vl_photograph, write_dicom
from service.store.db import AuditRecord, Instance, open_database
from service.store.files import FileStore
from service.tls import client_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb = np.random.default_rng(7).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return write_dicom(build_vl_photograph(rgb), tmp_path_factory.mktemp("photo") / "photo.dcm")


@dataclasses.dataclass
class Scp:
    settings: Settings
    sessions: sessionmaker
    server: Any

    def stored(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    def alerts(self) -> list[str]:
        """The XML of every 110113 record except the configuration ones."""
        with self.sessions() as s:
            xml = s.scalars(select(AuditRecord.xml).where(AuditRecord.event_id == "110113")
                            .order_by(AuditRecord.seq))
            return [x for x in xml if "SettingDigest" not in x]

    def wait_alerts(self, n: int, timeout: float = 10.0) -> list[str]:
        """The handshake thread audits after the client has gone: wait for ``n`` alerts."""
        deadline = time.monotonic() + timeout
        while len(got := self.alerts()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return got


@pytest.fixture
def start(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Scp]]:
    """An SCP (plain + TLS port, client certificates required) with an audit trail; overrides apply."""
    running: list[Scp] = []

    def _start(**overrides: Any) -> Scp:
        values: dict[str, Any] = dict(
            data_dir=tmp_path / f"var{len(running)}", dicom_port=free_port(), dicom_tls_port=free_port(),
            dicom_tls_cert=str(pki.server.cert), dicom_tls_key=str(pki.server.key),
            dicom_tls_ca_file=str(pki.ca), min_free_disk_mb=1,
        )
        values.update(overrides)
        settings = dataclasses.replace(Settings(), **values).validate()
        settings.data_dir.mkdir(parents=True)
        sessions = open_database(settings.effective_database_url)
        server = scp_module.start_scp(settings, sessions, FileStore(settings.files_dir), ENGINE_VERSION,
                                      AuditTrail(sessions))
        running.append(Scp(settings, sessions, server))
        return running[-1]

    yield _start
    for scp in running:
        scp_module.stop(scp.server)
        scp.sessions.kw["bind"].dispose()


def storescu(port: int, path: Path, *tls: str, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    exe = require_peer("storescu")
    return subprocess.run(
        [exe, "-R", "-aet", calling, "-aec", "FACESYM", "-to", "10", "-ta", "10", "-td", "10", *tls,
         "127.0.0.1", str(port), str(path)],
        env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True, timeout=60,
    )


def with_cert(pair: Pair, ca: Path) -> tuple[str, ...]:
    return ("+tls", str(pair.key), str(pair.cert), "-pw", "+cf", str(ca))


def test_trusted_client_certificate_is_accepted_beside_the_plain_port(start, pki: Pki, photo: Path, figures):
    scp = start()
    done = storescu(scp.settings.dicom_tls_port, photo, *with_cert(pki.client, pki.ca))
    assert done.returncode == 0, done.stderr
    assert scp.stored() == 1
    plain = storescu(scp.settings.dicom_port, photo)  # the plain port serves alongside
    assert plain.returncode == 0, plain.stderr
    assert scp.alerts() == []
    figures.record("security", "DICOM TLS: trusted client stored", scp.stored())


#: storescu's TLS arguments per refused case, and the reason the audit record must give.
UNTRUSTED = "client certificate not trusted"
REFUSED: dict[str, tuple[Callable[[Pki], tuple[str, ...]], str]] = {
    "signed by another CA": (lambda pki: with_cert(pki.rogue_client, pki.ca), UNTRUSTED),
    "self-signed": (lambda pki: with_cert(pki.self_signed, pki.ca), UNTRUSTED),
    "no client certificate": (lambda pki: ("+tla", "+cf", str(pki.ca)), "no client certificate"),
    "plain DICOM on the TLS port": (lambda pki: (), "not TLS"),
}


def test_untrusted_clients_are_refused_and_audited(start, pki: Pki, photo: Path, figures):
    scp = start()
    for n, (case, (args, reason)) in enumerate(REFUSED.items(), start=1):
        done = storescu(scp.settings.dicom_tls_port, photo, *args(pki))
        assert done.returncode != 0, f"{case}: storescu succeeded"
        alerts = scp.wait_alerts(n)
        assert len(alerts) == n, f"{case}: {len(alerts)} security alerts after {n} refusals"
        assert f"DICOM TLS handshake refused: {reason}" in alerts[-1], (case, alerts[-1])
        assert "127.0.0.1" in alerts[-1] and "110126" in alerts[-1], case  # the peer; Node Authentication
    assert scp.stored() == 0
    assert list(scp.settings.files_dir.rglob("*.dcm")) == []
    figures.record("security", "DICOM TLS: untrusted clients refused+audited",
                   f"{len(scp.alerts())}/{len(REFUSED)}")


def test_tls_only_when_the_plain_port_is_off(start, pki: Pki, photo: Path):
    scp = start(dicom_port=0)
    assert scp.server.ssl_context is not None and scp.server.companions == []
    assert scp.server.server_address[1] == scp.settings.dicom_tls_port
    done = storescu(scp.settings.dicom_tls_port, photo, *with_cert(pki.client, pki.ca))
    assert done.returncode == 0, done.stderr
    assert scp.stored() == 1


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki):
    with pytest.raises(InvalidParameterError, match="dicom_tls_cert"):
        dataclasses.replace(Settings(), dicom_tls_port=2762).validate()
    with pytest.raises(InvalidParameterError, match="both 0"):
        dataclasses.replace(Settings(), dicom_port=0).validate()
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, dicom_port=free_port(),
                                   dicom_tls_port=free_port(), dicom_tls_cert=str(pki.server.cert),
                                   dicom_tls_key=str(pki.client.key)).validate()
    sessions = open_database(settings.effective_database_url)
    with pytest.raises(InvalidParameterError, match="does not match|KEY_VALUES_MISMATCH"):
        scp_module.start_scp(settings, sessions, FileStore(settings.files_dir), ENGINE_VERSION)
    with pytest.raises(OSError):  # nothing was left listening on the plain port
        socket.create_connection(("127.0.0.1", settings.dicom_port), 2).close()


@pytest.mark.parametrize("port_kind", ["dicom_port", "dicom_tls_port"])
def test_calling_ae_allow_list_refuses_and_audits(start, pki: Pki, photo: Path, port_kind: str, figures):
    """An AE not in the list is refused (even with a trusted certificate) and audited; one in it stores."""
    scp = start(allowed_calling_aes=("PACS",))
    port = getattr(scp.settings, port_kind)
    tls = with_cert(pki.client, pki.ca) if port_kind == "dicom_tls_port" else ()
    refused = storescu(port, photo, *tls, calling="INTRUDER")
    assert refused.returncode != 0
    (alert,) = scp.wait_alerts(1)
    assert "INTRUDER@127.0.0.1" in alert and "association rejected" in alert
    assert scp.stored() == 0
    accepted = storescu(port, photo, *tls, calling="PACS")
    assert accepted.returncode == 0, accepted.stderr
    assert scp.stored() == 1 and len(scp.alerts()) == 1
    figures.record("security", f"allow-list on {port_kind}: refused+audited / accepted", "1 / 1")


# --- FaceSym's own deliveries over TLS (DCMTK storescp +tls as the PACS) ----------------------------------


def _storescp(pki: Pki, server: Pair, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = require_peer("storescp")
    require_private_netns("storescp")
    port = free_port()
    out.mkdir()
    proc = subprocess.Popen(
        [exe, "-aet", "PACS", "-od", str(out), "+tls", str(server.key), str(server.cert), "-pw",
         "+cf", str(pki.ca), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("storescp +tls did not start")


def _worker_ctx(pki: Pki) -> Any:
    settings = dataclasses.replace(Settings(), dicom_tls_cert=str(pki.client.cert),
                                   dicom_tls_key=str(pki.client.key), dicom_tls_ca_file=str(pki.ca))
    return types.SimpleNamespace(settings=settings)


def test_delivery_over_tls_to_storescp(pki: Pki, photo: Path, tmp_path: Path, figures):
    from service.jobs.worker import _send

    proc, port = _storescp(pki, pki.server, tmp_path / "received")
    try:
        destination = f"PACS@127.0.0.1:{port}+tls"
        assert Destination.parse(destination).tls and str(Destination.parse(destination)) == destination
        _send(_worker_ctx(pki), destination, photo, [])  # the worker's path: settings → TLS context
        assert len(list((tmp_path / "received").iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(10)
    figures.record("security", "delivery over TLS to storescp +tls", "1 object")


def test_delivery_refuses_an_untrusted_pacs(pki: Pki, photo: Path, tmp_path: Path):
    proc, port = _storescp(pki, pki.rogue_server, tmp_path / "received")
    try:
        tls = client_context(str(pki.client.cert), str(pki.client.key), str(pki.ca))
        with pytest.raises(DeliveryError, match="TLS"):
            send_files(Destination("PACS", "127.0.0.1", port, tls=True), [photo], "FACESYM", timeout=10,
                       tls=tls)
        assert list((tmp_path / "received").iterdir()) == []
    finally:
        proc.terminate()
        proc.wait(10)
