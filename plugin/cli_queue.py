"""`consentry worker`: a standalone huey consumer that runs queued jobs (plugin/jobs.py).

Beside `consentry serve` on the same machine (embedded queue), or on other machines with the
Redis queue and PostgreSQL state (distributed). SIGTERM stops it gracefully.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from plugin.cli import EXIT_OK, _guard, _state, app, console, fail
from plugin.settings import load as load_settings


@app.command("worker")
def worker(
    workers: Annotated[int | None, typer.Option(
        "--workers", "-w", min=1, max=64,
        help="job processes [default: queue.workers, 0 = one per core]")] = None,
    threads: Annotated[bool, typer.Option(
        "--threads", help="threads instead of processes (I/O-bound connectors)")] = False,
    reap_every: Annotated[float | None, typer.Option(
        "--reap-every", min=0,
        help="seconds between looks for lost jobs; 0 = never [default: service.reap_every]")]
        = None,
) -> None:
    """Run queued jobs until SIGTERM (finish or release running jobs) or SIGINT."""
    from plugin.app import App
    from plugin.worker import build_consumer

    with _guard():
        settings = load_settings(_state.config)
        # Fail fast on a wrong key, vault or connector config, and migrate the state database
        # once here rather than in every job process at the same moment.
        App(settings, config_file=_state.config).close()
        consumer, queue = build_consumer(
            _state.config, settings, workers=workers,
            worker_type="thread" if threads else None, reap_every=reap_every)
    backend = "redis" if settings.queue.url else f"sqlite {settings.resolve(settings.queue.path)}"
    console.print(f"worker: {consumer.workers} {consumer.worker_type} worker(s), "
                  f"queue {backend}; SIGTERM stops gracefully", highlight=False,
                  soft_wrap=True)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("huey").setLevel(logging.WARNING)
    try:
        consumer.run()
    except OSError as err:
        raise fail(f"worker stopped: {err}") from err
    finally:
        if queue is not None:
            queue.close()
    raise typer.Exit(EXIT_OK)
