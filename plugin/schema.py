"""Tables of the state database (SQLAlchemy Core). Migrations in plugin/migrations build them.

No vectors anywhere here, and a person's name only in `subjects` (DESIGN §6). Times are stored
as ISO-8601 UTC text so SQLite and PostgreSQL agree.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

subjects = sa.Table(
    "subjects",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("birth_date", sa.String(10)),
    sa.Column("minor", sa.Boolean, nullable=False, default=False),
    sa.Column("external_ids", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.String(32), nullable=False),
)

consents = sa.Table(
    "consents",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("subject_id", sa.String(36), sa.ForeignKey("subjects.id"), nullable=False),
    sa.Column("document_ref", sa.Text, nullable=False),
    sa.Column("document_sha256", sa.String(64), nullable=False),
    sa.Column("signed_at", sa.String(32), nullable=False),
    sa.Column("signed_by", sa.Text),
    sa.Column("guardian", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("consent_id", sa.String(36), sa.ForeignKey("consents.id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("channels", sa.JSON, nullable=False, default=list),
    sa.Column("valid_from", sa.String(32), nullable=False),
    sa.Column("valid_until", sa.String(32)),
    sa.Column("withdrawn_at", sa.String(32)),
)

assets = sa.Table(
    "assets",
    metadata,
    sa.Column("connector", sa.String(64), primary_key=True),
    sa.Column("asset_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    # Cheap change indicator from the connector (size:mtime, etag): equal = version still holds.
    sa.Column("fingerprint", sa.Text),
    # (version, engine version, policy version) hashed: unchanged key = nothing to do.
    sa.Column("processing_key", sa.String(64)),
    sa.Column("stored_width", sa.Integer),
    sa.Column("stored_height", sa.Integer),
    sa.Column("orientation", sa.Integer),
    sa.Column("status", sa.String(16)),
    # Fingerprint of the verdict written last (ids, not names): equal = skip write-back.
    sa.Column("verdict_fingerprint", sa.String(64)),
    sa.Column("needs_analysis", sa.Boolean, nullable=False, default=False),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.String(32), nullable=False),
)

faces = sa.Table(
    "faces",
    metadata,
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
    sa.Column("candidates", sa.JSON, nullable=False, default=list),
    sa.Column("region_written", sa.Boolean, nullable=False, default=False),
    sa.Column("vouched_by", sa.Text),
    sa.Index("ix_faces_asset", "connector", "asset_id"),
    sa.Index("ix_faces_subject", "subject_id"),
    sa.Index("ix_faces_vouched", "vouched_by"),
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("connector", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    # Pseudonymous references only: subject ids, asset ids; never names.
    sa.Column("subject_id", sa.String(36)),
    sa.Column("asset", sa.Text),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("prev_mac", sa.String(64), nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)

# Resumable erasure (Art. 17): one row per subject being erased; ids and counts only, never
# the name, so an interrupted erasure leaves nothing personal behind in this table.
erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("subject_id", sa.String(36), primary_key=True),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("assets", sa.JSON, nullable=False, default=list),
    sa.Column("foreign_name_assets", sa.JSON, nullable=False, default=list),
    sa.Column("templates_destroyed", sa.Integer, nullable=False, default=0),
    sa.Column("consents_deleted", sa.Integer, nullable=False, default=0),
    sa.Column("finished_at", sa.String(32)),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
