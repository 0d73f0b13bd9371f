"""Audit forwarding to a real audit repository: Debian's rsyslog with a TLS imtcp input on loopback.

The test makes its own CA and server certificate with openssl, runs ``rsyslogd -n -f CONF -i PIDFILE`` as
a plain process (work directory, pid file and output file in tmp), forwards records over TLS (RFC 5425
octet counting), stops rsyslog, appends more records (append must neither block nor fail), starts it
again and sees the missed records arrive, in order. Run once per installed TLS driver: gtls
(rsyslog-gnutls, TLS 1.2) and ossl (rsyslog-openssl, TLS 1.3).
"""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port, require_peer

from service.audit import AuditTrail, SyslogForwarder, application_activity, instances_transferred
from service.audit.anchor import AuditAnchor
from service.store.db import open_database

pytestmark = pytest.mark.peers

BOM = "\ufeff"
VIDEO = "1.2.840.10008.5.1.4.1.1.77.1.4.1"


def _driver_installed(driver: str) -> bool:
    return any(glob.glob(f"{d}/lmnsd_{driver}.so") for d in ("/usr/lib/*/rsyslog", "/usr/lib/rsyslog"))


def _openssl(openssl: str, *args: str, cwd: Path) -> None:
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(tmp: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    openssl = require_peer("openssl")
    pki = tmp / "pki"
    pki.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(openssl, "req", "-x509", *ec, "-days", "2", "-subj", "/CN=FaceSym test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=pki)
    _openssl(openssl, "req", *ec, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr",
             cwd=pki)
    (pki / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem", cwd=pki)
    return pki


class Rsyslog:
    """rsyslogd in the foreground with one TLS imtcp input on 127.0.0.1 and an omfile action."""

    def __init__(self, binary: str, tmp: Path, pki: Path, driver: str, port: int) -> None:
        self.binary, self.port = binary, port
        self.dir = tmp / f"rsyslog-{driver}"
        (self.dir / "work").mkdir(parents=True)
        self.out = self.dir / "received.log"
        self.pidfile = self.dir / "rsyslogd.pid"
        self.conf = self.dir / "rsyslog.conf"
        self.log = self.dir / "rsyslogd.out"
        # No system paths: work directory, pid file, output all in tmp; only the modules named here load.
        self.conf.write_text(f"""
global(
  workDirectory="{self.dir / 'work'}"
  maxMessageSize="64k"
  defaultNetstreamDriverCAFile="{pki / 'ca.pem'}"
  defaultNetstreamDriverCertFile="{pki / 'server.pem'}"
  defaultNetstreamDriverKeyFile="{pki / 'server.key'}"
)
module(load="imtcp" StreamDriver.Name="{driver}" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
template(name="audit" type="string" string="%app-name% %msgid% %procid% %structured-data% %msg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{self.out}" template="audit")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="audit")
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited {self.proc.returncode}: {self.log.read_text()}")
            if _listening(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"rsyslogd did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def lines(self) -> list[str]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_text(encoding="utf-8").splitlines() if line]


def _listening(port: int) -> bool:
    """The port has a listener (read from /proc so that no half-open TLS connection bothers rsyslog)."""
    target = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[1].endswith(target) and cols[3] == "0A":  # 0A: LISTEN
                return True
    with socket.socket() as s:  # fallback without /proc
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0 and not Path("/proc/net/tcp").exists()


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(params=["gtls", "ossl"])
def rsyslog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rsyslog]:
    binary = require_peer("rsyslogd")
    driver = request.param
    if not _driver_installed(driver):
        package = {"gtls": "rsyslog-gnutls", "ossl": "rsyslog-openssl"}[driver]
        if os.environ.get("FACESYM_REQUIRE_PEERS") == "1":
            pytest.fail(f"rsyslog TLS driver {driver} ({package}) not installed but FACESYM_REQUIRE_PEERS=1")
        pytest.skip(f"rsyslog TLS driver {driver} not installed ({package})")
    server = Rsyslog(binary, tmp_path, make_pki(tmp_path), driver, free_port())
    try:
        yield server
    finally:
        server.stop()


def _split(line: str) -> tuple[dict[str, str], str]:
    """(FaceSym's structured-data parameters as rsyslog parsed them, the XML) of one received line."""
    app, msgid, _procid, rest = line.split(" ", 3)
    assert (app, msgid) == ("facesym", "DICOM+RFC3881")
    sd, _, msg = rest.partition("] ")
    assert sd.startswith("[facesym-audit@32473 "), sd
    params = dict(re.findall(r'(\w+)="([^"]*)"', sd))
    return params, msg.removeprefix(BOM)


def _xml_of(line: str) -> str:
    return _split(line)[1]


def _in_order_once_each(lines: list[str], expected: list[str]) -> list[str]:
    """The received XML messages with repeats removed (at-least-once may resend), first copies in order."""
    seen: list[str] = []
    for line in lines:
        xml = _xml_of(line)
        if xml not in seen:
            seen.append(xml)
    assert set(seen) <= set(expected), "rsyslog received a message that is not in the trail"
    return seen


def test_records_reach_rsyslog_over_tls_including_those_written_while_it_was_down(
    rsyslog: Rsyslog, tmp_path: Path
) -> None:
    trail = AuditTrail(open_database(f"sqlite:///{tmp_path / 'facesym.db'}"), anchor=AuditAnchor(tmp_path))
    rsyslog.start()
    forwarder = SyslogForwarder(
        trail, "127.0.0.1", rsyslog.port, cafile=str(tmp_path / "pki" / "ca.pem"),
        backoff_initial=0.1, backoff_max=0.5, poll_seconds=0.5, confirm_seconds=0.2, timeout=5.0,
    ).start()
    try:
        records = [trail.append(application_activity("start"))]
        for k in range(4):
            study = f"1.2.826.0.1.3680043.8.498.{k}"
            records.append(trail.append(instances_transferred(study, {VIDEO: k + 1}, f"MOD{k}", "127.0.0.1")))
        expected = [r.xml for r in records]
        assert _wait_for(lambda: len(rsyslog.lines()) >= 5), rsyslog.log.read_text()
        assert forwarder.flush(10) and forwarder.connected
        assert _in_order_once_each(rsyslog.lines(), expected) == expected

        # the repository goes away: appends go on at full speed and nothing is lost
        rsyslog.stop()
        for k in range(5, 10):
            began = time.monotonic()
            records.append(trail.append(
                instances_transferred(f"1.2.826.0.1.3680043.8.498.{k}", {VIDEO: 1}, f"MOD{k}", "127.0.0.1")
            ))
            assert time.monotonic() - began < 1.0, "append waited for the repository"
            time.sleep(0.1)
        assert _wait_for(lambda: not forwarder.connected, 10)
        time.sleep(0.5)
        assert [p.seq for p in trail.pending()] == [6, 7, 8, 9, 10]
        assert len(rsyslog.lines()) == 5

        # back again: the missed records arrive, in order, after the earlier ones
        rsyslog.start()
        expected = [r.xml for r in records]
        assert _wait_for(lambda: len(_in_order_once_each(rsyslog.lines(), expected)) == 10), (
            rsyslog.log.read_text()
        )
        assert _in_order_once_each(rsyslog.lines(), expected) == expected
        assert forwarder.flush(10)
        assert forwarder.connects >= 2
        # Every copy carries its number, its chain hash and the anchor's high-water mark (issue 14): the
        # repository knows, outside this host, how long the trail was when each record left.
        by_seq = {r.seq: r.hash for r in records}
        for line in rsyslog.lines():
            params, _ = _split(line)
            seq = int(params["seq"])
            assert params["hash"] == by_seq[seq] and int(params["hwm"]) >= seq, params
        assert max(int(_split(line)[0]["hwm"]) for line in rsyslog.lines()) == 10
    finally:
        forwarder.stop(timeout=2)
    assert trail.verify().ok
    assert trail.pending() == []
