"""Service mode: the durable job ledger behind the task queue.

The task engine (huey) only carries job ids; this table is the truth (plugin/jobs.py). A
worker claims a job with a lease; a job whose lease ran out (worker killed) or whose message
was lost is sent again by the reaper, and the claim is atomic, so a job is applied once.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("connector", sa.String(64), nullable=False),
        sa.Column("asset_id", sa.String(512), nullable=False),
        sa.Column("version", sa.String(256), nullable=False),
        sa.Column("ref", sa.JSON, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),  # poll | webhook | manual
        sa.Column("status", sa.String(16), nullable=False),  # queued | running | done | failed
        sa.Column("outcome", sa.String(16)),  # processed | skipped | failed
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_until", sa.String(32)),
        sa.Column("worker", sa.String(128)),  # host:pid of the claim (kept after the end)
        sa.Column("claim", sa.String(64)),  # token of the current claim: a stale worker's
        # late result (lease lost, job claimed again) changes nothing
        sa.Column("error", sa.Text),
        sa.Column("enqueued_at", sa.String(32), nullable=False),
        sa.Column("sent_at", sa.String(32)),
        sa.Column("started_at", sa.String(32)),
        sa.Column("finished_at", sa.String(32)),
        sa.Column("fetch_seconds", sa.Float),
        sa.Column("analyse_seconds", sa.Float),
        sa.Column("write_seconds", sa.Float),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_asset", "jobs", ["connector", "asset_id"])
    # At most one waiting or running job per asset, enforced by the database: two submitters
    # (a poller and a webhook, in different processes) cannot both add one.
    active = sa.text("status IN ('queued', 'running')")
    op.create_index("ux_jobs_active", "jobs", ["connector", "asset_id"], unique=True,
                    sqlite_where=active, postgresql_where=active)
