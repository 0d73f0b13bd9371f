"""Local users of the web console and the REST API: ``facesym user add`` / ``facesym user token``.

Passwords are kept as scrypt hashes with a per-user salt, API tokens only as their SHA-256; both are
shown nowhere after creation. Adding a user or issuing a token is audited (110113 Security
Configuration, naming the user, never the secret).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.api.security import hash_password, new_token, token_hash
from service.errors import InvalidParameterError
from service.store.db import USER_ROLES, User, open_database

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10


def _sessions(settings_or_sessions: Any) -> sessionmaker[Session]:
    if isinstance(settings_or_sessions, sessionmaker):
        return settings_or_sessions
    settings_or_sessions.data_dir.mkdir(parents=True, exist_ok=True)
    return open_database(settings_or_sessions.effective_database_url)


def _audit(sessions: sessionmaker[Session], settings_or_sessions: Any, what: str, username: str) -> None:
    from service.audit import AuditTrail, config_change
    from service.audit.anchor import AuditAnchor

    source = getattr(settings_or_sessions, "audit_source_id", "")
    ae = getattr(settings_or_sessions, "ae_title", "FACESYM")
    data_dir = getattr(settings_or_sessions, "data_dir", None)
    anchor = AuditAnchor(data_dir) if data_dir is not None else None
    AuditTrail(sessions, source_id=source, resolve_patients=False, anchor=anchor).record(
        config_change([f"user:{username}"], kind="security", local_ae=ae, description=what)
    )


def validate_username(username: str) -> str:
    if not _USERNAME.match(username or ""):
        raise InvalidParameterError(
            "username: 1–64 characters, letters, digits and . _ @ - (starting with a letter or digit)"
        )
    return username


#: Passwords at the top of every leaked-password list (and their obvious variants, caught by the
#: normalisation in :func:`check_password`): a guesser tries these first.
_COMMON_WORDS = """
password passw0rd p@ssword p@ssw0rd password1 password12 password123 password1234 123456 1234567 12345678
123456789 1234567890 0123456789 qwerty qwertyuiop qwerty123 qwertz asdfgh asdfghjkl zxcvbnm 1q2w3e4r
1q2w3e4r5t 1qaz2wsx abc123 abcdef abcdefgh abcd1234 letmein letmein123 welcome welcome1 welcome123 admin
admin123 admin1234 administrator root toor changeme changeme123 iloveyou monkey dragon football baseball
sunshine princess master shadow superman trustno1 whatever secret secret123 default guest test test123
testtest hospital hospital1 facesym facesym123 pacs pacs123 dicom orthanc radiology doctor nurse
"""
COMMON_PASSWORDS = frozenset(_COMMON_WORDS.split())


def check_password(password: str, username: str = "") -> None:
    """Refuse passwords a guesser tries first: shorter than :data:`MIN_PASSWORD_LENGTH`, on
    :data:`COMMON_PASSWORDS` (ignoring case and trailing digits or symbols), one repeated character, only
    digits, or containing the username. Raises InvalidParameterError saying which rule."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidParameterError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    lowered = password.lower()
    stem = lowered.rstrip("0123456789!@#$%^&*.?-_ ")
    if {lowered, stem, lowered.replace(" ", "")} & COMMON_PASSWORDS:
        raise InvalidParameterError("password is one of the most common passwords: choose another")
    if len(set(password)) <= 2 or password.isdigit():
        raise InvalidParameterError("password is too simple (digits only or one or two characters repeated)")
    if len(username) >= 3 and username.lower() in lowered:
        raise InvalidParameterError("password must not contain the username")


def add_user(
    settings_or_sessions: Any, username: str, password: str, role: str = "viewer", *, update: bool = False
) -> User:
    """Create ``username`` with ``role`` (viewer, operator or admin); with ``update`` an existing user gets
    the new password and role (and all their sessions end). Raises InvalidParameterError on bad input or
    an existing user (without ``update``)."""
    validate_username(username)
    if role not in USER_ROLES:
        raise InvalidParameterError(f"role must be one of {', '.join(USER_ROLES)}, got {role!r}")
    check_password(password, username)
    sessions = _sessions(settings_or_sessions)
    hashed = hash_password(password)
    try:
        with sessions.begin() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is not None and not update:
                raise InvalidParameterError(f"user {username!r} exists (use --update to change it)")
            if user is None:
                user = User(username=username, password_hash=hashed, role=role)
                s.add(user)
                what = f"user {username} added (role {role})"
            else:
                user.password_hash, user.role = hashed, role
                user.session_epoch = (user.session_epoch or 0) + 1
                what = f"user {username} updated (role {role})"
            s.flush()
            s.expunge(user)
    except IntegrityError:
        raise InvalidParameterError(f"user {username!r} exists") from None
    _audit(sessions, settings_or_sessions, what, username)
    return user


def issue_token(settings_or_sessions: Any, username: str) -> str:
    """A new API token for ``username`` (it replaces any earlier one). Returned once; only its hash is
    kept."""
    sessions = _sessions(settings_or_sessions)
    token = new_token()
    with sessions.begin() as s:
        user = s.scalar(select(User).where(User.username == username))
        if user is None:
            raise InvalidParameterError(f"no user {username!r}")
        user.token_hash = token_hash(token)
    _audit(sessions, settings_or_sessions, f"API token issued for {username}", username)
    return token


def list_users(settings_or_sessions: Any) -> list[tuple[str, str, bool]]:
    """(username, role, has an API token) for every user."""
    with _sessions(settings_or_sessions)() as s:
        users = s.scalars(select(User).order_by(User.username))
        return [(u.username, u.role, bool(u.token_hash)) for u in users]
