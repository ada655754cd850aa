"""`consentry serve` over real HTTP on 127.0.0.1: webhooks end to end through the queue
(embedded workers), refusals that queue nothing, a burst, /healthz, and SIGTERM draining."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from plugin.engine import Detection
from plugin.models import FaceBox
from tests.fakes.nextcloud import FakeNextcloudServer

PASSWORD = "app-secret-0001"
SECRET = "hook-secret-0002"
REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
[store]
state_url = "sqlite:///state.db"
vault_path = "vault.db"
audit_head = "audit.head"

[queue]
path = "queue.db"
worker_type = "thread"
poll_seconds = 0.05
lease_seconds = 30

[service]
bind = "127.0.0.1"
port = 0
sweep_every = 0
reap_every = 0
shutdown_grace = 5

[[connectors]]
kind = "nextcloud"
name = "nc"
url = "{url}"
user = "admin"
include = ["Photos"]
write_mode = "tags-only"
max_attempts = 1
timeout = 5
poll_interval = {poll}
"""


class StubEngine:
    """One 'face' in every photo, far from everyone: status `missing`, fast, deterministic."""

    version = "stub-engine-1"
    quality = None  # no quality gates: the stub's face is what it is

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        h, w = image.pixels.shape[:2]
        box = FaceBox(top=1, right=max(2, w // 2), bottom=max(2, h // 2), left=1)
        return [Detection(rect=(box.top, box.right, box.bottom, box.left), box=box, score=1.0)]

    def encode(self, image, faces):
        return np.full((len(faces), 128), 0.5)


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, 90)).save(out, "JPEG")
    return out.getvalue()


def wait_for(check: Callable[[], object], *, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def new_key(monkeypatch, tmp_path: Path) -> None:
    from plugin.keys import load_kek
    from plugin.vault import Vault

    monkeypatch.setenv("CONSENTRY_KEY", base64.b64encode(os.urandom(32)).decode())
    Vault.open(tmp_path / "vault.db", load_kek(key_file=None), create=True).close()


@pytest.fixture
def fake():
    server = FakeNextcloudServer(password=PASSWORD)
    server.add_file("Photos/one.jpg", jpeg(1))
    yield server
    server.close()


@pytest.fixture
def stub_engine(monkeypatch):
    engine = StubEngine()
    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    return engine


@pytest.fixture
def make_service(tmp_path, monkeypatch, stub_engine):
    """Start a Service on a free port for a config text; stopped at the end of the test."""
    from plugin.service.runner import Service

    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_PASSWORD", PASSWORD)
    monkeypatch.setenv("CONSENTRY_NEXTCLOUD_WEBHOOK_SECRET", SECRET)
    started: list[Service] = []

    def make(text: str, *, workers: int = 1, keep_key: bool = False) -> Service:
        if not keep_key:
            new_key(monkeypatch, tmp_path)
        config = tmp_path / "consentry.toml"
        config.write_text(text)
        service = Service(config, workers=workers).start()
        started.append(service)
        assert service.wait_ready(), "HTTP server did not start"
        return service

    yield make
    for service in started:
        service.stop()


def jobs(service) -> list[dict]:
    return service.queue.jobs()


def idle(service) -> bool:
    depth = service.queue.depth()
    return depth["queued"] == 0 and depth["running"] == 0


def hook(service, name: str, headers: dict, body: bytes) -> requests.Response:
    return requests.post(f"{service.url}/hooks/{name}", headers=headers, data=body, timeout=10)


def test_valid_event_is_processed_end_to_end(fake, make_service):
    service = make_service(CONFIG.format(url=fake.url, poll=0))
    fake.add_file("Photos/new.jpg", jpeg(2))
    answer = hook(service, "nc", *fake.webhook("Created", "Photos/new.jpg", secret=SECRET))
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"queued": 1, "assets": 1}
    wait_for(lambda: [j for j in jobs(service) if j["status"] == "done"], what="job done")
    (job,) = jobs(service)
    assert (job["source"], job["outcome"], job["asset_id"]) == (
        "webhook", "processed", str(fake.files["Photos/new.jpg"].fileid))
    assert fake.tags_of("Photos/new.jpg") == ["Consent: missing"]  # written back on the platform
    assert fake.tags_of("Photos/one.jpg") == []  # only the announced file was touched
    # the event our own write-back causes (or a repeat delivery) queues nothing new
    answer = hook(service, "nc", *fake.webhook("Written", "Photos/new.jpg", secret=SECRET))
    assert answer.status_code == 202 and answer.json() == {"queued": 0, "assets": 1}
    assert len(jobs(service)) == 1


