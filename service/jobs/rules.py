"""Which task does a received instance show? Configurable regular expressions over its text fields."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: The text fields the rules look at (DICOM keywords), in this order.
RULE_FIELDS = ("SeriesDescription", "ProtocolName", "ImageComments", "PerformedProcedureStepDescription")


def assign_task(texts: Iterable[str], rules: Sequence[tuple[str, str]]) -> str | None:
    """The first rule (task, pattern) whose pattern matches any text (case-insensitive), else None (auto).

    Tasks are "smile", "eye_closure", "brow_raise" or "rest" (a rest photo or clip).
    """
    joined = [t for t in texts if t]
    for task, pattern in rules:
        rx = re.compile(pattern, re.IGNORECASE)
        if any(rx.search(t) for t in joined):
            return task
    return None
