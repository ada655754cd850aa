"""`consentry serve` (the service: webhooks, pollers, sweep, workers, health, metrics) and
`consentry status` (what the service is doing, read from the database by any process)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from plugin.cli import EXIT_FAILED, EXIT_OK, _guard, _state, app, console, err_console


@app.command()
def serve(
    bind: Annotated[str | None, typer.Option(help="address [default: service.bind]")] = None,
    port: Annotated[int | None, typer.Option(help="port [default: service.port]")] = None,
    workers: Annotated[int | None, typer.Option(
        help="embedded workers; 0 = none (run `consentry worker` instead) "
             "[default: from the queue settings]")] = None,
) -> None:
    """Run the service: webhook endpoint, pollers, consent sweep, workers, /healthz, /metrics."""
    from plugin.service.runner import Service

    service = Service(_state.config, workers=workers, embedded=workers != 0, bind=bind,
                      port=port)
    with _guard():
        service.run(on_ready=lambda url: print(f"consentry serve: listening on {url}",
                                               flush=True))
    err_console.print("consentry serve: stopped")


def _when(iso: str | None) -> str:
    if not iso:
        return "never"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Queue depth, failures and the last poll per connector (exit 1: a connector is down)."""
    from plugin.jobs import JobQueue
    from plugin.service.health import stored_health
    from plugin.settings import load
    from plugin.state import StateStore

    with _guard():
        settings = load(_state.config)
        store = StateStore(settings.state_url)
        try:
            queue = JobQueue.open(settings, store)
            try:
                depth, stats = queue.depth(), queue.summary()
            finally:
                queue.close()
            names = settings.connector_names()
            health = stored_health(store, names)
            failed_assets = {n: sum(1 for r in store.assets(connector=n) if r.last_error)
                             for n in names}
        finally:
            store.close()
    per: dict[str, dict[str, int]] = {n: {} for n in names}
    for s in stats:
        key = s.outcome or s.status
        per.setdefault(s.connector, {})[key] = per.get(s.connector, {}).get(key, 0) + s.count
    rows = []
    for name in names:
        h = health[name]
        rows.append({
            "connector": name, "state": h.state.value if h else "never polled",
            "since": h.since if h else None, "last_poll": h.last_poll if h else None,
            "last_found": h.last_found if h else 0, "jobs": per.get(name, {}),
            "failed_assets": failed_assets[name],
        })
    down = any(r["state"] not in ("ok", "never polled") for r in rows)
    if as_json:
        typer.echo(json.dumps({"queue": depth, "connectors": rows}, indent=2))
        raise typer.Exit(EXIT_FAILED if down else EXIT_OK)
    console.print("queue: " + ", ".join(f"{depth.get(k, 0)} {k}"
                                        for k in ("queued", "running", "done", "failed")))
    table = Table("connector", "state", "since", "last poll", "queued by it", "processed",
                  "skipped", "failed jobs", "failing assets")
    for r in rows:
        jobs = r["jobs"]
        state = r["state"] if r["state"] in ("ok", "never polled") else f"[red]{r['state']}[/red]"
        table.add_row(r["connector"], state, _when(r["since"]), _when(r["last_poll"]),
                      str(r["last_found"]), str(jobs.get("processed", 0)),
                      str(jobs.get("skipped", 0)), str(jobs.get("failed", 0)),
                      str(r["failed_assets"]))
    console.print(table)
    raise typer.Exit(EXIT_FAILED if down else EXIT_OK)
