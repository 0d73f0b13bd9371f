"""Media adapters: decode videos, stills and DICOM objects into RGB frames; encode H.264."""
