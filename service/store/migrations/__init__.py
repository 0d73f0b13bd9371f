"""Alembic migrations of the FaceSym database (configured in code: see service.store.schema)."""
