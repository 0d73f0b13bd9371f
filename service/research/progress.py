"""Progress of ``facesym analyze`` on stderr: files, frames and labelled stages.

On a terminal a rich progress bar; anywhere else (a pipe, a CI log, ``2> file``) plain lines, few enough
to read: one when a file starts, one per quarter of its frames, one per later stage, one when it ends.
"""

from __future__ import annotations

import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """Report the progress of a run of ``files`` inputs.

    Parameters
    ----------
    stream
        Where to write (stderr).
    files
        How many inputs the run has (a batch: > 1, each line says which one).
    tty
        Draw a live bar (default: whether ``stream`` is a terminal).
    """

    def __init__(self, stream: IO[str], files: int = 1, tty: bool | None = None) -> None:
        self._stream = stream
        self._files = files
        self._tty = stream.isatty() if tty is None else tty
        self._index = 0
        self._name = ""
        self._frames_total: int | None = None
        self._quarter = -1
        self._t0 = 0.0
        self._open = False
        self._bar: Progress | None = None
        self._file_job: Any = None
        self._stage_job: Any = None
        if self._tty:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                transient=True, console=Console(file=stream),
            )
            self._bar.start()
            if files > 1:
                self._file_job = self._bar.add_task("files", total=files)

    # ------------------------------------------------------------------ one input
    def _prefix(self) -> str:
        return f"[{self._index}/{self._files}] {self._name}" if self._files > 1 else self._name

    def _line(self, text: str) -> None:
        if not self._tty:
            print(f"facesym: {self._prefix()}: {text}", file=self._stream, flush=True)

    def begin(self, name: str) -> None:
        """A new input ``name`` (before it is opened: one that cannot be is still counted and named)."""
        self._index += 1
        self._name, self._frames_total, self._quarter, self._t0 = name, None, -1, time.monotonic()
        self._open = True

    def start_file(self, name: str, frames: int | None) -> None:
        """Input ``name`` is open, with ``frames`` frames to decode (None: unknown or a photo)."""
        if not self._open:
            self.begin(name)
        self._frames_total = frames
        if self._bar is not None:
            if self._stage_job is not None:
                self._bar.remove_task(self._stage_job)
            self._stage_job = self._bar.add_task(f"{self._prefix()}: landmarks", total=frames)
        self._line("landmarks" + (f" 0/{frames} frames" if frames else ""))

    def frames(self, done: int) -> None:
        """``done`` frames have been through FaceMesh."""
        if self._bar is not None and self._stage_job is not None:
            self._bar.update(self._stage_job, completed=done)
            return
        total = self._frames_total
        if total:
            quarter = min(4, 4 * done // total)
            if quarter > self._quarter and 0 < quarter < 4:
                self._quarter = quarter
                self._line(f"landmarks {done}/{total} frames")

    def stage(self, name: str) -> None:
        """A later stage (``measuring smile``, ``figures`` …) has started."""
        if self._bar is not None and self._stage_job is not None:
            self._bar.update(self._stage_job, description=f"{self._prefix()}: {name}", total=None)
            return
        self._line(name)

    def end_file(self, outcome: str) -> None:
        """The input is done: ``outcome`` says how (``analysed``, ``not analysable``, ``skipped`` …)."""
        seconds = time.monotonic() - self._t0
        self._open = False
        if self._bar is not None:
            if self._stage_job is not None:
                self._bar.remove_task(self._stage_job)
                self._stage_job = None
            if self._file_job is not None:
                self._bar.update(self._file_job, completed=self._index)
            return
        self._line(f"{outcome} ({seconds:.1f} s)")

    def report_file(self, name: str, what: str) -> None:
        """An input reported whole in one line: skipped (already done), or finished in another process."""
        self._index += 1
        self._name, self._t0 = name, time.monotonic()
        if self._bar is not None:
            if self._file_job is not None:
                self._bar.update(self._file_job, completed=self._index)
            return
        self._line(what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
