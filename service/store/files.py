"""The file store of received DICOM objects: atomic, durable placement under UID-named folders.

Layout, relative to the store root::

    <study_uid>/<series_uid>/<sop_uid>.dcm          version 1
    <study_uid>/<series_uid>/<sop_uid>.v<N>.dcm     version N > 1
    .incoming/                                      temporary files, same filesystem as the store

A file becomes visible under its final name only complete and on disk: :meth:`FileStore.place` fsyncs
the file, renames it into place (``os.replace``, atomic on one filesystem) and fsyncs the directory,
so a C-STORE can be acknowledged as soon as the database row is committed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from service.errors import InvalidParameterError

log = logging.getLogger(__name__)

# PS3.5 9.1: UIDs are digits and dots, at most 64 characters, components without leading zeros are
# preferred but not enforced here (senders get that wrong; the path stays safe either way).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"


class UnsafeUidError(InvalidParameterError):
    """A UID that cannot name a file: it is empty, too long or holds something besides digits and dots."""


def check_uid(value: str, name: str = "uid") -> str:
    """Return ``value`` when it is safe as a path part (PS3.5 9.1 UID syntax), else raise UnsafeUidError.

    Parameters
    ----------
    value
        The UID as read from the object (pydicom already strips the trailing NUL/space padding).
    name
        What the UID is (e.g. "StudyInstanceUID"), for the error message.
    """
    if not isinstance(value, str) or not value or len(value) > 64 or not _UID.match(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise UnsafeUidError(f"{name} is not a valid UID (digits and dots, at most 64 characters): {shown!r}")
    return value


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str, version: int = 1) -> str:
    """The store-relative path of one object version (POSIX separators, as kept in the database)."""
    if version < 1:
        raise InvalidParameterError(f"version must be >= 1, got {version}")
    check_uid(study_uid, "StudyInstanceUID")
    check_uid(series_uid, "SeriesInstanceUID")
    check_uid(sop_uid, "SOPInstanceUID")
    name = f"{sop_uid}.dcm" if version == 1 else f"{sop_uid}.v{version}.dcm"
    return f"{study_uid}/{series_uid}/{name}"


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (any descriptor of the inode will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Received DICOM files under ``root``; see the module docstring for the layout.

    Parameters
    ----------
    root
        The store's folder (``Settings.files_dir``); created with its ``.incoming`` folder if missing.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._incoming = self.root / INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def incoming_dir(self) -> Path:
        """Folder for temporary files: on the store's filesystem, so :meth:`place` is a rename."""
        return self._incoming

    def new_incoming(self, suffix: str = ".dcm") -> Path:
        """Create an empty, uniquely named temporary file in :meth:`incoming_dir` and return its path."""
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self._incoming)
        os.close(fd)
        return Path(name)

    def adopt(self, path: Path) -> Path:
        """Bring a file written elsewhere (e.g. pynetdicom's temp dir) into :meth:`incoming_dir`.

        A hard link when ``path`` is on the store's filesystem (no copy: the caller may then delete
        its own name), else a streamed copy. ``path`` itself is left untouched.
        """
        dest = self.new_incoming()
        dest.unlink()
        try:
            os.link(path, dest)
        except OSError:  # another filesystem (EXDEV) or one without hard links
            shutil.copyfile(path, dest)
        return dest

    def abspath(self, rel: str) -> Path:
        """The absolute path of a store-relative path; refuses anything that escapes the root."""
        path = (self.root / rel).resolve()
        if path == self.root or self.root not in path.parents:
            raise InvalidParameterError(f"path {rel!r} is outside the file store")
        return path

    def place(self, tmp_path: Path, rel: str) -> Path:
        """Move ``tmp_path`` (a file under :meth:`incoming_dir`) to ``rel`` durably and return the new path.

        fsync the file, ``os.replace`` it into place, fsync the target directory. An existing file at
        ``rel`` is replaced: callers keep one writer per SOP Instance (see store.ingest), so one there
        can only be a leftover of a crash between placing and committing.
        """
        tmp_path = Path(tmp_path).resolve()
        if tmp_path.parent != self._incoming:
            raise InvalidParameterError(f"place() takes files from {self._incoming}, got {tmp_path}")
        target = self.abspath(rel)
        fsync_file(tmp_path)
        created = not target.parent.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            log.warning("replacing an unreferenced leftover file at %s", rel)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
        if created:  # new study/series folders: their entries must be durable too
            fsync_dir(target.parent.parent)
            fsync_dir(target.parent.parent.parent)
        return target

    def place_many(self, moves: list[tuple[Path, str]], synced: bool = False) -> list[Path]:
        """:meth:`place` for several files at once, with one fsync per directory instead of one per file.

        Parameters
        ----------
        moves
            ``(tmp_path, rel)`` pairs, as for :meth:`place`.
        synced
            True when the caller has fsynced every ``tmp_path`` already (their data is on disk); else
            each is fsynced here before its rename.

        Returns
        -------
        list[Path]
            The new paths, in the order of ``moves``. On an error the files already renamed stay where
            they are (the caller takes them back, as after a failed commit).
        """
        targets: list[Path] = []
        dirs: dict[Path, None] = {}  # ordered set: every target's folder, then the new folders' parents
        created: dict[Path, None] = {}
        for tmp_path, rel in moves:
            tmp_path = Path(tmp_path).resolve()
            if tmp_path.parent != self._incoming:
                raise InvalidParameterError(f"place() takes files from {self._incoming}, got {tmp_path}")
            target = self.abspath(rel)
            if not synced:
                fsync_file(tmp_path)
            if not target.parent.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                created[target.parent] = None
            elif target.exists():
                log.warning("replacing an unreferenced leftover file at %s", rel)
            os.replace(tmp_path, target)
            targets.append(target)
            dirs[target.parent] = None
        for folder in created:  # new study/series folders: their entries must be durable too
            dirs[folder.parent] = None
            dirs[folder.parent.parent] = None
        for folder in dirs:
            fsync_dir(folder)
        return targets

    def remove(self, rel: str) -> None:
        """Delete a placed file (used when the database commit that would reference it fails)."""
        path = self.abspath(rel)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def free_mb(self) -> float:
        """Free space on the store's filesystem, in MiB (what an unprivileged process may use)."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def clean_incoming(self, max_age_s: float = 3600.0) -> int:
        """Delete temporary files older than ``max_age_s`` (left by a crash mid-transfer); return how many."""
        cutoff = time.time() - max_age_s
        removed = 0
        for entry in self._incoming.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d stale temporary file(s) from %s", removed, self._incoming)
        return removed
