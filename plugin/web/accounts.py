"""Administrator accounts: usernames and argon2id hashes in the state database (`admin_users`).

Verification always runs one argon2 check, also for an unknown username, so timing does not
tell which usernames exist. Hashes are upgraded on login when the parameters change.
"""

from __future__ import annotations

import re
import time

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from plugin.errors import ConsentryError
from plugin.state import StateStore, now_utc

_meta = sa.MetaData()
admin_users = sa.Table(
    "admin_users", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("last_login_at", sa.String(32)),
    sa.Column("sessions_after", sa.Float, nullable=False),
)

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD = 12


class AccountError(ConsentryError):
    """An account cannot be created or changed (the message says why; never the password)."""


class Accounts:
    def __init__(self, state: StateStore, *, hasher: PasswordHasher | None = None) -> None:
        self._engine = state.engine
        self._hasher = hasher or PasswordHasher()
        self._dummy = self._hasher.hash("consentry-no-such-user")

    def create(self, username: str, password: str, *, replace: bool = False) -> None:
        """Add an admin (or set a new password with `replace`, ending its sessions)."""
        username = username.strip().lower()
        if not USERNAME.match(username):
            raise AccountError("username: 2-64 characters a-z 0-9 . _ -")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"password: at least {MIN_PASSWORD} characters")
        values = {"password_hash": self._hasher.hash(password), "sessions_after": time.time()}
        with self._engine.begin() as conn:
            exists = conn.execute(sa.select(admin_users.c.id).where(
                admin_users.c.username == username)).first()
            if exists and not replace:
                raise AccountError(f"admin {username} exists (use --replace to set a new password)")
            if exists:
                conn.execute(admin_users.update().where(
                    admin_users.c.username == username).values(**values))
            else:
                conn.execute(admin_users.insert().values(
                    username=username, created_at=now_utc().isoformat(), **values))

    def usernames(self) -> list[str]:
        with self._engine.connect() as conn:
            return list(conn.execute(sa.select(admin_users.c.username)
                                     .order_by(admin_users.c.username)).scalars())

    def verify(self, username: str, password: str) -> str | None:
        """The canonical username when the password is right, else None."""
        username = username.strip().lower()
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(admin_users.c.password_hash).where(
                admin_users.c.username == username)).first()
        try:
            self._hasher.verify(row.password_hash if row else self._dummy, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        with self._engine.begin() as conn:
            values: dict[str, object] = {"last_login_at": now_utc().isoformat()}
            if self._hasher.check_needs_rehash(row.password_hash):
                values["password_hash"] = self._hasher.hash(password)
            conn.execute(admin_users.update().where(
                admin_users.c.username == username).values(**values))
        return username

    def session_valid(self, username: str, login_at: float) -> bool:
        with self._engine.connect() as conn:
            after = conn.execute(sa.select(admin_users.c.sessions_after).where(
                admin_users.c.username == username)).scalar()
        return after is not None and login_at > after

    def end_sessions(self, username: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(admin_users.update().where(
                admin_users.c.username == username).values(sessions_after=time.time()))
