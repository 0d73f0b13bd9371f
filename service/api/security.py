"""Passwords, API tokens, signed session cookies and CSRF tokens: the standard library only.

* Passwords: ``hashlib.scrypt`` (N=2^14, r=8, p=1, 32-byte key) with a 16-byte random salt per user,
  stored as ``scrypt$N$r$p$<salt b64>$<key b64>``; checked in constant time.
* API tokens: ``fsy_`` + 32 random bytes (URL-safe base64); only their SHA-256 hex is stored.
* Session cookies: ``<payload b64>.<HMAC-SHA256 b64>`` over a JSON payload (user, session epoch, issue
  time, a random session id), keyed by a secret read from a 0600 file under the data directory (made at
  first start). CSRF tokens are HMACs of the session id (or of a pre-login nonce for the login form).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32
TOKEN_PREFIX = "fsy_"


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- passwords -------------------------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         dklen=SCRYPT_DKLEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64e(salt)}${_b64e(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (constant-time); False for any malformed hash."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _b64d(key)
        got = hashlib.scrypt(password.encode("utf-8"), salt=_b64d(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


#: Checked against when the user does not exist, so that a wrong name costs as long as a wrong password.
DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)


# --- API tokens ------------------------------------------------------------------------------------------


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- the secret ------------------------------------------------------------------------------------------


def load_or_create_secret(path: Path) -> bytes:
    """The signing secret in ``path`` (hex), made (0600, atomically) when the file does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic; fails when another process made it first (then its secret wins)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        log.info("web console: created a new session secret")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("web console: the session secret file was readable by others (mode %o); now 0600", mode)
        os.chmod(path, 0o600)
    text = path.read_text().strip()
    if len(text) < 32:
        raise ValueError(f"web secret file {path} holds fewer than 32 characters")
    return text.encode("utf-8")


# --- signed values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionData:
    username: str
    epoch: int
    issued: float
    sid: str


class Signer:
    """HMAC-SHA256 signing of small JSON payloads, and the CSRF tokens derived from them."""

    def __init__(self, secret: bytes, max_age_seconds: float) -> None:
        self._key = hashlib.sha256(b"facesym-web-session|" + secret).digest()
        self._csrf_key = hashlib.sha256(b"facesym-web-csrf|" + secret).digest()
        self.max_age = max_age_seconds

    def _mac(self, data: bytes) -> str:
        return _b64e(hmac.new(self._key, data, hashlib.sha256).digest())

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return f"{body}.{self._mac(body.encode('ascii'))}"

    def unsign(self, value: str) -> dict[str, Any] | None:
        body, _, mac = value.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body.encode("ascii", "replace"))):
            return None
        try:
            data = json.loads(_b64d(body))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def new_session(self, username: str, epoch: int) -> str:
        return self.sign({"u": username, "e": epoch, "t": time.time(), "s": secrets.token_urlsafe(16)})

    def read_session(self, cookie: str | None) -> SessionData | None:
        data = self.unsign(cookie or "")
        if data is None:
            return None
        try:
            s = SessionData(str(data["u"]), int(data["e"]), float(data["t"]), str(data["s"]))
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 <= time.time() - s.issued <= self.max_age:
            return None
        return s

    def csrf_token(self, sid: str) -> str:
        return _b64e(hmac.new(self._csrf_key, sid.encode("utf-8"), hashlib.sha256).digest())

    def check_csrf(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(sid), str(token))


def is_safe_next(target: str | None) -> bool:
    """A post-login redirect target must be a local path (no scheme, no host, no backslash tricks)."""
    return bool(target) and str(target).startswith("/") and not str(target).startswith("//") \
        and "\\" not in str(target) and not any(ord(c) < 32 for c in str(target))
