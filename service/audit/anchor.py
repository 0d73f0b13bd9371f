"""The audit trail's high-water mark, kept outside the database a writer of the database could rewrite.

The hash chain of :mod:`service.audit.trail` shows a record changed in the middle, but not the newest
records deleted, nor the chain rewritten from some record on and its hashes recomputed: both verify
(issue 14). The anchor closes that: after every append, ``audit.anchor`` (in the data dir) holds the
newest record's ``seq`` and ``hash`` with an HMAC-SHA256 under a key file (``audit_anchor.key``, 0600,
made at first use) that is not in the database. ``audit verify`` then fails when the database ends
before the anchor (truncation), when the record the anchor names has another hash (rewritten), or when
the anchor's MAC does not check out (forged). New records never reuse a sequence number the anchor has
seen: after a truncation the next record leaves a gap, which verify keeps reporting.

Limits: someone who can write the data dir's files as well as the database can forge both; ship the
trail to syslog (``audit_syslog_host``) for a copy outside the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

ANCHOR_FILE, KEY_FILE = "audit.anchor", "audit_anchor.key"


class AnchorError(Exception):
    """The anchor file exists but cannot be trusted (unreadable, malformed or its MAC is wrong)."""


@dataclass(frozen=True)
class Mark:
    """The newest record the anchor has seen."""

    seq: int
    hash: str


class AuditAnchor:
    """``audit.anchor`` and its key in ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ANCHOR_FILE
        self.key_path = Path(directory) / KEY_FILE

    def _key(self, create: bool) -> bytes | None:
        try:
            return self.key_path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return self.key_path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        return self.key_path.read_bytes()

    @staticmethod
    def _mac(key: bytes, seq: int, digest: str) -> str:
        return hmac.new(key, f"{seq}|{digest}".encode(), hashlib.sha256).hexdigest()

    def read(self) -> Mark | None:
        """The mark, or None where no anchor was ever written. Raises AnchorError if it cannot be trusted."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnchorError(f"{self.path.name} unreadable: {exc.strerror}") from None
        key = self._key(create=False)
        if key is None:
            raise AnchorError(f"{self.path.name} exists but its key {self.key_path.name} is missing")
        try:
            doc = json.loads(raw)
            seq, digest, mac = int(doc["seq"]), str(doc["hash"]), str(doc["mac"])
        except (ValueError, KeyError, TypeError):
            raise AnchorError(f"{self.path.name} is malformed") from None
        if not hmac.compare_digest(mac, self._mac(key, seq, digest)):
            raise AnchorError(f"{self.path.name}: MAC does not match (forged, or the key was replaced)")
        return Mark(seq, digest)

    def advance(self, seq: int, digest: str) -> None:
        """Move the mark to record ``seq`` (hash ``digest``) unless it is already there or beyond; safe
        across threads and processes (an exclusive lock on ``audit.anchor.lock``)."""
        key = self._key(create=True)
        assert key is not None
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read()
            except AnchorError:
                current = None  # never overwrite a bad anchor silently: verify must still see it
                if self.path.exists():
                    return
            if current is not None and current.seq >= seq:
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"seq": seq, "hash": digest, "mac": self._mac(key, seq, digest)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
