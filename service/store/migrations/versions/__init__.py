"""Alembic revisions, oldest first: 0001_baseline (the schema create_all made), then one file per change."""
