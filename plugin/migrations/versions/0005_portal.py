"""Consent portal: invitations (signed links, single use) and expiry alerts sent once.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "invitations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("channels", sa.JSON, nullable=False),  # channels asked for
        sa.Column("valid_days", sa.Integer),  # requested consent duration
        sa.Column("guardian", sa.Boolean, nullable=False, server_default=sa.false()),
        # Whether the person is also asked for biometric consent (recognition + selfie).
        sa.Column("biometric", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_by", sa.String(64)),  # admin user name (an account, not a subject)
        sa.Column("lang", sa.String(8), nullable=False, server_default="en"),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=False),
        sa.Column("used_at", sa.String(32)),
        sa.Column("consent_id", sa.String(36)),  # the consent it produced
        sa.Column("request_sha256", sa.String(64)),
        sa.Index("ix_invitations_subject", "subject_id"),
    )
    op.create_table(
        "expiry_alerts",
        sa.Column("consent_id", sa.String(36), primary_key=True),
        sa.Column("sent_at", sa.String(32), nullable=False),
        sa.Column("ends_at", sa.String(32)),  # earliest end of the consent's expiring grants
        sa.Column("mailed", sa.Boolean, nullable=False, server_default=sa.false()),
    )
