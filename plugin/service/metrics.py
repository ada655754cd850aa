"""/metrics in Prometheus text format, computed from the database at each scrape.

A custom collector (no counters kept in this process) so that the numbers are the same
whichever process did the work — embedded workers, `consentry worker` on other machines —
and survive a restart. Labels carry connector names, statuses and stages only: never an
asset name or a person.

    consentry_queue_depth{status}                        queued/running/done/failed
    consentry_jobs{connector,status,outcome}             jobs in the ledger
    consentry_assets_total{connector,outcome}            finished jobs: processed/skipped/failed
    consentry_stage_seconds{connector,stage}             summary: sum and count per stage
    consentry_assets_by_status{connector,status}         assets by consent status (state db)
    consentry_connector_up{connector}                    1 when the last poll/webhook was ok
    consentry_connector_state{connector,state}           1 for the current state
    consentry_connector_last_poll_timestamp_seconds{connector}
    consentry_connector_state_since_timestamp_seconds{connector}

Poll state comes from this process's HealthBoard (the same record `consentry status` reads
from the database).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from plugin import schema as t
from plugin.service.health import ConnectorState, HealthBoard

log = logging.getLogger(__name__)

STAGES = ("fetch", "analyse", "write")


class ConsentryCollector:
    def __init__(self, *, queue: Any, state: Any, board: HealthBoard) -> None:
        self._queue, self._state, self._board = queue, state, board

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._assets()
        yield from self._connectors()

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; no describe-time database access

    def _jobs(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("consentry_queue_depth", "jobs in the queue by status",
                                  labels=["status"])
        jobs = GaugeMetricFamily("consentry_jobs", "jobs in the ledger",
                                 labels=["connector", "status", "outcome"])
        finished = CounterMetricFamily("consentry_assets", "finished jobs by outcome "
                                       "(processed, skipped, failed)",
                                       labels=["connector", "outcome"])
        stages = SummaryMetricFamily("consentry_stage_seconds", "seconds per pipeline stage",
                                     labels=["connector", "stage"])
        try:
            counts = self._queue.depth()
            stats = self._queue.summary()
        except Exception:
            log.warning("queue unreachable while collecting metrics")
            log.debug("queue error", exc_info=True)
            return
        for status in ("queued", "running", "done", "failed"):
            depth.add_metric([status], counts.get(status, 0))
        outcomes: dict[tuple[str, str], float] = defaultdict(float)
        latency: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for s in stats:
            jobs.add_metric([s.connector, s.status, s.outcome or ""], s.count)
            if s.outcome:
                outcomes[(s.connector, s.outcome)] += s.count
            for stage in STAGES:
                total, count = _stage(s, stage)
                latency[(s.connector, stage)][0] += count
                latency[(s.connector, stage)][1] += total
        for (connector, outcome), n in sorted(outcomes.items()):
            finished.add_metric([connector, outcome], n)
        for (connector, stage), (count, total) in sorted(latency.items()):
            stages.add_metric([connector, stage], count_value=count, sum_value=total)
        yield from (depth, jobs, finished, stages)

    def _assets(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("consentry_assets_by_status", "assets by consent status",
                                   labels=["connector", "status"])
        a = t.assets
        query = (sa.select(a.c.connector, a.c.status, sa.func.count())
                 .group_by(a.c.connector, a.c.status))
        try:
            with self._state.engine.connect() as conn:
                rows = conn.execute(query).all()
        except sa.exc.SQLAlchemyError:
            log.warning("state database unreachable while collecting metrics")
            return
        for connector, status, n in rows:
            family.add_metric([connector, status or "unanalysed"], n)
        yield family

    def _connectors(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("consentry_connector_up", "1 when the connector's platform "
                               "answered the last poll or webhook", labels=["connector"])
        state = GaugeMetricFamily("consentry_connector_state", "1 for the connector's current "
                                  "state", labels=["connector", "state"])
        polled = GaugeMetricFamily("consentry_connector_last_poll_timestamp_seconds",
                                   "end of the last poll (unix time)", labels=["connector"])
        since = GaugeMetricFamily("consentry_connector_state_since_timestamp_seconds",
                                  "when the current state began (unix time)",
                                  labels=["connector"])
        for name, health in sorted(self._board.snapshot().items()):
            up.add_metric([name], 1.0 if health.state is ConnectorState.OK else 0.0)
            for s in ConnectorState:
                state.add_metric([name, s.value], 1.0 if health.state is s else 0.0)
            if health.last_poll:
                polled.add_metric([name], _unix(health.last_poll))
            since.add_metric([name], _unix(health.since))
        yield from (up, state, polled, since)


def _stage(stat: Any, stage: str) -> tuple[float, float]:
    """(sum of seconds, number of timed jobs) of one stage in a JobStat."""
    total = getattr(stat, f"{stage}_seconds", None) or 0.0
    count = getattr(stat, f"{stage}_count", None)
    return float(total), float(stat.count if count is None else count)


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def registry_for(collector: ConsentryCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
