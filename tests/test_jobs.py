"""The job queue (plugin/jobs.py): the ledger's rules, then two real worker processes on the
embedded queue scanning real photos from a fake Nextcloud."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from plugin.jobs import JobQueue
from plugin.models import AssetRef
from plugin.settings import validate
from plugin.state import StateStore
from tests.queue_helpers import (
    analysed_entries,
    nextcloud_setup,
    race_the_ledger,
    sidecar_puts,
    start_worker,
    stop_worker,
    tag_puts,
    wait_until_idle,
)


def ref(n: int, version: str = "v1") -> AssetRef:
    return AssetRef(connector="nc", id=str(n), version=version, name=f"Photos/{n}.jpg")


@pytest.fixture
def ledger(tmp_path):
    settings = validate({"queue": {"lease_seconds": 30, "max_attempts": 3}},
                        file="test.toml", base_dir=tmp_path)
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    queue = JobQueue.open(settings, state)
    yield queue
    queue.close()
    state.close()


def expire(queue: JobQueue, job_id: int) -> None:
    """What time does to the lease of a worker that was killed."""
    from plugin.jobs import jobs

    with queue.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(
            lease_until="2000-01-01T00:00:00.000000+00:00"))


def test_submit_is_durable_and_adds_one_job_per_waiting_asset(ledger):
    assert ledger.submit("nc", [ref(1), ref(2)], source="poll") == 2
    assert ledger.huey.pending_count() == 2
    # the same assets again (a webhook after the poll): nothing new; a newer version is taken
    assert ledger.submit("nc", [ref(1), ref(2, "v2")], source="webhook") == 0
    rows = {r["asset_id"]: r for r in ledger.jobs()}
    assert rows["2"]["version"] == "v2" and rows["2"]["source"] == "webhook"
    assert rows["1"]["version"] == "v1"
    assert ledger.depth() == {"queued": 2, "running": 0, "done": 0, "failed": 0}
    # a finished asset can be queued again (a later change)
    claim = ledger.claim(rows["1"]["id"])
    ledger.finish(claim, outcome="processed", timings={"fetch": 0.5, "analyse": 1.0,
                                                        "write": 0.25})
    assert ledger.submit("nc", [ref(1, "v3")], source="poll") == 1


def test_claim_is_atomic_so_duplicate_messages_are_harmless(ledger):
    ledger.submit("nc", [ref(1)], source="manual")
    (job,) = ledger.jobs()
    first = ledger.claim(job["id"], worker="a:1")
    assert first is not None and first.ref == ref(1) and first.attempts == 1
    assert ledger.claim(job["id"], worker="b:2") is None  # the second message finds it taken
    assert ledger.finish(first, outcome="processed")
    assert ledger.claim(job["id"], worker="b:2") is None  # done stays done
    assert ledger.reap() == 0


def test_a_killed_workers_job_is_reaped_retried_and_its_late_result_ignored(ledger):
    ledger.submit("nc", [ref(1)], source="manual")
    (job,) = ledger.jobs()
    stale = ledger.claim(job["id"], worker="a:1")
    ledger.huey.flush()  # the message was taken by the worker that died
    expire(ledger, job["id"])
    assert ledger.reap() == 1 and ledger.huey.pending_count() == 1
    assert ledger.jobs()[0]["status"] == "queued"
    fresh = ledger.claim(job["id"], worker="b:2")
    assert fresh is not None and fresh.attempts == 2
    assert not ledger.renew(stale) and not ledger.finish(stale, outcome="processed")
    assert ledger.finish(fresh, outcome="skipped")
    row = ledger.jobs()[0]
    assert (row["status"], row["outcome"], row["worker"]) == ("done", "skipped", "b:2")


def test_a_job_whose_worker_keeps_dying_ends_failed(ledger):
    ledger.submit("nc", [ref(1)], source="manual")
    (job,) = ledger.jobs()
    for _ in range(3):  # max_attempts
        assert ledger.claim(job["id"]) is not None
        expire(ledger, job["id"])
    assert ledger.reap() == 0
    row = ledger.jobs()[0]
    assert row["status"] == "failed" and "3 attempts" in row["error"]
    assert ledger.claim(job["id"]) is None
    # the same for a job that keeps hitting an unexpected error (released, counted)
    ledger.submit("nc", [ref(2)], source="manual")
    second = ledger.jobs()[-1]["id"]
    for _ in range(3):
        ledger.release(ledger.claim(second), error="OSError: disk full")
    assert ledger.claim(second) is None
    row = ledger.jobs()[-1]
    assert row["status"] == "failed"
    assert row["error"] == "OSError: disk full (gave up after 3 attempts)"


def test_lost_messages_are_sent_again_and_released_jobs_wait(ledger):
    ledger.submit("nc", [ref(1), ref(2)], source="manual")
    ledger.huey.flush()  # messages lost with the queue's storage
    from plugin.jobs import jobs

    with ledger.engine.begin() as conn:
        conn.execute(jobs.update().values(sent_at="2000-01-01T00:00:00.000000+00:00"))
    assert ledger.reap() == 2 and ledger.huey.pending_count() == 2
    assert ledger.reap() == 0  # just sent: not again
    claim = ledger.claim(ledger.jobs()[0]["id"])
    assert ledger.release(claim, error="platform down", delay=60, counts=False)
    row = ledger.jobs()[0]
    assert (row["status"], row["attempts"], row["error"]) == ("queued", 0, "platform down")
    (message,) = [m for m in ledger.huey.pending() if m.args == (claim.job_id,)][1:]
    assert message.eta is not None  # sent with the delay: the consumer holds it back


def test_depth_and_summary_feed_the_metrics(ledger):
    ledger.submit("nc", [ref(1), ref(2), ref(3)], source="poll")
    ids = [r["id"] for r in ledger.jobs()]
    ledger.finish(ledger.claim(ids[0]), outcome="processed",
                  timings={"fetch": 0.5, "analyse": 1.0, "write": 0.25})
    ledger.finish(ledger.claim(ids[1]), outcome="failed", error="not a photo")
    assert ledger.depth() == {"queued": 1, "running": 0, "done": 1, "failed": 1}
    stats = {(s.status, s.outcome): s for s in ledger.summary()}
    done = stats[("done", "processed")]
    assert (done.count, done.fetch_seconds, done.fetch_count, done.write_seconds) == \
        (1, 0.5, 1, 0.25)
    assert stats[("failed", "failed")].analyse_count == 0
    assert stats[("queued", None)].count == 1


def test_concurrent_submitters_and_claimers_agree(ledger):
    race_the_ledger(ledger)


# -- two real workers ---------------------------------------------------------------------------
def test_two_worker_processes_process_every_asset_once(tmp_path, demo_data, engine, monkeypatch):
    fake, config, photos = nextcloud_setup(tmp_path, demo_data, engine, monkeypatch, count=16,
                                           enroll=True, lease=20)
    try:
        from plugin.app import App

        with App.open(config) as a:
            queue = JobQueue.open(a.settings, a.state)
            refs, _ = a.connectors["nc"].changes(None)
            assert len(refs) == len(photos)
            assert queue.submit("nc", refs, source="manual") == len(photos)
            assert queue.submit("nc", refs, source="webhook") == 0
            workers = [start_worker(config, tmp_path / f"w{i}.log") for i in range(2)]
            try:
                wait_until_idle(queue, timeout=180, workers=workers)
            finally:
                for w in workers:
                    stop_worker(w)
            rows = queue.jobs()
            assert Counter(r["status"] for r in rows) == {"done": len(photos)}, rows
            assert {r["outcome"] for r in rows} == {"processed"}
            # spread over both workers (each runs one process: two pids)
            assert len({r["worker"] for r in rows}) == 2
            assert all(r["attempts"] == 1 for r in rows)
            assert all(r["fetch_seconds"] is not None and r["write_seconds"] is not None
                       for r in rows)
            # once: one sidecar upload and at most one tag per photo; one audit entry each
            assert set(sidecar_puts(fake).values()) == {1}
            assert max(tag_puts(fake).values()) == 1
            assert set(analysed_entries(a).values()) == {1}
            assert len(analysed_entries(a)) == len(photos)
            statuses = {row.name: row.status for row in a.state.assets(connector="nc")}
            assert statuses["Photos/IMG_2043.jpg"] == "cleared"
            assert a.audit.verify() > 0
            queue.close()
    finally:
        fake.close()


def test_worker_stops_gracefully_on_sigterm(tmp_path, demo_data, engine, monkeypatch):
    import signal

    fake, config, _ = nextcloud_setup(tmp_path, demo_data, engine, monkeypatch, count=3)
    try:
        from plugin.app import App

        worker = start_worker(config, tmp_path / "w.log")
        with App.open(config) as a:
            queue = JobQueue.open(a.settings, a.state)
            refs, _ = a.connectors["nc"].changes(None)
            queue.submit("nc", refs, source="manual")
            deadline = time.monotonic() + 120
            while queue.depth()["done"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0, Path(worker.log).read_text()
            depth = queue.depth()
            assert depth["running"] == 0  # each job finished or went back to the queue
            assert a.audit.verify() >= depth["done"]
            queue.close()
    finally:
        fake.close()



def test_in_process_consumer_for_serve(tmp_path, demo_data, engine, monkeypatch):
    """`start_consumer` (what `serve` uses in embedded mode): workers inside this process."""
    from plugin.app import App
    from plugin.worker import start_consumer

    fake, config, photos = nextcloud_setup(tmp_path, demo_data, engine, monkeypatch, count=3,
                                           write_mode="tags-only", lease=20)
    try:
        with App.open(config) as a:
            queue = JobQueue.open(a.settings, a.state)
            handle = start_consumer(config, workers=1, worker_type="thread", reap_every=0.5)
            try:
                refs = a.connectors["nc"].changes(None)[0]
                fake.delete(photos[0])  # gone before its job runs: the asset fails
                queue.submit("nc", refs, source="manual")
                wait_until_idle(queue, timeout=120, workers=[])
            finally:
                handle.stop(graceful=True)
            rows = {r["ref"]["name"]: r for r in queue.jobs()}
            assert Counter(r["outcome"] for r in rows.values()) == {
                "processed": len(photos) - 1, "failed": 1}
            gone = rows[photos[0]]  # failed once, with the reason; not retried
            assert (gone["status"], gone["attempts"]) == ("failed", 1)
            assert "vanished" in gone["error"]
            assert a.audit.verify() >= len(photos)
            queue.close()
    finally:
        fake.close()


def test_immich_workers_on_one_machine_share_their_links(tmp_path):
    """Two worker processes' connectors (same work dir, each with its own connection to the state
    database): the second sees the person the first created instead of creating a second one,
    and neither loses the other's faces."""
    import io
    import uuid

    from PIL import Image

    from connectors.base import ConnectorContext
    from connectors.immich import ImmichConfig, ImmichConnector
    from plugin.links import StateLinks
    from plugin.models import AssetVerdict, FaceBox, FaceVerdict, Geometry, ModelRelease, Status
    from tests.fakes.immich import ALL, FakeImmichServer

    fake = FakeImmichServer(keys={"k" * 20: ALL})
    stores = [StateStore(f"sqlite:///{tmp_path / 'state.db'}") for _ in range(2)]
    try:
        def jpeg() -> bytes:
            out = io.BytesIO()
            Image.new("RGB", (400, 300), (120, 90, 60)).save(out, "JPEG")
            return out.getvalue()

        assets = [fake.add_asset(jpeg(), name=f"IMG_{i}.jpg") for i in range(2)]
        workers = [ImmichConnector(ImmichConfig(url=fake.url, api_key="k" * 20),
                                   ConnectorContext(writer=None, engine_version="t",
                                                    work_dir=tmp_path / "work",
                                                    links=StateLinks.of(store)))
                   for store in stores]
        refs = {r.id: r for r in workers[0].changes(None)[0]}
        links = StateLinks.of(stores[0])
        assert links.people("immich") == {}
        subject = uuid.UUID("11111111-1111-4111-8111-111111111111")
        face = FaceVerdict(box=FaceBox(top=10, right=60, bottom=60, left=10),
                           status=Status.CLEARED, subject_id=subject, name="Jane Doe")
        verdict = AssetVerdict(status=Status.CLEARED, model_release=ModelRelease.UNLIMITED,
                               faces=(face,))
        for w, asset in zip(workers, assets, strict=True):
            w.write_back(refs[asset], verdict, Geometry(stored_width=400, stored_height=300))
        assert [p["name"] for p in fake.people.values()] == ["Jane Doe"]
        assert all(len(fake.faces_of(a)) == 1 for a in assets)
        assert links.assets_of("immich", str(subject)) == sorted(assets)
        for w in workers:
            w.close()
    finally:
        for store in stores:
            store.close()
        fake.close()


def test_an_outage_puts_the_job_back_without_using_up_its_attempts(tmp_path, demo_data, engine,
                                                                   monkeypatch):
    from plugin.app import App
    from plugin.worker import start_consumer

    fake, config, _ = nextcloud_setup(tmp_path, demo_data, engine, monkeypatch, count=1,
                                      write_mode="tags-only", lease=20,
                                      extra="max_attempts = 1")
    try:
        with App.open(config) as a:
            queue = JobQueue.open(a.settings, a.state)
            refs = a.connectors["nc"].changes(None)[0]
            fake.knobs.fail_next = [503] * 6  # more outages than queue.max_attempts (5)
            handle = start_consumer(config, workers=1, worker_type="thread", reap_every=0.5)
            try:
                queue.submit("nc", refs, source="manual")
                wait_until_idle(queue, timeout=120, workers=[])
            finally:
                handle.stop(graceful=True)
            (row,) = queue.jobs()
            assert (row["status"], row["outcome"], row["attempts"], row["error"]) == \
                ("done", "processed", 1, None)
            assert not fake.knobs.fail_next
            queue.close()
    finally:
        fake.close()
