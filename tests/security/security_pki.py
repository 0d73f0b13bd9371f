"""Throw-away certificates for the security tests, made with the real `openssl` command line.

``make_pki(folder)`` makes a trusted CA with a server certificate (127.0.0.1 / localhost) and a client
certificate, a second ("rogue") CA with a client and a server certificate of its own, and a self-signed
client certificate. RSA 2048 keys (DCMTK's default BCP 195 profile negotiates ECDHE-RSA suites).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_peer


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA FaceSym trusts
    server: Pair  # signed by it, for 127.0.0.1 and localhost
    client: Pair  # signed by it
    rogue_ca: Path  # another CA, trusted by nobody here
    rogue_client: Pair  # signed by the rogue CA
    rogue_server: Pair  # signed by the rogue CA, for 127.0.0.1
    self_signed: Pair  # a client certificate that signs itself


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> Pair:
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
         "-days", "2", "-subj", f"/CN=FaceSym test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=folder)
    return Pair(folder / f"{name}.crt", folder / f"{name}.key")


def _leaf(folder: Path, name: str, ca: Pair) -> Pair:
    _run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
         "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
         "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=folder)
    return Pair(folder / f"{name}.crt", folder / f"{name}.key")


def make_pki(folder: Path) -> Pki:
    require_peer("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "self.key", "-out", "self.crt",
         "-days", "2", "-subj", "/CN=self-signed", "-addext", "subjectAltName=IP:127.0.0.1", cwd=folder)
    return Pki(
        ca=ca.cert, server=_leaf(folder, "server", ca), client=_leaf(folder, "client", ca),
        rogue_ca=rogue.cert, rogue_client=_leaf(folder, "rogue-client", rogue),
        rogue_server=_leaf(folder, "rogue-server", rogue),
        self_signed=Pair(folder / "self.crt", folder / "self.key"),
    )


_SHARED: list[Pki] = []


def shared_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the whole run (each test module's ``pki`` fixture calls this): keys take a while."""
    if not _SHARED:
        _SHARED.append(make_pki(tmp_path_factory.getbasetemp() / "security-pki"))
    return _SHARED[0]
