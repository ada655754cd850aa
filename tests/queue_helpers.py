"""Shared set-up of the queue tests: a fake Nextcloud with real photos, a config, worker
processes (`consentry worker`) and what to count on the fake afterwards."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes.nextcloud import FakeNextcloudServer

PASSWORD = "app-secret-0001"
# Small photos keep the runs short; IMG_2043 shows the enrolled person alone.
DEMO_PHOTOS = (
    "events/2024-summit/IMG_2043.jpg", "events/2024-summit/IMG_2041.jpg",
    "events/2024-summit/IMG_2045.jpg", "events/2024-summit/IMG_2044.jpg",
    "events/2023-film-gala/IMG_0811.jpg", "events/2023-film-gala/IMG_0812.jpg",
    "events/2023-film-gala/IMG_0814.jpg", "events/2023-film-gala/IMG_0818.jpg",
    "friends-and-family/IMG_5101.jpg", "friends-and-family/IMG_5102.jpg",
    "friends-and-family/IMG_5103.jpg", "portraits/IMG_3304.jpg", "portraits/IMG_3302.jpg",
    "portraits/IMG_3303.jpg", "misc/IMG_7001.jpg", "events/2024-summit/IMG_2046.jpg",
)

CONFIG = """
[store]
state_url = "{state_url}"
vault_path = "vault.db"
vault_url = "{vault_url}"
audit_head = "audit.head"

[queue]
url = "{queue_url}"
lease_seconds = {lease}
max_attempts = {max_attempts}
retry_seconds = 1
poll_seconds = 0.2

[service]
bind = "127.0.0.1"
port = 0
poll_interval = 3600
reap_every = 0.5
shutdown_grace = 20

[[connectors]]
kind = "nextcloud"
name = "nc"
url = "{url}"
user = "admin"
include = ["Photos"]
write_mode = "{write_mode}"
{extra}
"""


def lfw_photos(testdata: Path, count: int) -> list[Path]:
    """`count` LFW crops (150 x 150, one face each), first of each person first."""
    people = sorted((testdata / "lfw-dev" / "images").iterdir())
    photos = [sorted(p.glob("*.jpg"))[0] for p in people][:count]
    if len(photos) < count:
        pytest.skip(f"only {len(photos)} LFW people in {testdata}")
    return photos


def nextcloud_setup(tmp_path: Path, demo_data: Path, engine, monkeypatch, *, count: int,
                    enroll: bool = False, photos: list[Path] | None = None,
                    write_mode: str = "sidecar", state_url: str | None = None,
                    queue_url: str = "", lease: float = 3, max_attempts: int = 5,
                    vault_url: str = "", extra: str = ""):
    """A fake Nextcloud holding `count` photos, a config for it, the vault; returns
    (fake, config path, remote names). With `enroll`, Barack Obama is enrolled with consent."""
    if write_mode != "tags-only" and shutil.which("exiftool") is None:
        pytest.skip("exiftool not installed")
    monkeypatch.setenv("CONSENTRY_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_PASSWORD", PASSWORD)
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    fake = FakeNextcloudServer(password=PASSWORD)
    sources = photos or [demo_data / "library" / p for p in DEMO_PHOTOS[:count]]
    names = []
    for i, source in enumerate(sources):
        name = f"Photos/{source.name}" if photos is None else f"Photos/{i:04d}-{source.name}"
        fake.add_file(name, source.read_bytes())
        names.append(name)
    config = tmp_path / "consentry.toml"
    config.write_text(CONFIG.format(
        url=fake.url, write_mode=write_mode, queue_url=queue_url, lease=lease,
        max_attempts=max_attempts, vault_url=vault_url, extra=extra,
        state_url=state_url or f"sqlite:///{tmp_path / 'state.db'}"))
    from plugin.keys import load_kek
    from plugin.vault import Vault

    Vault.open(vault_url or tmp_path / "vault.db", load_kek(key_file=None), create=True).close()
    if enroll:
        enroll_obama(config, demo_data, tmp_path)
    return fake, config, names


def enroll_obama(config: Path, demo_data: Path, tmp_path: Path) -> None:
    """Barack Obama with full consent (biometric included), enrolled from his reference photo."""
    from plugin import people
    from plugin.app import App
    from plugin.demo import consent_for
    from plugin.models import Subject

    with App.open(config) as a:
        now = a.pipeline.clock()
        obama = people.add_subject(a.state, a.audit, Subject(display_name="Barack Obama"))
        people.add_consent(a.state, a.audit,
                           consent_for("full", obama, now, tmp_path / "quitclaim.txt"))
        people.enroll(a.state, a.vault, a.audit, a.engine, obama,
                      [demo_data / "people/Barack_Obama/ref-1.jpg"], now=now,
                      decode_options=a.pipeline.decode_options)


def consentry_command() -> list[str]:
    script = Path(sys.executable).with_name("consentry")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from plugin.cli import main; main()"]


def start_worker(config: Path, log: Path, *, workers: int = 1, env: dict | None = None,
                 command: str = "worker") -> subprocess.Popen:
    """`consentry worker` in its own process (its jobs in `workers` child processes), or
    `consentry serve` without embedded workers."""
    out = log.open("ab")
    args = [*consentry_command(), "--config", str(config), command,
            "--workers", str(workers if command == "worker" else 0)]
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    out.close()
    return proc


def stop_worker(proc: subprocess.Popen, *, timeout: float = 60) -> int:
    """SIGTERM (graceful), then SIGKILL of the whole process group if it does not end."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _kill_leftovers(proc)
    return proc.returncode


