"""Pollers, schedules, health bookkeeping, `consentry status`, and the generic per-connector
service keys (poll_interval, webhook_secret…) that every connector kind accepts."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plugin.errors import ConfigError
from plugin.service.health import ConnectorState, HealthBoard, stored_health
from plugin.service.scheduler import Every
from plugin.settings import validate
from plugin.state import StateStore
from tests.test_service_http import (  # noqa: F401  (fixtures)
    CONFIG,
    PASSWORD,
    fake,
    jpeg,
    make_service,
    stub_engine,
    wait_for,
)


def folder_config(library: Path, *, poll: float, extra: str = "") -> str:
    return CONFIG.split("[[connectors]]")[0] + extra + f"""
[[connectors]]
kind = "folder"
name = "photos"
root = "{library}"
poll_interval = {poll}
"""


# -- health --------------------------------------------------------------------------------
def test_health_logs_each_change_once_and_is_stored_for_other_processes(tmp_path, caplog):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        board = HealthBoard(["nc"], store=store)
        with caplog.at_level(logging.INFO, logger="plugin.service.health"):
            for _ in range(3):
                board.failed("nc", ConnectorState.UNAVAILABLE, "platform unreachable",
                             polled=True)
            since = board.snapshot()["nc"].since
            board.failed("nc", ConnectorState.UNAVAILABLE, "platform unreachable", polled=True)
            assert board.snapshot()["nc"].since == since  # "unavailable since T" keeps its T
            board.ok("nc", polled=True, found=4)
            board.ok("nc", polled=True, found=0)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["connector nc unavailable (platform unreachable)",
                         "connector nc recovered"]
        seen = stored_health(store, ["nc", "other"])  # what `consentry status` reads
        assert seen["other"] is None
        assert seen["nc"].state is ConnectorState.OK and seen["nc"].last_poll
        assert board.healthy()
    finally:
        store.close()


# -- schedules -----------------------------------------------------------------------------
def test_every_runs_on_time_on_trigger_and_survives_errors():
    calls: list[float] = []
    ran = threading.Event()

    def job():
        calls.append(time.monotonic())
        ran.set()
        if len(calls) == 1:
            raise RuntimeError("first run fails; the schedule goes on")

    every = Every("test", 3600, job)
    every.start()
    try:
        wait_for(lambda: len(calls) == 1, what="first run")
        every.trigger()
        wait_for(lambda: len(calls) == 2, timeout=2, what="triggered run")
    finally:
        started = time.monotonic()
        every.stop()
        every.join(timeout=2)
    assert not every.is_alive() and time.monotonic() - started < 1  # stop is prompt


def test_only_triggered_when_interval_is_zero():
    calls = []
    every = Every("test", 0, lambda: calls.append(1), run_first=False)
    every.start()
    time.sleep(0.2)
    assert calls == []
    every.trigger()
    wait_for(lambda: calls == [1], timeout=2, what="triggered run")
    every.stop()
    every.join(timeout=2)


# -- pollers -------------------------------------------------------------------------------
def test_poller_queues_new_photos_once(tmp_path, make_service):  # noqa: F811
    library = tmp_path / "library"
    library.mkdir()
    (library / "a.jpg").write_bytes(jpeg(1))
    service = make_service(folder_config(library, poll=0.2))
    wait_for(lambda: service.queue.depth()["done"] == 1, what="first photo")
    (library / "b.jpg").write_bytes(jpeg(2))
    wait_for(lambda: service.queue.depth()["done"] == 2, what="new photo polled")
    poller = service.pollers["photos"]
    runs = poller.runs
    wait_for(lambda: poller.runs >= runs + 3, what="more polls")
    jobs = service.queue.jobs()
    assert [(j["source"], j["outcome"]) for j in jobs] == [("poll", "processed")] * 2
    health = service.board.snapshot()["photos"]
    assert health.state is ConnectorState.OK and health.last_poll


def test_poll_failures_mark_the_connector_and_keep_the_cursor(fake, make_service):  # noqa: F811
    service = make_service(CONFIG.format(url=fake.url, poll=0.2))
    wait_for(lambda: service.queue.depth()["done"] == 1, what="first poll processed")
    cursor = service.app.state.cursor("nc")
    fake.knobs.fail_rate = 1.0
    wait_for(lambda: service.board.snapshot()["nc"].state is ConnectorState.UNAVAILABLE,
             what="unavailable")
    assert service.app.state.cursor("nc") == cursor
    fake.add_file("Photos/later.jpg", jpeg(9))
    fake.advance(5)
    fake.knobs.fail_rate = 0.0
    wait_for(lambda: service.queue.depth()["done"] == 2, what="caught up after the outage")


def test_sweep_and_reaper_run_on_their_schedule(tmp_path, make_service, monkeypatch):  # noqa: F811
    from plugin.jobs import JobQueue
    from plugin.sweep import LAST_SWEEP

    reaped = threading.Event()
    real_reap = JobQueue.reap

    def reap(self):
        reaped.set()
        return real_reap(self)

    monkeypatch.setattr(JobQueue, "reap", reap)
    library = tmp_path / "library"
    library.mkdir()
    text = folder_config(library, poll=0).replace("sweep_every = 0", "sweep_every = 3600") \
        .replace("reap_every = 0", "reap_every = 0.1")
    service = make_service(text)
    wait_for(lambda: service.app.state.get_meta(LAST_SWEEP), what="sweep at start")
    assert reaped.wait(5)


# -- consentry status ----------------------------------------------------------------------
def test_status_shows_queue_failures_and_last_poll(tmp_path, make_service):  # noqa: F811
    from plugin.cli import app as cli

    library = tmp_path / "library"
    library.mkdir()
    (library / "a.jpg").write_bytes(jpeg(1))
    (library / "broken.jpg").write_bytes(b"not a jpeg at all")
    service = make_service(folder_config(library, poll=3600))
    wait_for(lambda: service.queue.depth()["done"] + service.queue.depth()["failed"] == 2,
             what="both jobs ended")
    config = str(service.config_file)
    result = CliRunner().invoke(cli, ["--config", config, "status"])
    assert result.exit_code == 0, result.output
    assert "1 done" in result.output and "1 failed" in result.output
    assert "photos" in result.output and "ok" in result.output and "never" not in result.output
    service.board.failed("photos", ConnectorState.AUTH_FAILED, "credentials refused")
    result = CliRunner().invoke(cli, ["--config", config, "status", "--json"])
    assert result.exit_code == 1  # a connector is down: scripts can alert on it
    assert '"auth_failed"' in result.output and '"failed_assets": 1' in result.output


# -- settings ------------------------------------------------------------------------------
def test_service_keys_work_for_every_connector_kind(tmp_path):
    settings = validate({"connectors": [
        {"kind": "folder", "root": "lib", "poll_interval": 30, "webhook_secret": "s1"},
        {"kind": "nextcloud", "name": "nc", "url": "https://cloud.example.org", "user": "u",
         "webhook_secret_env": "NC_HOOK", "poll_interval": 0},
    ]}, file="c.toml", base_dir=tmp_path)
    assert settings.connectors[0] == {"kind": "folder", "root": "lib"}  # folder's own keys
    assert settings.connectors[1]["webhook_secret_env"] == "NC_HOOK"  # Nextcloud reads it too
    assert "poll_interval" not in settings.connectors[1]
    photos, nc = settings.connector_service("photos"), settings.connector_service("nc")
    assert (photos.poll_interval, photos.secret()) == (30, "s1")
    assert (nc.poll_interval, nc.webhook_secret_env, nc.webhook_header) == (
        0, "NC_HOOK", "X-Consentry-Secret")
    default = validate({"connectors": [{"kind": "nextcloud", "url": "https://x", "user": "u"}]},
                       file="c.toml", base_dir=tmp_path).connector_service("nextcloud")
    assert default.webhook_secret_env == "CONSENTRY_NEXTCLOUD_WEBHOOK_SECRET"  # kind's default
    assert settings.connector_names() == ["photos", "nc"]
    with pytest.raises(ConfigError, match=r"c.toml: \[connectors\[0\].poll_interval\]"):
        validate({"connectors": [{"kind": "folder", "root": "x", "poll_interval": -1}]},
                 file="c.toml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"\[service.port\]"):
        validate({"service": {"port": 70000}}, file="c.toml", base_dir=tmp_path)
