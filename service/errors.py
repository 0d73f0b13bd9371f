"""FaceSym's exceptions. Each family maps to one outcome: a CLI exit code, a DIMSE status, a job state."""


class FaceSymError(Exception):
    """Base of every error FaceSym raises on purpose."""

    exit_code = 1


class UnreadableInputError(FaceSymError):
    """The input cannot be decoded at all (not a video, image or supported DICOM object)."""

    exit_code = 2


class LimitExceededError(UnreadableInputError):
    """The input is larger than a decode limit (``service.media.limits``); ``limit`` names the setting."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


class NotAnalysableError(FaceSymError):
    """The input decodes but fails quality control; ``reasons`` says why (never scored)."""

    exit_code = 3

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class InvalidParameterError(FaceSymError, ValueError):
    """A caller passed an argument out of its allowed range; the message names the argument."""
