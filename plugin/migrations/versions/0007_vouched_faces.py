"""Same-run corroboration: which face vouched for a face's name (plugin/corroboration.py).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `<connector>:<asset id>#<index>` of the anchor face; NULL for the matcher's own names.
    with op.batch_alter_table("faces") as batch:
        batch.add_column(sa.Column("vouched_by", sa.Text))
        batch.create_index("ix_faces_vouched", ["vouched_by"])


def downgrade() -> None:
    with op.batch_alter_table("faces") as batch:
        batch.drop_index("ix_faces_vouched")
        batch.drop_column("vouched_by")
