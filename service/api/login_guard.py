"""Brute-force defence for the console login that cannot be turned into a lock-out.

Before (issue 14, finding 5): five wrong passwords locked the real admin out for five minutes, thirty from
one address locked out everyone behind that proxy, and every failure wrote two audit rows. Now:

* **Known clients are never delayed.** A browser that has logged in as a user gets a signed device
  cookie (``facesym_device``, 90 days); from it, that user's correct password always works, whatever an
  attacker does elsewhere. Its own failures are delayed like any other client's, per device, so a
  stolen cookie is no brute-force licence.
* **Everyone else gets progressive delays, not a lock.** After :data:`FREE_FAILURES` failures for a user
  name from unknown clients, the next attempt for that name must wait 1 s, then 2, 4, … up to
  :data:`MAX_DELAY_S` after the latest failure (counted over :data:`MEMORY_S`); an address gets the same
  after :data:`FREE_FAILURES_PER_ADDRESS`. An attempt made too early is refused with 429 and
  ``Retry-After``, without checking the password, so guessing stays slow while nobody is locked out
  for longer than the delay.
* **The audit trail cannot be flooded.** The first failure of a (user name, address) in a window of
  :data:`AUDIT_WINDOW_S` is recorded as before (a 110114 failure and a 110113 alert); the rest of that
  window's failures and refusals are counted and recorded as ONE 110114 record when the window is over
  (PS3.15 A.5.3 allows aggregating repeated events) — written at the next login request or at shutdown.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

FREE_FAILURES = 3
FREE_FAILURES_PER_ADDRESS = 30
MAX_DELAY_S = 60.0
MEMORY_S = 900.0
AUDIT_WINDOW_S = 60.0
DEVICE_COOKIE = "facesym_device"
DEVICE_MAX_AGE_S = 90 * 24 * 3600


def _delay(excess: int) -> float:
    """Seconds to wait after the latest failure once ``excess`` failures are beyond the free ones."""
    return 0.0 if excess <= 0 else min(MAX_DELAY_S, 2.0 ** (excess - 1))


@dataclass
class _Window:
    started: float
    first_at: float
    count: int = 0  # failures and refusals after the recorded first one


@dataclass
class LoginGuard:
    """Counts failed logins and says how long a client must wait (module docstring)."""

    clock: Callable[[], float] = time.monotonic
    _fails: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)
    _pending: list[tuple[tuple[str, str], _Window]] = field(default_factory=list)  # closed, to report
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails[key]
        while q and now - q[0] > MEMORY_S:
            q.popleft()
        return q

    @staticmethod
    def _keys(username: str, ip: str, device: bool) -> list[tuple[str, int]]:
        name = username.lower()
        if device:
            return [(f"device:{name}", FREE_FAILURES)]
        return [(f"user:{name}", FREE_FAILURES), (f"ip:{ip}", FREE_FAILURES_PER_ADDRESS)]

    def wait_seconds(self, username: str, ip: str, *, device: bool) -> float:
        """How long this client must still wait before its attempt for ``username`` is considered
        (0: go ahead). ``device``: it holds this user's valid device cookie."""
        now = self.clock()
        with self._lock:
            waits = [0.0]
            for key, free in self._keys(username, ip, device):
                q = self._recent(key, now)
                if q:
                    waits.append(q[-1] + _delay(len(q) - free + 1) - now)
            return max(waits)

    def failed(self, username: str, ip: str, *, device: bool) -> None:
        now = self.clock()
        with self._lock:
            for key, _ in self._keys(username, ip, device):
                self._recent(key, now).append(now)

    def succeeded(self, username: str, *, device: bool) -> None:
        """A correct password: that user name (or device) starts afresh."""
        with self._lock:
            self._fails.pop(self._keys(username, "", device)[0][0], None)

    # -- audit aggregation -------------------------------------------------------------------------------
    def audit_failure(self, username: str, ip: str) -> bool:
        """Whether this failure (or refusal) should be recorded on its own: the first of its (user name,
        address) window. Otherwise it is counted for the window's summary (:meth:`due_summaries`)."""
        now = self.clock()
        key = (username.lower(), ip)
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w.started > AUDIT_WINDOW_S:
                if w is not None and w.count:  # the old window's count is reported by due_summaries
                    self._pending.append((key, w))
                self._windows[key] = _Window(now, now)
                return True
            w.count += 1
            return False

    def due_summaries(self, *, all_windows: bool = False) -> list[tuple[str, str, int, float]]:
        """(user name, address, further failures, seconds the window spanned) of every window that is
        over (or, with ``all_windows``, every open one: at shutdown), each reported once."""
        now = self.clock()
        out = []
        with self._lock:
            pending, self._pending = self._pending, []
            for key, w in list(self._windows.items()):
                if all_windows or now - w.started > AUDIT_WINDOW_S:
                    del self._windows[key]
                    pending.append((key, w))
            for (name, ip), w in pending:
                if w.count:
                    out.append((name, ip, w.count, max(0.0, now - w.first_at)))
        return out
