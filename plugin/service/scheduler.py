"""`Every`: a thread that runs one job every N seconds until stopped, or at once when woken.

Used for the pollers, the consent sweep and the queue reaper. A job's exception is logged and
the schedule goes on: one failed sweep must not end the service. Stopping is prompt (the wait
is on an Event); a job that is running finishes its current step first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Every(threading.Thread):
    """Run `job` now (unless `run_first` is false), then every `interval` seconds.

    `interval` 0 means "only when triggered"."""

    def __init__(self, name: str, interval: float, job: Callable[[], object], *,
                 run_first: bool = True) -> None:
        super().__init__(name=f"consentry-{name}", daemon=True)
        self.interval = interval
        self.job = job
        self.runs = 0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._first = run_first

    def trigger(self) -> None:
        """Run the job as soon as the current run (if any) ends."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        if not self._first:
            self._sleep()
        while not self._stopping.is_set():
            try:
                self.job()
            except Exception:
                log.exception("%s failed; next run as scheduled", self.name)
            self.runs += 1
            self._sleep()

    def _sleep(self) -> None:
        self._wake.wait(self.interval or None)
        self._wake.clear()
