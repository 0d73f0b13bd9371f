"""Durable storage: the SQL database (SQLAlchemy 2) and the file store of received DICOM objects."""
