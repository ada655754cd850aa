"""The worker side of the job queue: a huey consumer whose task runs one job of plugin/jobs.py.

Each worker process (or thread) opens its own App once, from the config file, when it starts
(models loaded; engine.workers forced to 1: the worker processes are the parallelism), and
closes it when the consumer stops. While a job runs, a heartbeat thread renews its lease every
third of a lease, so only a worker that is really gone (killed, frozen, cut off) loses its job
to the reaper. dlib holds the GIL while it detects, which pauses that thread:
`queue.lease_seconds` must stay well above the analysis of the largest photo (seconds; the
default is five minutes). A worker that loses its lease anyway only wastes work: its late result
is ignored, and the pipeline's processing key makes the second run a skip.

Stopping: `consentry worker` treats SIGTERM as graceful (huey's graceful signal): no new job is
taken, running jobs get `service.shutdown_grace` seconds to finish; after that they are
interrupted and released to the queue (not counted as an attempt). Each worker then syncs the
audit head and closes its App. SIGINT is the impatient stop: running jobs are released at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huey.consumer import Consumer, ConsumerStopped

from plugin.errors import AuthError, UnavailableError
from plugin.jobs import Claim, JobQueue, build_huey, worker_name
from plugin.pipeline import Outcome
from plugin.settings import Settings
from plugin.settings import load as load_settings
from plugin.state import StateStore

log = logging.getLogger(__name__)

_config_file: Path | None = None
_local = threading.local()


@dataclass
class _Runtime:
    """What one worker process/thread keeps between jobs."""

    pid: int
    app: Any
    queue: JobQueue
    name: str = field(default_factory=worker_name)

    def close(self) -> None:
        try:
            self.app.audit.sync_head()
        except Exception:
            log.warning("audit head not synced at worker stop", exc_info=True)
        self.queue.close()
        self.app.close()


def configure(config_file: Path) -> None:
    """Name the config file the worker processes open their App from (set before they start)."""
    global _config_file
    _config_file = Path(config_file).absolute()


def _open_runtime() -> _Runtime:
    from plugin.app import App

    if _config_file is None:
        raise RuntimeError("plugin.worker.configure(config_file) was not called")
    settings = load_settings(_config_file)
    settings = settings.model_copy(update={
        "engine": settings.engine.model_copy(update={"workers": 1})})
    app = App(settings, config_file=_config_file)
    try:
        queue = JobQueue(settings, app.state)
        load = getattr(app.engine, "load", None)
        if load is not None:
            load()  # before any claim: loading holds the GIL, and the lease heartbeat waits
    except BaseException:
        app.close()
        raise
    return _Runtime(os.getpid(), app, queue)


def _runtime() -> _Runtime:
    runtime: _Runtime | None = getattr(_local, "runtime", None)
    if runtime is None or runtime.pid != os.getpid():  # a forked child opens its own
        runtime = _local.runtime = _open_runtime()
    return runtime


def _open_at_start() -> None:
    """Worker start-up: open the App and load the models now, not inside the first job."""
    try:
        _runtime()
    except Exception as err:  # the next job message tries again (`consentry worker` checked
        log.error("worker could not open its App: %s", err)  # the settings before starting)


def _close_runtime() -> None:
    runtime: _Runtime | None = getattr(_local, "runtime", None)
    _local.runtime = None
    if runtime is not None and runtime.pid == os.getpid():
        runtime.close()


class _Heartbeat:
    """Renews the claim's lease every third of a lease while the job runs."""

    def __init__(self, queue: JobQueue, claim: Claim) -> None:
        self.queue, self.claim = queue, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{claim.job_id}",
                                        daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = self.queue.lease.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                if not self.queue.renew(self.claim):
                    log.warning("job %d: lease lost while running", self.claim.job_id)
                    return
            except Exception:
                log.warning("job %d: lease not renewed", self.claim.job_id, exc_info=True)


