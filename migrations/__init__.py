"""Alembic revisions: the only way the schema changes. Apply with `trainyard db upgrade`."""