def _kill_leftovers(proc: subprocess.Popen) -> None:
    """Children of a worker (its job processes, their exiftool) must not outlive the test."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_until_idle(queue, *, timeout: float, workers: list[subprocess.Popen]) -> None:
    """Until no job is queued or running; fails early when a worker process ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        depth = queue.depth()
        if depth["queued"] == depth["running"] == 0:
            return
        for w in workers:
            if w.poll() is not None:
                pytest.fail(f"worker ended ({w.returncode}):\n{Path(w.log).read_text()[-4000:]}")
        time.sleep(0.25)
    logs = "\n".join(Path(w.log).read_text()[-2000:] for w in workers)
    pytest.fail(f"jobs still waiting after {timeout}s: {queue.depth()}\n{logs}")


def sidecar_puts(fake: FakeNextcloudServer) -> Counter[str]:
    return Counter(p for m, p in fake.log if m == "PUT" and p.endswith(".xmp"))


def tag_puts(fake: FakeNextcloudServer) -> Counter[str]:
    """PUTs that assign a tag, per file id."""
    return Counter(p.split("/")[5] for m, p in fake.log
                   if m == "PUT" and p.startswith("/remote.php/dav/systemtags-relations/files/"))


def analysed_entries(app) -> Counter[str]:
    """Audit entries `asset.analysed` per asset: one per processed asset, never two."""
    return Counter(e["asset"] for e in app.audit.entries() if e["action"] == "asset.analysed")


def race_the_ledger(queue, *, threads: int = 6, assets: int = 40) -> None:
    """Submitters and claimers in parallel threads: each asset gets one job, each job one
    holder (the database decides, not the process)."""
    from concurrent.futures import ThreadPoolExecutor

    from plugin.models import AssetRef

    refs = [AssetRef(connector="nc", id=str(i), version="v1", name=f"Photos/{i}.jpg")
            for i in range(assets)]
    with ThreadPoolExecutor(threads) as pool:
        added = list(pool.map(lambda _: queue.submit("nc", refs, source="poll"),
                              range(threads)))
    assert sum(added) == assets, added
    ids = [r["id"] for r in queue.jobs()]
    with ThreadPoolExecutor(threads) as pool:
        claims = list(pool.map(lambda job: queue.claim(job, worker=f"t:{job}"),
                               [i for i in ids for _ in range(threads)]))
    won = Counter(c.job_id for c in claims if c is not None)
    assert sorted(won) == sorted(ids) and set(won.values()) == {1}
    assert queue.depth()["running"] == assets