def run_job(job_id: int) -> None:
    """The huey task: claim the job, scan its one asset, record the outcome."""
    runtime = _runtime()
    queue, app = runtime.queue, runtime.app
    claim = queue.claim(job_id, worker=runtime.name)
    if claim is None:
        return  # a duplicate message, a finished job, or one given up
    retry = app.settings.queue.retry_seconds
    try:
        with _Heartbeat(queue, claim):
            if claim.connector not in app.connectors:
                queue.finish(claim, outcome="failed",
                             error=f"no connector named {claim.connector!r} in this worker's "
                                   "settings")
                return
            (result,) = app.pipeline.scan(claim.connector, [claim.ref])
    except UnavailableError as err:  # the platform is down: not this job's fault
        queue.release(claim, error=str(err), delay=retry, counts=False)
        return
    except AuthError as err:  # credentials refused: a few tries while the admin fixes them
        queue.release(claim, error=str(err), delay=retry)
        return
    except Exception as err:
        log.warning("job %d: %s; released for a retry", job_id, type(err).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        queue.release(claim, error=f"{type(err).__name__}: {err}"[:2000],
                      delay=min(retry, 5.0 * claim.attempts))
        return
    except BaseException:  # interrupted (shutdown timeout, SIGINT): back to the queue
        queue.release(claim, error="worker stopped during the job", counts=False)
        raise
    error = result.reason if result.outcome is Outcome.FAILED else None
    queue.finish(claim, outcome=result.outcome.value, error=error, timings=result.timings)
    log.info("job %d: %s:%s %s", job_id, claim.connector, claim.ref.id, result.outcome.value)


# -- the consumer ---------------------------------------------------------------------------
class _Consumer(Consumer):
    """huey's consumer, plus the reaper in its main loop (no extra thread in a forking parent)."""

    reap_every: float = 0.0
    queue: JobQueue | None = None
    _reaped: float = 0.0

    def loop(self, health_check_ts: float | None = None) -> float | None:
        health_check_ts = super().loop(health_check_ts)
        if self.queue is not None and self.reap_every:
            moment = time.monotonic()
            if moment - self._reaped >= self.reap_every:
                self._reaped = moment
                try:
                    self.queue.reap()
                except Exception:
                    log.warning("reaper failed; next run as scheduled", exc_info=True)
        return health_check_ts

    def start_workers(self) -> None:
        """`Consumer.start()` without its signal handlers (the host process owns those)."""
        if self.environment.forks:
            self.huey.storage.close()  # forked children must not share its connection
        self.scheduler.start()
        for _, process in self.worker_threads:
            process.start()


def build_consumer(config_file: Path, settings: Settings, *, workers: int | None = None,
                   worker_type: str | None = None, reap_every: float | None = None,
                   state: StateStore | None = None) -> tuple[_Consumer, JobQueue | None]:
    """A consumer for the configured queue; with `reap_every` it also runs the reaper (it then
    needs `state`, or opens its own StateStore)."""
    configure(config_file)
    q = settings.queue
    huey, task = build_huey(settings)
    huey.on_startup("consentry-open")(_open_at_start)
    huey.on_shutdown("consentry-close")(_close_runtime)
    count = workers or q.workers or os.cpu_count() or 1
    consumer = _Consumer(
        huey, workers=count, worker_type=worker_type or q.worker_type, periodic=False,
        initial_delay=0.05, backoff=1.5, max_delay=q.poll_seconds,
        health_check_interval=1.0, shutdown_timeout=settings.service.shutdown_grace,
        graceful_signal="TERM",
    )
    queue = None
    reap = settings.service.reap_every if reap_every is None else reap_every
    if reap:
        queue = JobQueue(settings, state or StateStore(settings.state_url), huey=(huey, task))
        consumer.queue, consumer.reap_every = queue, reap
    return consumer, queue


class ConsumerHandle:
    """An in-process consumer (for `consentry serve`): workers started, main loop in a thread.

    `stop(graceful=True)` lets running jobs finish (up to service.shutdown_grace), then returns.
    """

    def __init__(self, consumer: _Consumer) -> None:
        self.consumer = consumer
        self._thread = threading.Thread(target=self._loop, name="consentry-consumer",
                                        daemon=True)

    def start(self) -> ConsumerHandle:
        self.consumer.start_workers()
        self._thread.start()
        return self

    def _loop(self) -> None:
        ts: float | None = time.monotonic()
        while not self.consumer.stop_flag.is_set():
            try:
                ts = self.consumer.loop(ts)
            except ConsumerStopped:
                return
            except Exception:  # a failed health check: try again on the next turn
                log.warning("worker health check failed", exc_info=True)
                time.sleep(1)

    @property
    def workers(self) -> int:
        return self.consumer.workers

    def stop(self, graceful: bool = True) -> None:
        self.consumer.stop(graceful=graceful)
        self._thread.join(timeout=5)
        self.consumer.huey.notify_interrupted_tasks()
        if self.consumer.queue is not None:
            self.consumer.queue.close()


def start_consumer(config_file: Path, *, workers: int, worker_type: str | None = None,
                   reap_every: float = 0, settings: Settings | None = None) -> ConsumerHandle:
    """Run the huey consumer in this process (used by `serve` in embedded mode).

    With process workers, call it before the host starts threads of its own: the workers are
    forked. `reap_every` 0 leaves reaping to the host (serve runs the reaper on its schedule).
    """
    settings = settings or load_settings(config_file)
    consumer, _ = build_consumer(config_file, settings, workers=workers,
                                 worker_type=worker_type, reap_every=reap_every)
    return ConsumerHandle(consumer).start()
