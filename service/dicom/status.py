"""DIMSE status codes the storage SCP answers with (PS3.4 Annex B.2.3 and PS3.7 Annex C).

Failures in the 0xA7xx range ask the sender to try again later; 0xA9xx and 0xCxxx mean the object
itself is wrong and a resend of the same bytes will fail the same way.
"""

from __future__ import annotations

#: Success.
SUCCESS = 0x0000
#: Refused: Out of Resources (PS3.4 B.2.3, A7xx): disk reserve reached, database or disk unavailable.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (PS3.4 B.2.3, A9xx): the data set's SOP Class/Instance UID
#: differs from the C-STORE request's Affected SOP Class/Instance UID.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: Cannot understand (PS3.4 B.2.3, Cxxx): unreadable data set, required UIDs missing or malformed.
CANNOT_UNDERSTAND = 0xC000
#: Cannot understand, sub-code pynetdicom itself answers with when a handler raises (still a Cxxx).
HANDLER_EXCEPTION = 0xC211
#: Failure: Duplicate SOP Instance (PS3.7 C.4.2): same SOP Instance UID, other bytes, policy "reject".
DUPLICATE_SOP_INSTANCE = 0x0111
#: Failure: Processing failure (PS3.7 C.4.1): an unexpected error while storing.
PROCESSING_FAILURE = 0x0110
#: Refused: SOP Class not supported (PS3.7 C.5.2); normally never sent, negotiation refuses first.
SOP_CLASS_NOT_SUPPORTED = 0x0122

NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    HANDLER_EXCEPTION: "Error: Cannot understand (handler exception)",
    DUPLICATE_SOP_INSTANCE: "Failure: Duplicate SOP Instance",
    PROCESSING_FAILURE: "Failure: Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP Class not supported",
}


def describe(code: int) -> str:
    """A readable name for a status code (ranges included), for logs and test messages."""
    if code in NAMES:
        return NAMES[code]
    for base, name in ((0xA700, OUT_OF_RESOURCES), (0xA900, DATASET_DOES_NOT_MATCH_SOP_CLASS)):
        if code & 0xFF00 == base:
            return NAMES[name]
    if code & 0xF000 == 0xC000:
        return NAMES[CANNOT_UNDERSTAND]
    return f"status 0x{code:04X}"
