"""Distributed mode: Redis carries the jobs, PostgreSQL holds the state and the vault.

One `consentry serve` (no embedded workers) polls a fake Nextcloud holding 300 small photos
(LFW crops) and queues them; two `consentry worker` processes share the work. Every photo is
processed effectively once: one job each, one `asset.analysed` audit entry each, at most one
tag assigned per photo, and both workers took a fair share.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from plugin.jobs import JobQueue
from tests.queue_helpers import (
    analysed_entries,
    lfw_photos,
    nextcloud_setup,
    race_the_ledger,
    start_worker,
    stop_worker,
    tag_puts,
    wait_until_idle,
)

PHOTOS = 300


def test_ledger_on_postgres_with_redis(tmp_path, postgres_url, redis_url):
    from plugin.models import AssetRef
    from plugin.settings import validate
    from plugin.state import StateStore

    settings = validate({"queue": {"url": redis_url, "lease_seconds": 30}},
                        file="test.toml", base_dir=tmp_path)
    state = StateStore(postgres_url)
    queue = JobQueue.open(settings, state)
    try:
        race_the_ledger(queue)
        assert queue.huey.pending_count() == 40
        assert queue.claim(queue.jobs()[0]["id"]) is None  # held by a racer
        ref = AssetRef(connector="nc", id="0", version="v2", name="Photos/0.jpg")
        assert queue.submit("nc", [ref], source="webhook") == 0  # running: not twice
        from plugin.jobs import jobs

        with queue.engine.begin() as conn:
            conn.execute(jobs.update().values(lease_until="2000-01-01T00:00:00.000000+00:00"))
        queue.huey.flush()
        assert queue.reap() == 40 and queue.huey.pending_count() == 40
        assert queue.depth() == {"queued": 40, "running": 0, "done": 0, "failed": 0}
        first = queue.jobs()[0]["id"]
        while (claim := queue.claim(first)) is not None:  # attempt 1 was the racer's
            queue.release(claim, error="OSError: disk full")
        (row,) = [r for r in queue.jobs() if r["id"] == first]
        assert (row["status"], row["attempts"]) == ("failed", 5)
        assert row["error"] == "OSError: disk full (gave up after 5 attempts)"
    finally:
        queue.close()
        state.close()


def test_300_assets_once_over_two_workers_on_redis_and_postgres(
        tmp_path, testdata, demo_data, engine, monkeypatch, postgres_url, redis_url):
    photos = lfw_photos(testdata, PHOTOS)
    fake, config, names = nextcloud_setup(
        tmp_path, demo_data, engine, monkeypatch, count=PHOTOS, photos=photos,
        write_mode="tags-only", state_url=postgres_url, queue_url=redis_url, lease=15,
        vault_url=f"{postgres_url}?schema=vault")
    from plugin.app import App

    procs = []
    try:
        with App.open(config) as a:  # migrates the database before the others start
            queue = JobQueue.open(a.settings, a.state)
            procs = [start_worker(config, tmp_path / f"worker{i}.log") for i in range(2)]
            procs.append(start_worker(config, tmp_path / "serve.log", command="serve"))
            deadline = time.monotonic() + 120
            while sum(queue.depth().values()) < PHOTOS:  # the serve poller queues them
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    logs = "\n".join(p.log.read_text()[-3000:] for p in procs)
                    pytest.fail(f"not queued: {queue.depth()}\n{logs}")
                time.sleep(0.25)
            wait_until_idle(queue, timeout=600, workers=procs)
            for p in procs:
                assert stop_worker(p) == 0, p.log.read_text()[-3000:]
            rows = queue.jobs()
            assert len(rows) == PHOTOS
            assert Counter((r["status"], r["outcome"]) for r in rows) == {
                ("done", "processed"): PHOTOS}
            per_worker = Counter(r["worker"] for r in rows)
            assert len(per_worker) == 2 and min(per_worker.values()) >= PHOTOS // 10, per_worker
            assert set(analysed_entries(a).values()) == {1}
            assert len(analysed_entries(a)) == PHOTOS
            assert not tag_puts(fake) or max(tag_puts(fake).values()) == 1
            assert {r.name for r in a.state.assets(connector="nc")} == set(names)
            assert a.audit.verify() >= PHOTOS
            stages = {s.status: s for s in queue.summary()}
            assert stages["done"].fetch_count == PHOTOS
            queue.close()
    finally:
        for p in procs:
            stop_worker(p, timeout=10)
        fake.close()
