"""Alembic environment: always driven programmatically by plugin.state with a live connection."""

from __future__ import annotations

from alembic import context

from plugin.schema import metadata

connection = context.config.attributes["connection"]
# Batch mode lets later migrations ALTER tables on SQLite (copy-and-move).
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
