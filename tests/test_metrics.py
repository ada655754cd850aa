"""/metrics: the custom collector reads the job ledger and the state database; the text it
produces parses with prometheus_client's own parser, and a running service serves it."""

from __future__ import annotations

import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from plugin.models import AssetRef
from plugin.service.health import ConnectorState, HealthBoard
from plugin.service.metrics import ConsentryCollector, registry_for
from plugin.settings import validate
from plugin.state import StateStore
from tests.test_service_http import (  # noqa: F401  (fixtures)
    CONFIG,
    SECRET,
    fake,
    hook,
    make_service,
    stub_engine,
    wait_for,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def ref(i: int) -> AssetRef:
    return AssetRef(connector="nc", id=str(i), version=f"v{i}", name=f"Photos/{i}.jpg")


def test_collector_reads_ledger_state_and_health(tmp_path):
    from plugin.jobs import JobQueue

    settings = validate({"store": {"state_url": "sqlite:///state.db"},
                         "queue": {"path": "queue.db"}}, file="t.toml", base_dir=tmp_path)
    store = StateStore(settings.state_url)
    queue = JobQueue.open(settings, store)
    try:
        assert queue.submit("nc", [ref(i) for i in range(5)], source="poll") == 5
        first, second, third = (queue.claim(i) for i in (1, 2, 3))
        queue.finish(first, outcome="processed",
                     timings={"fetch": 0.5, "analyse": 1.5, "write": 0.25})
        queue.finish(second, outcome="skipped")
        queue.finish(third, outcome="failed", error="not an image")
        queue.claim(4)  # still running
        board = HealthBoard(["nc", "photos"], store=store)
        board.failed("photos", ConnectorState.AUTH_FAILED, "credentials refused", polled=True)
        board.ok("nc", polled=True, found=5)
        text = generate_latest(registry_for(
            ConsentryCollector(queue=queue, state=store, board=board))).decode()
    finally:
        queue.close()
        store.close()
    got = samples(text)
    assert got[("consentry_queue_depth", (("status", "queued"),))] == 1
    assert got[("consentry_queue_depth", (("status", "running"),))] == 1
    assert got[("consentry_queue_depth", (("status", "done"),))] == 2
    assert got[("consentry_queue_depth", (("status", "failed"),))] == 1
    for outcome in ("processed", "skipped", "failed"):
        assert got[("consentry_assets_total", (("connector", "nc"), ("outcome", outcome)))] == 1
    assert got[("consentry_jobs", (("connector", "nc"), ("outcome", ""),
                                   ("status", "running")))] == 1
    stage = (("connector", "nc"), ("stage", "analyse"))
    assert got[("consentry_stage_seconds_sum", stage)] == 1.5
    assert got[("consentry_stage_seconds_count", stage)] == 1  # only the timed job counts
    assert got[("consentry_connector_up", (("connector", "nc"),))] == 1
    assert got[("consentry_connector_up", (("connector", "photos"),))] == 0
    assert got[("consentry_connector_state", (("connector", "photos"),
                                              ("state", "auth_failed")))] == 1
    assert got[("consentry_connector_last_poll_timestamp_seconds", (("connector", "nc"),))] > 0
    assert "Photos/" not in text  # asset names never become labels


def test_running_service_serves_metrics(fake, make_service):  # noqa: F811 (fixtures)
    service = make_service(CONFIG.format(url=fake.url, poll=0))
    fake.add_file("Photos/m.jpg", fake.files["Photos/one.jpg"].data + b"")
    answer = hook(service, "nc", *fake.webhook("Created", "Photos/m.jpg", secret=SECRET))
    assert answer.status_code == 202
    wait_for(lambda: service.queue.depth()["done"] == 1, what="job done")
    response = requests.get(f"{service.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got[("consentry_assets_total", (("connector", "nc"), ("outcome", "processed")))] == 1
    assert got[("consentry_assets_by_status", (("connector", "nc"), ("status", "missing")))] == 1
    assert got[("consentry_stage_seconds_count", (("connector", "nc"), ("stage", "fetch")))] == 1
    assert got[("consentry_connector_state", (("connector", "nc"), ("state", "ok")))] == 1
