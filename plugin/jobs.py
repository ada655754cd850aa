"""Service mode's job queue: one task API over two backends, with the `jobs` ledger as the truth.

    submit ──► jobs row (queued) ──► huey message "run job 17" ──► a worker claims it
                                                                  (atomic UPDATE, with a lease)
           ──► pipeline.scan(connector, refs=[ref]) ──► done / failed (+ outcome, timings)

Backends: huey's SqliteHuey (embedded default: a file beside the state, no server) or RedisHuey
(workers on several machines, with PostgreSQL as the shared state). Both carry only job ids.

Why the ledger: huey's dequeue is at-most-once — a worker killed after taking a message loses
it. So the row is written before the message is sent, a worker renews its claim's lease while
it works, and `reap()` sends again the jobs whose lease ran out (worker killed) or whose message
was lost. The claim is one `UPDATE … WHERE status = 'queued' OR lease ran out`, so duplicate
messages are harmless: the second finds nothing to claim. A retried job is applied once because
the pipeline is idempotent (the processing key skips an asset already recorded; connectors
write nothing when the platform already shows the verdict). A job that fails on its asset ends
`failed` with the reason; a job whose worker died `max_attempts` times ends `failed` too.

Job states:  queued ─claim─► running ─► done | failed
                ▲               │ lease ran out (reap) / released (outage, shutdown, error)
                └───────────────┘
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from huey import RedisHuey, SqliteHuey
from huey.api import Huey, TaskWrapper
from sqlalchemy.dialects import postgresql, sqlite

from plugin.models import AssetRef
from plugin.settings import Settings
from plugin.state import StateStore

log = logging.getLogger(__name__)

TASK_NAME = "consentry.run_job"
HUEY_NAME = "consentry"
STAGES = ("fetch", "analyse", "write")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)

# The table of migration 0003_jobs (kept here: only this module reads or writes it).
jobs = sa.Table(
    "jobs", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("connector", sa.String(64), nullable=False),
    sa.Column("asset_id", sa.String(512), nullable=False),
    sa.Column("version", sa.String(256), nullable=False),
    sa.Column("ref", sa.JSON, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(16)),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("lease_until", sa.String(32)),
    sa.Column("worker", sa.String(128)),
    sa.Column("claim", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("enqueued_at", sa.String(32), nullable=False),
    sa.Column("sent_at", sa.String(32)),
    sa.Column("started_at", sa.String(32)),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("fetch_seconds", sa.Float),
    sa.Column("analyse_seconds", sa.Float),
    sa.Column("write_seconds", sa.Float),
)


@dataclass(frozen=True, slots=True)
class JobStat:
    """Jobs of one (connector, status, outcome), with stage latency sums and counts."""

    connector: str
    status: str
    outcome: str | None
    count: int
    fetch_seconds: float
    fetch_count: int
    analyse_seconds: float
    analyse_count: int
    write_seconds: float
    write_count: int


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker holds: only the holder of `token` may renew or finish it."""

    job_id: int
    token: str
    connector: str
    ref: AssetRef
    attempts: int


