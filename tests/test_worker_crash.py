"""Workers killed with SIGKILL at the worst moments lose no job and apply none twice.

Each run kills every worker process at its third pass of one point (plugin/crashpoints.py):
while fetching, after detection, between the platform write and the state commit. The
consumer starts a new process, the lease of the dead one runs out, the reaper sends the job
again, and in the end every photo is processed once: one sidecar upload and one tag per photo
on the platform, one `asset.analysed` audit entry each, an audit chain without a gap.
"""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest

from plugin.crashpoints import KILL_AT_ENV, POINTS
from plugin.jobs import JobQueue
from tests.queue_helpers import (
    analysed_entries,
    consentry_command,
    nextcloud_setup,
    sidecar_puts,
    start_worker,
    stop_worker,
    tag_puts,
    wait_until_idle,
)

# Small photos: a dead worker's retry waits for its lease, which must stay above the analysis
# of one photo (dlib holds the GIL, pausing the lease heartbeat).
SMALL = ("events/2023-film-gala/IMG_0811.jpg", "events/2023-film-gala/IMG_0812.jpg",
         "portraits/IMG_3302.jpg", "portraits/IMG_3303.jpg",
         "friends-and-family/IMG_5101.jpg", "friends-and-family/IMG_5102.jpg")
PHOTOS = len(SMALL)


# Each worker process dies at its Nth pass of the point. A job passes every point once, except
# `download`, which a job may pass up to three times (preview, original, original's geometry):
# N must exceed what one job needs, or the job retried first in a fresh process dies each time.
NTH = {"download": 4}


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_point_loses_nothing_and_doubles_nothing(point, tmp_path, demo_data,
                                                                engine, monkeypatch):
    fake, config, photos = nextcloud_setup(
        tmp_path, demo_data, engine, monkeypatch, count=PHOTOS, enroll=True, lease=3,
        max_attempts=8, photos=[demo_data / "library" / p for p in SMALL])
    from plugin.app import App

    try:
        with App.open(config) as a:
            queue = JobQueue.open(a.settings, a.state)
            refs, _ = a.connectors["nc"].changes(None)
            queue.submit("nc", refs, source="manual")
            worker = start_worker(config, tmp_path / "w.log", workers=2,
                                  env={KILL_AT_ENV: f"{point}:{NTH.get(point, 3)}"})
            try:
                wait_until_idle(queue, timeout=240, workers=[worker])
            finally:
                stop_worker(worker)
            rows = queue.jobs()
            assert Counter((r["status"], r["outcome"]) for r in rows) == {
                ("done", "processed"): PHOTOS}, [(r["attempts"], r["error"]) for r in rows]
            # the kills happened: some jobs needed a second (or later) attempt
            assert max(r["attempts"] for r in rows) >= 2
            assert len({r["worker"] for r in rows}) >= 2
            # applied once: per photo one sidecar upload, at most one tag assigned, one
            # audit entry; every asset recorded with its faces, none twice
            assert sorted(sidecar_puts(fake)) == sorted(f"/remote.php/dav/files/admin/{p}.xmp"
                                                        for p in photos)
            assert set(sidecar_puts(fake).values()) == {1}
            assert not tag_puts(fake) or max(tag_puts(fake).values()) == 1
            assert set(analysed_entries(a).values()) == {1}
            assert len(analysed_entries(a)) == PHOTOS
            assets = a.state.assets(connector="nc")
            assert len(assets) == PHOTOS and all(r.processing_key and r.status for r in assets)
            for row in assets:
                boxes = [f.box for f in a.state.faces("nc", row.asset_id)]
                assert len(boxes) == len(set(boxes))
                tags = fake.tags_of(row.name)
                assert tags == ([] if row.status == "no_faces" else [f"Consent: {row.status}"])
            assert a.audit.verify() >= PHOTOS
            queue.close()
        result = subprocess.run([*consentry_command(), "--config", str(config), "audit",
                                 "verify"], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        fake.close()
