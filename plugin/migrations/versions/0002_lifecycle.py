"""Consent lifecycle: erasure progress (resumable), key/value meta (last sweep).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("subject_id", sa.String(36), primary_key=True),
        sa.Column("started_at", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("assets", sa.JSON, nullable=False),
        sa.Column("foreign_name_assets", sa.JSON, nullable=False),
        sa.Column("templates_destroyed", sa.Integer, nullable=False),
        sa.Column("consents_deleted", sa.Integer, nullable=False),
        sa.Column("finished_at", sa.String(32)),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
