"""FaceSym: facial-palsy analysis for PACS (DICOM in, scores out)."""

__version__ = "0.1.0"