def test_refused_calls_queue_nothing(fake, make_service, caplog):
    service = make_service(CONFIG.format(url=fake.url, poll=0))
    headers, body = fake.webhook("Created", "Photos/one.jpg", secret=SECRET)
    wrong = {**headers, "X-Consentry-Secret": "not-the-secret"}
    missing = {k: v for k, v in headers.items() if k != "X-Consentry-Secret"}
    fake.log.clear()
    assert hook(service, "nc", wrong, body).status_code == 401
    assert hook(service, "nc", missing, body).status_code == 401
    assert hook(service, "nope", headers, body).status_code == 404
    assert hook(service, "nc", headers, b"{not json").status_code == 400
    assert hook(service, "nc", headers, b'["an", "array"]').status_code == 400
    assert hook(service, "nc", headers, b'{"event": 1}').status_code == 400
    big = json.dumps({"event": {"pad": "x" * 1_100_000}}).encode()
    assert hook(service, "nc", headers, big).status_code == 413

    def chunks():
        for _ in range(40):
            yield b"x" * 50_000  # no Content-Length: chunked, cut off at the limit

    answer = requests.post(f"{service.url}/hooks/nc", headers=headers, data=chunks(), timeout=10)
    assert answer.status_code == 413
    assert requests.get(f"{service.url}/hooks/nc", timeout=5).status_code == 405
    assert jobs(service) == []
    assert fake.log == []  # nothing was even looked up on the platform
    assert SECRET not in caplog.text and "not-the-secret" not in caplog.text


def test_hmac_signature_and_poll_trigger_for_connectors_without_parse_webhook(
        tmp_path, make_service):
    library = tmp_path / "library"
    library.mkdir()
    text = CONFIG.split("[[connectors]]")[0] + f"""
[[connectors]]
kind = "folder"
name = "photos"
root = "{library}"
poll_interval = 0
webhook_secret = "folder-secret"
"""
    service = make_service(text)
    (library / "a.jpg").write_bytes(jpeg(5))
    body = b'{"changed": "somewhere"}'
    signature = "sha256=" + hmac.new(b"folder-secret", body, hashlib.sha256).hexdigest()
    assert hook(service, "photos", {"X-Consentry-Signature": "sha256=" + "0" * 64},
                body).status_code == 401
    assert hook(service, "photos", {"X-Consentry-Signature": signature},
                body + b" ").status_code == 401  # signature of another body
    assert jobs(service) == []
    answer = hook(service, "photos", {"X-Consentry-Signature": signature}, body)
    assert answer.status_code == 202 and answer.json()["poll"] == "triggered"
    wait_for(lambda: [j for j in jobs(service) if j["status"] == "done"], what="poll + job")
    assert [(j["source"], j["outcome"]) for j in jobs(service)] == [("poll", "processed")]
    answer = hook(service, "photos", {"X-Consentry-Secret": "folder-secret"}, b"")
    assert answer.status_code == 202  # the shared-secret header works too; empty body is fine


def test_burst_of_webhooks_all_handled_once(fake, make_service, stub_engine):
    names = [f"Photos/burst/{i:03d}.jpg" for i in range(50)]
    for i, name in enumerate(names):
        fake.add_file(name, jpeg(i + 10))
    # One worker thread: thread workers opening their App at the same moment race in
    # alembic's global context (process workers, the default, do not share it).
    service = make_service(CONFIG.format(url=fake.url, poll=0), workers=1)
    calls = [fake.webhook(event, name, secret=SECRET)
             for event in ("Created", "Written", "Written", "Written") for name in names]
    assert len(calls) == 200
    with ThreadPoolExecutor(16) as pool, requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
        answers = list(pool.map(lambda c: session.post(
            f"{service.url}/hooks/nc", headers=c[0], data=c[1], timeout=30), calls))
    assert Counter(a.status_code for a in answers) == {202: 200}
    wait_for(lambda: idle(service), timeout=60, what="queue drained")
    done = jobs(service)
    assert {j["status"] for j in done} == {"done"}
    processed = Counter(j["asset_id"] for j in done if j["outcome"] == "processed")
    ids = {str(fake.files[n].fileid) for n in names}
    assert set(processed) == ids and set(processed.values()) == {1}  # each analysed once
    assert stub_engine.calls == 50
    assert all(fake.tags_of(n) == ["Consent: missing"] for n in names)