def stamp(moment: datetime) -> str:
    """Fixed-width ISO-8601 UTC: text order is time order (lease comparisons in SQL)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def now() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


def build_huey(settings: Settings) -> tuple[Huey, TaskWrapper]:
    """The huey instance of the configured backend, with the one task registered.

    The task body is imported lazily: submitting processes (serve, CLI) never load the worker.
    """
    q = settings.queue
    if q.url:
        huey: Huey = RedisHuey(HUEY_NAME, url=q.url, results=False, utc=True)
    else:
        path = settings.resolve(q.path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        huey = SqliteHuey(HUEY_NAME, filename=str(path), results=False, utc=True)
    task = huey.task(name=TASK_NAME)(_run_job)
    return huey, task


def _run_job(job_id: int) -> None:
    from plugin.worker import run_job

    run_job(job_id)


def _insert(dialect: sa.Dialect) -> Any:
    return (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(jobs)


class JobQueue:
    """Submit, claim, finish and reap jobs; `depth()` and `summary()` for health and metrics."""

    def __init__(self, settings: Settings, state: StateStore, *,
                 huey: tuple[Huey, TaskWrapper] | None = None) -> None:
        self.settings = settings
        self.engine = state.engine
        self.huey, self._task = huey or build_huey(settings)
        self.lease = timedelta(seconds=settings.queue.lease_seconds)
        self.max_attempts = settings.queue.max_attempts

    @classmethod
    def open(cls, settings: Settings, state: StateStore) -> JobQueue:
        return cls(settings, state)

    def close(self) -> None:
        close = getattr(self.huey.storage, "close", None)
        if close is not None:
            close()

    # -- submitting ----------------------------------------------------------------------
    def submit(self, connector: str, refs: Sequence[AssetRef], *, source: str) -> int:
        """Queue one job per ref; durable (committed) before it returns; the number of new jobs.

        An asset that already has a queued or running job gets no second one (the database's
        unique index decides, so concurrent submitters agree); a queued job takes the newer
        version of its asset.
        """
        at = stamp(now())
        new: list[int] = []
        with self.engine.begin() as conn:
            for ref in refs:
                values = {"ref": ref.model_dump(mode="json"), "version": ref.version,
                          "source": source}
                conn.execute(jobs.update().where(
                    jobs.c.connector == connector, jobs.c.asset_id == ref.id,
                    jobs.c.status == JobStatus.QUEUED.value, jobs.c.version != ref.version,
                ).values(**values))
                row = conn.execute(
                    _insert(conn.dialect).values(
                        connector=connector, asset_id=ref.id, status=JobStatus.QUEUED.value,
                        attempts=0, enqueued_at=at, sent_at=at, **values,
                    ).on_conflict_do_nothing().returning(jobs.c.id)
                ).first()
                if row is not None:
                    new.append(row.id)
        for job_id in new:
            self.send(job_id)
        return len(new)

    def send(self, job_id: int, *, delay: float = 0) -> bool:
        """Put a message for the job on the task queue; a failure leaves it to the reaper."""
        try:
            if delay > 0:
                self._task.schedule(args=(job_id,), delay=delay)
            else:
                self._task(job_id)
        except Exception as err:  # Redis down: the row is durable, reap() sends it later
            log.warning("job %d queued but not sent (%s); the reaper sends it again",
                        job_id, type(err).__name__)
            return False
        return True

    # -- working (called in the worker) -------------------------------------------------
    def _claimable(self, at: str) -> sa.ColumnElement[bool]:
        return sa.or_(jobs.c.status == JobStatus.QUEUED.value,
                      sa.and_(jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_until < at))

    def claim(self, job_id: int, *, worker: str | None = None) -> Claim | None:
        """Take the job if it is waiting (or its lease ran out); None when someone else has it,
        it is finished, or its workers died too often (then it ends `failed`)."""
        moment = now()
        at, token = stamp(moment), secrets.token_hex(16)
        with self.engine.begin() as conn:
            taken = conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.attempts < self.max_attempts, self._claimable(at),
            ).values(status=JobStatus.RUNNING.value, attempts=jobs.c.attempts + 1,
                     lease_until=stamp(moment + self.lease), worker=worker or worker_name(),
                     claim=token, started_at=at)).rowcount
            if taken != 1:
                conn.execute(jobs.update().where(
                    jobs.c.id == job_id, jobs.c.attempts >= self.max_attempts,
                    self._claimable(at),
                ).values(status=JobStatus.FAILED.value, outcome="failed", finished_at=at,
                         lease_until=None, claim=None,
                         error=sa.func.coalesce(jobs.c.error, "") + sa.literal(
                             f" (gave up after {self.max_attempts} attempts)")))
                return None
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
        return Claim(job_id, token, row.connector, AssetRef.model_validate(row.ref),
                     row.attempts)

    def _mine(self, claim: Claim) -> tuple[sa.ColumnElement[bool], ...]:
        return (jobs.c.id == claim.job_id, jobs.c.claim == claim.token,
                jobs.c.status == JobStatus.RUNNING.value)

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(*self._mine(claim)).values(
                lease_until=stamp(now() + self.lease))).rowcount == 1

    def finish(self, claim: Claim, *, outcome: str, error: str | None = None,
               timings: Mapping[str, float] | None = None) -> bool:
        """Record the end; `failed` when the pipeline failed the asset. False when the lease
        was lost meanwhile (another worker has the job; its result counts)."""
        timings = timings or {}
        status = JobStatus.FAILED if outcome == "failed" else JobStatus.DONE
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(*self._mine(claim)).values(
                status=status.value, outcome=outcome, error=error, finished_at=stamp(now()),
                lease_until=None, claim=None,
                **{f"{s}_seconds": timings.get(s) for s in STAGES})).rowcount == 1
        if not done:
            log.warning("job %d: lease lost before the end; the result of its new holder counts",
                        claim.job_id)
        return done

    def release(self, claim: Claim, *, error: str, delay: float = 0,
                counts: bool = True) -> bool:
        """Give the job back to the queue (platform down, shutdown, unexpected error) and send
        it again after `delay`. An attempt that `counts` brings `max_attempts` closer."""
        send_at = now() + timedelta(seconds=delay)
        with self.engine.begin() as conn:
            released = conn.execute(jobs.update().where(*self._mine(claim)).values(
                status=JobStatus.QUEUED.value, lease_until=None, claim=None,
                error=error[:2000], sent_at=stamp(send_at),
                attempts=jobs.c.attempts - (0 if counts else 1))).rowcount == 1
        if released:
            self.send(claim.job_id, delay=delay)
        return released

    # -- looking after -------------------------------------------------------------------
    def reap(self) -> int:
        """Send again the jobs whose worker died (lease ran out) and the queued jobs whose
        message was lost; end `failed` the jobs whose workers died `max_attempts` times.
        Safe to run in several processes at once: each row moves once. Returns jobs resent."""
        moment = now()
        at = stamp(moment)
        resend: list[int] = []
        with self.engine.begin() as conn:
            expired = conn.execute(sa.select(jobs.c.id, jobs.c.attempts).where(
                jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_until < at)).all()
            for job_id, attempts in expired:
                where = (jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING.value,
                         jobs.c.lease_until < at)
                if attempts >= self.max_attempts:
                    conn.execute(jobs.update().where(*where).values(
                        status=JobStatus.FAILED.value, outcome="failed", finished_at=at,
                        lease_until=None, claim=None,
                        error=f"the worker stopped during each of {attempts} attempts"))
                    log.warning("job %d failed: its worker stopped %d times", job_id, attempts)
                    continue
                moved = conn.execute(jobs.update().where(*where).values(
                    status=JobStatus.QUEUED.value, lease_until=None, claim=None, sent_at=at,
                    error="the worker stopped before the end (lease ran out)")).rowcount
                if moved:
                    resend.append(job_id)
        # A queued job whose message was lost (taken by a worker killed before its claim,
        # lost with the queue's storage) waits forever: send again when nothing is pending,
        # or, with a backlog, when it has waited far longer than a lease.
        grace = self.lease if self._pending() == 0 else self.lease * 12
        cutoff = stamp(moment - grace)
        with self.engine.begin() as conn:
            lost = conn.execute(sa.select(jobs.c.id).where(
                jobs.c.status == JobStatus.QUEUED.value, jobs.c.sent_at < cutoff)).scalars().all()
            for job_id in lost:
                if conn.execute(jobs.update().where(
                        jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED.value,
                        jobs.c.sent_at < cutoff).values(sent_at=at)).rowcount:
                    resend.append(job_id)
        for job_id in resend:
            self.send(job_id)
        if resend:
            log.info("reaper sent %d job(s) again", len(resend))
        return len(resend)

    def _pending(self) -> int:
        try:
            return int(self.huey.pending_count())
        except Exception:  # the queue's storage unreachable: assume a backlog, resend less
            return 1

    def depth(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        with self.engine.connect() as conn:
            for status, n in conn.execute(sa.select(jobs.c.status, sa.func.count())
                                          .group_by(jobs.c.status)):
                counts[status] = n
        return counts

    def summary(self) -> list[JobStat]:
        c = jobs.c
        columns: list[Any] = [c.connector, c.status, c.outcome, sa.func.count()]
        for s in STAGES:
            col = c[f"{s}_seconds"]
            columns += [sa.func.coalesce(sa.func.sum(col), 0.0), sa.func.count(col)]
        query = sa.select(*columns).group_by(c.connector, c.status, c.outcome).order_by(
            c.connector, c.status, c.outcome)
        with self.engine.connect() as conn:
            return [JobStat(*(row[:4]), *(float(v) if i % 2 == 0 else int(v)
                                          for i, v in enumerate(row[4:])))
                    for row in conn.execute(query)]

    def jobs(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Ledger rows (tests, `consentry status`), oldest first."""
        query = sa.select(jobs).order_by(jobs.c.id)
        if status is not None:
            query = query.where(jobs.c.status == status)
        with self.engine.connect() as conn:
            return [row._asdict() for row in conn.execute(query)]
