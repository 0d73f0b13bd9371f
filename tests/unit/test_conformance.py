"""The DICOM Conformance Statement matches the code: every SOP class and transfer syntax the SCP accepts
appears in the statement's tables, and every UID in those tables is accepted."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from service.config import Settings
from service.dicom.scp import build_ae

STATEMENT = Path(__file__).resolve().parents[2] / "conformance" / "dicom-conformance-statement.md"


def _table(caption: str) -> set[str]:
    """UIDs in the backticked second column of the table that follows ``caption``."""
    text = STATEMENT.read_text()
    start = text.index(caption)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return {m.group(1) for r in rows if (m := re.search(r"\|\s*`([\d.]+)`\s*\|", r))}


def test_accepted_sop_classes_and_syntaxes_match_the_statement() -> None:
    ae = build_ae(replace(Settings()))
    contexts = {c.abstract_syntax: set(c.transfer_syntax) for c in ae.supported_contexts}
    assert set(contexts) == _table("Table 3.2-1:")
    storage = {uid: ts for uid, ts in contexts.items() if uid != "1.2.840.10008.1.1"}
    syntaxes = _table("Table 3.2-2:")
    for uid, ts in storage.items():
        assert ts == syntaxes, uid
    uncompressed = {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"
    }
    assert contexts["1.2.840.10008.1.1"] == uncompressed


def test_statement_names_the_implementation_and_pdu_size() -> None:
    import pynetdicom

    from service.dicom.scp import MAX_PDU

    text = STATEMENT.read_text()
    assert pynetdicom.PYNETDICOM_IMPLEMENTATION_UID in text
    assert pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION in text
    assert f"{MAX_PDU} bytes" in text
