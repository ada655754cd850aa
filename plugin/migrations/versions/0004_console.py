"""Admin console: administrator accounts (argon2 hashes only, never a password).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("last_login_at", sa.String(32)),
        # A logout (or a password change) ends every session started before this moment:
        # signed cookies cannot be revoked one by one.
        sa.Column("sessions_after", sa.Float, nullable=False, server_default="0"),
    )
