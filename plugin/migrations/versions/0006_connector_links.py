"""Connector links: the records a connector created on its platform (Immich people and faces),
shared by every worker on every machine (they lived in a links.json per machine before).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The platform person Consentry created for a subject: ids only, never the name.
    op.create_table(
        "connector_people",
        sa.Column("connector", sa.String(64), primary_key=True),
        sa.Column("subject_id", sa.String(36), primary_key=True),
        sa.Column("person_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    # A face Consentry created (created=true) or took over (previous = the person it had).
    op.create_table(
        "connector_faces",
        sa.Column("connector", sa.String(64), primary_key=True),
        sa.Column("asset_id", sa.Text, primary_key=True),
        sa.Column("face_id", sa.Text, primary_key=True),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("created", sa.Boolean, nullable=False),
        sa.Column("previous", sa.Text),
        sa.Index("ix_connector_faces_subject", "connector", "subject_id"),
    )


def downgrade() -> None:
    op.drop_table("connector_faces")
    op.drop_table("connector_people")