def test_healthz_follows_the_platform(fake, make_service):
    service = make_service(CONFIG.format(url=fake.url, poll=0.2))

    def health() -> tuple[int, dict]:
        answer = requests.get(f"{service.url}/healthz", timeout=5)
        return answer.status_code, answer.json()

    wait_for(lambda: service.board.snapshot()["nc"].last_poll, what="first poll")
    code, body = health()
    assert code == 200 and body["status"] == "ok" and body["connectors"]["nc"]["state"] == "ok"
    assert set(body["queue"]) == {"queued", "running", "done", "failed"}

    jobs_before = len(jobs(service))
    fake.knobs.fail_rate = 1.0  # the platform answers 503 / 429 to everything
    code, body = wait_for(lambda: (h := health())[0] == 503 and h, what="unavailable")
    assert body["status"] == "degraded"
    nc = body["connectors"]["nc"]
    assert nc["state"] == "unavailable" and nc["since"] and nc["detail"]
    answer = hook(service, "nc", *fake.webhook("Written", "Photos/one.jpg", secret=SECRET))
    assert answer.status_code == 503 and len(jobs(service)) == jobs_before  # poller catches up
    fake.knobs.fail_rate = 0.0
    wait_for(lambda: health()[0] == 200, what="recovery")

    fake.password = "changed-on-the-server"  # our app password is refused now
    code, body = wait_for(lambda: (h := health())[0] == 503 and h, what="auth failure")
    assert body["connectors"]["nc"]["state"] == "auth_failed"
    assert PASSWORD not in json.dumps(body)
    answer = hook(service, "nc", *fake.webhook("Written", "Photos/one.jpg", secret=SECRET))
    assert answer.status_code == 503 and len(jobs(service)) == jobs_before
    fake.password = PASSWORD
    wait_for(lambda: health()[0] == 200, what="recovery after auth")

    fake.close()  # the platform is gone altogether; a real server's going drops the
    service.app.connectors["nc"].http.session.close()  # kept-alive connections too
    code, body = wait_for(lambda: (h := health())[0] == 503 and h, what="server down")
    assert body["connectors"]["nc"]["state"] == "unavailable"


def test_stop_lets_running_jobs_finish(fake, make_service, stub_engine, monkeypatch):
    """Graceful stop within shutdown_grace: the running job ends `done`, the rest stay queued."""
    for i in range(6):
        fake.add_file(f"Photos/slow/{i}.jpg", jpeg(i + 3))
    slow = stub_engine.detect

    def detect(image):
        time.sleep(0.4)
        return slow(image)

    monkeypatch.setattr(stub_engine, "detect", detect)
    service = make_service(CONFIG.format(url=fake.url, poll=3600))
    wait_for(lambda: service.queue.depth()["running"], what="a running job")
    service.stop()
    statuses = Counter(j["status"] for j in service_jobs(service))
    assert statuses["running"] == 0 and statuses["done"] >= 1, statuses
    assert statuses["done"] + statuses["queued"] == 7, statuses


def service_jobs(service) -> list[dict]:
    from plugin.jobs import JobQueue
    from plugin.settings import load
    from plugin.state import StateStore

    settings = load(service.config_file)
    store = StateStore(settings.state_url)
    queue = JobQueue.open(settings, store)
    try:
        return queue.jobs()
    finally:
        queue.close()
        store.close()


def test_sigterm_drains_a_serve_subprocess(tmp_path):
    """A real `consentry serve` (process workers, the default): SIGTERM while jobs run → exit 0;
    jobs still running after shutdown_grace are interrupted and released, none left claimed."""
    library = tmp_path / "library"
    library.mkdir()
    for i in range(8):
        Image.new("RGB", (900, 700), (i * 20, 80, 120)).save(library / f"p{i:02d}.jpg")
    config = tmp_path / "consentry.toml"
    config.write_text(CONFIG.split("[[connectors]]")[0].replace(
        'worker_type = "thread"', 'worker_type = "process"').replace(
        "shutdown_grace = 5", "shutdown_grace = 1") + f"""
[[connectors]]
kind = "folder"
name = "photos"
root = "{library}"
write_mode = "sidecar"
poll_interval = 3600
""")
    env = {**os.environ, "CONSENTRY_KEY": base64.b64encode(os.urandom(32)).decode(),
           "CONSENTRY_CONFIG": str(config), "CONSENTRY_ENGINE__WORKERS": "1"}
    from plugin.vault import Vault

    Vault.open(tmp_path / "vault.db", base64.b64decode(env["CONSENTRY_KEY"]), create=True).close()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "consentry"), "serve",
                             "--workers", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split("listening on ")[1].strip()

        def running() -> bool:
            text = requests.get(f"{url}/metrics", timeout=5).text
            return 'consentry_queue_depth{status="running"} 0.0' not in text

        wait_for(running, timeout=60, what="a job running")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "consentry serve: stopped" in err
    import sqlalchemy as sa

    from plugin.jobs import jobs as jobs_table

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.select(jobs_table.c.status, jobs_table.c.error)).all()
    engine.dispose()
    statuses = Counter(r.status for r in rows)
    assert statuses["running"] == 0 and len(rows) == 8, statuses  # none left claimed
    # finished (done, or failed with its reason) or back in the queue: nothing in between
    assert set(statuses) <= {"done", "failed", "queued"}, statuses
    assert all(r.error for r in rows if r.status == "failed"), [r.error for r in rows]
    released = [r for r in rows if r.error == "worker stopped during the job"]
    ended = statuses["done"] + statuses["failed"] + len(released)
    assert ended >= 1, (statuses, err[-3000:])  # the running ones finished or went back


