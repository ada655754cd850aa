"""Fixtures for the servers of the distributed mode: PostgreSQL and Redis.

scripts/test starts private servers (scripts/services.sh) and exports
CONSENTRY_TEST_POSTGRES_URL (an admin URL) and CONSENTRY_TEST_REDIS_URL. Without them the tests
that need a server skip with the reason; with CONSENTRY_REQUIRE_SERVICES=1 (set by scripts/test,
which started them) they fail instead, so a CI run cannot pass by silently skipping them.

`postgres_url` is a fresh database per test (dropped afterwards, even with connections still
open), so tests never see each other's rows. `redis_url` is the test Redis database, emptied
before and after each test. Admin URLs carry a password: they go into no message here
(SQLAlchemy's URL repr hides it, and errors name host and port only).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "CONSENTRY_TEST_POSTGRES_URL"
REDIS_ENV = "CONSENTRY_TEST_REDIS_URL"
REQUIRE_ENV = "CONSENTRY_REQUIRE_SERVICES"


def services_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _unavailable(why: str) -> None:
    """Skip, or fail when the run promised the servers (CONSENTRY_REQUIRE_SERVICES=1)."""
    if services_required():
        pytest.fail(f"{why} ({REQUIRE_ENV}=1: the servers must be there)", pytrace=False)
    pytest.skip(f"{why}; `source scripts/services.sh` starts private servers")


def postgres_admin_url() -> sa.URL:
    """The admin URL as a SQLAlchemy URL with the psycopg (v3) driver."""
    raw = os.environ.get(POSTGRES_ENV, "")
    if not raw:
        _unavailable(f"PostgreSQL not configured: {POSTGRES_ENV} is not set")
    try:
        url = sa.make_url(raw)
    except sa.exc.ArgumentError:
        _unavailable(f"{POSTGRES_ENV} is not a valid database URL")
    if url.get_backend_name() != "postgresql":
        _unavailable(f"{POSTGRES_ENV} is not a PostgreSQL URL")
    return url.set(drivername="postgresql+psycopg")


def _where(url: sa.URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, as a `postgresql+psycopg://` URL."""
    admin = postgres_admin_url()
    name = f"consentry_test_{secrets.token_hex(6)}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as err:
        engine.dispose()
        _unavailable(
            f"PostgreSQL at {_where(admin)} does not answer"
            f" ({type(err.orig).__name__ if err.orig else 'error'})"
        )
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database (redis://host:port/db), empty at the start and end of the test."""
    import redis

    raw = os.environ.get(REDIS_ENV, "")
    if not raw:
        _unavailable(f"Redis not configured: {REDIS_ENV} is not set")
    client = redis.Redis.from_url(raw)
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    try:
        client.ping()
        client.flushdb()
    except redis.RedisError as err:
        client.close()
        _unavailable(f"Redis at {where} does not answer ({type(err).__name__})")
    try:
        yield raw
    finally:
        try:
            client.flushdb()
        finally:
            client.close()
