"""Reports built from domain objects: JSON now; DICOM SR, figures, PDF and FHIR in later issues."""
