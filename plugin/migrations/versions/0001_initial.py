"""Initial state schema: subjects, consents, grants, assets, faces, cursors, audit.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subjects",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("birth_date", sa.String(10)),
        sa.Column("minor", sa.Boolean, nullable=False),
        sa.Column("external_ids", sa.JSON, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "consents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("subject_id", sa.String(36), sa.ForeignKey("subjects.id"), nullable=False),
        sa.Column("document_ref", sa.Text, nullable=False),
        sa.Column("document_sha256", sa.String(64), nullable=False),
        sa.Column("signed_at", sa.String(32), nullable=False),
        sa.Column("signed_by", sa.Text),
        sa.Column("guardian", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "grants",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("consent_id", sa.String(36), sa.ForeignKey("consents.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("channels", sa.JSON, nullable=False),
        sa.Column("valid_from", sa.String(32), nullable=False),
        sa.Column("valid_until", sa.String(32)),
        sa.Column("withdrawn_at", sa.String(32)),
    )
    op.create_table(
        "assets",
        sa.Column("connector", sa.String(64), primary_key=True),
        sa.Column("asset_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text),
        sa.Column("processing_key", sa.String(64)),
        sa.Column("stored_width", sa.Integer),
        sa.Column("stored_height", sa.Integer),
        sa.Column("orientation", sa.Integer),
        sa.Column("status", sa.String(16)),
        sa.Column("verdict_fingerprint", sa.String(64)),
        sa.Column("needs_analysis", sa.Boolean, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "faces",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("connector", sa.String(64), nullable=False),
        sa.Column("asset_id", sa.Text, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("top", sa.Integer, nullable=False),
        sa.Column("right", sa.Integer, nullable=False),
        sa.Column("bottom", sa.Integer, nullable=False),
        sa.Column("left", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("subject_id", sa.String(36)),
        sa.Column("distance", sa.Float),
        sa.Column("candidates", sa.JSON, nullable=False),
        sa.Column("region_written", sa.Boolean, nullable=False),
    )
    op.create_index("ix_faces_asset", "faces", ["connector", "asset_id"])
    op.create_index("ix_faces_subject", "faces", ["subject_id"])
    op.create_table(
        "cursors",
        sa.Column("connector", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(36)),
        sa.Column("asset", sa.Text),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_mac", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