def test_port_in_use_is_a_clear_config_error(fake, tmp_path, monkeypatch, stub_engine):
    import socket

    from plugin.errors import ConfigError
    from plugin.service.runner import Service

    new_key(monkeypatch, tmp_path)
    config = tmp_path / "consentry.toml"
    config.write_text(CONFIG.format(url=fake.url, poll=0))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(config, workers=1, port=port)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            service.start()
    assert service.app is None and service.consumer is None  # everything opened was closed


def test_real_face_named_through_the_service(fake, make_service, engine, demo_data, tmp_path,
                                             monkeypatch):
    """The real engine behind the embedded worker: an enrolled, consenting person's photo
    arrives by webhook and ends `cleared` on the platform."""
    from tests.queue_helpers import enroll_obama

    monkeypatch.setattr("plugin.app.default_engine", lambda settings: engine)
    config = tmp_path / "consentry.toml"
    config.write_text(CONFIG.format(url=fake.url, poll=0))
    new_key(monkeypatch, tmp_path)
    enroll_obama(config, demo_data, tmp_path)
    service = make_service(config.read_text(), keep_key=True)
    name = "Photos/Summit/IMG_2043.jpg"
    fake.add_file(name, (demo_data / "library/events/2024-summit/IMG_2043.jpg").read_bytes())
    answer = hook(service, "nc", *fake.webhook("Created", name, secret=SECRET))
    assert answer.status_code == 202 and answer.json()["queued"] == 1
    wait_for(lambda: service.queue.depth()["done"] == 1, timeout=60, what="job done")
    assert fake.tags_of(name) == ["Consent: cleared"]
    assert service.app.audit.verify() > 0


def test_console_and_portal_served_from_the_service_process(fake, make_service):
    """service.console: the admin pages and the portal answer on the service's own port,
    behind the login, beside the webhook endpoint."""
    text = CONFIG.format(url=fake.url, poll=0).replace(
        "shutdown_grace = 5", 'shutdown_grace = 5\nconsole = true')
    service = make_service(text.replace("[service]", '[console]\nsecret_file = "c.secret"\n\n'
                                        "[service]"))
    page = requests.get(f"{service.url}/admin/", timeout=10, allow_redirects=False)
    assert page.status_code in (302, 303, 307)
    assert "/admin/login" in page.headers["location"]
    login = requests.get(f"{service.url}/admin/login", timeout=10)
    assert login.status_code == 200 and 'type="hidden"' in login.text
    assert requests.get(f"{service.url}/p/i/not-a-token", timeout=10).status_code in (400, 404)
    assert requests.get(f"{service.url}/healthz", timeout=10).status_code == 200
    assert (service.config_file.parent / "c.secret").stat().st_mode & 0o777 == 0o600


def test_a_delete_event_forgets_the_assets_records(fake, make_service):
    service = make_service(CONFIG.format(url=fake.url, poll=0))
    fake.add_file("Photos/new.jpg", jpeg(2))
    hook(service, "nc", *fake.webhook("Created", "Photos/new.jpg", secret=SECRET))
    wait_for(lambda: [j for j in jobs(service) if j["status"] == "done"], what="job done")
    fileid = fake.files["Photos/new.jpg"].fileid
    state = service.app.state
    assert state.asset("nc", str(fileid)) is not None and state.faces("nc", str(fileid))
    fake.delete("Photos/new.jpg")
    answer = hook(service, "nc", *fake.webhook("Deleted", "Photos/new.jpg", secret=SECRET,
                                                fileid=fileid))
    assert answer.status_code == 202 and answer.json()["queued"] == 0
    assert state.asset("nc", str(fileid)) is None and state.faces("nc", str(fileid)) == []
    actions = [e["action"] for e in service.app.audit.entries()]
    assert actions.count("asset.forgotten") == 1
    assert service.app.audit.verify() > 0
