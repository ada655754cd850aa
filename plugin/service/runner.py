"""`Service`: everything `consentry serve` runs, started in order and drained in reverse.

    start: control App (connectors, state, audit; migrates the database) → queue → embedded
           workers → pollers, sweep, reaper → HTTP (the socket is bound first, so port 0
           works and is printed)
    stop:  HTTP (no new webhooks) → pollers and schedules → workers (take no new job; the
           running ones finish within shutdown_grace or are released to the queue) → queue →
           audit head flushed → App closed

SIGTERM and SIGINT only set an event; the shutdown itself runs in the main thread, in that
order, so a systemd stop never cuts a job or the audit chain in half.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.routing import BaseRoute, Mount

from plugin.errors import ConfigError
from plugin.models import AssetRef
from plugin.service.health import HealthBoard
from plugin.service.http import build_http_app
from plugin.service.metrics import ConsentryCollector, registry_for
from plugin.service.pollers import Poller, needs_work
from plugin.service.scheduler import Every
from plugin.service.webhooks import Webhooks

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config_file: Path, *, workers: int | None = None, embedded: bool = True,
                 bind: str | None = None, port: int | None = None,
                 routes: Sequence[BaseRoute] = (), app_options: dict[str, Any] | None = None
                 ) -> None:
        self.config_file = config_file
        self._bind, self._port = bind, port
        self._workers = workers
        self._embedded = embedded
        self._routes = routes
        self._app_options = app_options or {}
        self._stopping = threading.Event()
        self._submit_lock = threading.Lock()
        self._threads: list[Every] = []
        self.pollers: dict[str, Poller] = {}
        self.app: Any = None
        self.console_app: Any = None
        self.queue: Any = None
        self.consumer: Any = None
        self.server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self.url = ""

    # -- start -------------------------------------------------------------------------
    def start(self) -> Service:
        from plugin.app import App
        from plugin.jobs import JobQueue
        from plugin.settings import load as load_settings
        from plugin.worker import start_consumer

        try:
            settings = load_settings(self.config_file)
            svc = settings.service
            # The App first: it migrates the state database, which workers opening theirs at
            # the same moment must not also try (they would race on a fresh database).
            self.app = App(settings, config_file=self.config_file, **self._app_options)
            self.queue = JobQueue.open(settings, self.app.state)
            if self._embedded:  # before any thread of ours: process workers are forked
                self.consumer = start_consumer(self.config_file, workers=self._workers or 0,
                                               settings=settings)
            names = list(self.app.connectors)
            self.board = HealthBoard(names, store=self.app.state)
            services = {n: settings.connector_service(n) for n in names}
            for name in names:
                interval = services[name].poll_interval
                interval = svc.poll_interval if interval is None else interval
                self.pollers[name] = Poller(name, interval, pipeline=self.app.pipeline,
                                            submit=self.submit, board=self.board)
            self._threads += self.pollers.values()
            if svc.sweep_every:
                self._threads.append(Every("sweep", svc.sweep_every, self._sweep))
            if svc.reap_every:
                self._threads.append(Every("reaper", svc.reap_every, self.queue.reap,
                                           run_first=False))
            pipeline = self.app.pipeline
            webhooks = Webhooks(connectors=self.app.connectors, services=services,
                                submit=self.submit, trigger=self.trigger, board=self.board,
                                needs_work=lambda ref: needs_work(pipeline, ref),
                                forget=self._forget)
            routes = list(self._routes)
            if svc.console:
                routes.append(self._console(settings))
            registry = registry_for(ConsentryCollector(queue=self.queue, state=self.app.state,
                                                       board=self.board))
            http_app = build_http_app(webhooks=webhooks, board=self.board, registry=registry,
                                      max_body_bytes=svc.max_body_bytes,
                                      queue_depth=self.queue.depth, routes=routes)
            bind = self._bind or svc.bind
            port = svc.port if self._port is None else self._port
            sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind, port))
            except OSError as err:
                sock.close()
                raise ConfigError(f"cannot listen on {bind}:{port}: {err.strerror}",
                                  key="service.bind/service.port") from err
            host, port = sock.getsockname()[:2]
            self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            self.server = uvicorn.Server(uvicorn.Config(
                http_app, log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=5))
            for thread in self._threads:
                thread.start()
            self._http_thread = threading.Thread(target=self.server.run, kwargs={
                "sockets": [sock]}, name="consentry-http", daemon=True)
            self._http_thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """True once the HTTP server accepts connections."""
        done = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self.server is not None and self.server.started:
                return True
            done.wait(0.02)
        return False

    # -- what the parts call -----------------------------------------------------------
    def submit(self, connector: str, refs: Sequence[AssetRef], source: str) -> int:
        # One writer at a time from this process: webhooks arrive on many threads at once.
        with self._submit_lock:
            return self.queue.submit(connector, refs, source=source)

    def trigger(self, connector: str) -> None:
        poller = self.pollers.get(connector)
        if poller is not None:
            poller.trigger()

    def _sweep(self) -> None:
        """What `consentry sweep` does, expiry alerts to the admin included."""
        from plugin.alerts import ExpiryAlerts
        from plugin.sweep import sweep

        result = sweep(self.app.pipeline, alerts=ExpiryAlerts.from_app(self.app))
        log.info("sweep: %d subject(s) changed, %d asset(s) re-labelled",
                 len(result.subjects_changed), len(result.results))

    # -- run and stop ------------------------------------------------------------------
    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain (main thread only)."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if not self.wait_ready():
                raise RuntimeError("the HTTP server did not start")
            if on_ready is not None:
                on_ready(self.url)
            self._stopping.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping.set()

    def request_stop(self) -> None:
        self._stopping.set()

    def _forget(self, name: str, connector: Any) -> int:
        """Drop the records of assets a webhook reported deleted (HTTP threads share the App's
        state and audit, both safe across threads)."""
        from plugin.forget import forget_reported

        return forget_reported(self.app.state, self.app.audit, connector, name)

    def _console(self, settings: Any) -> BaseRoute:
        """The admin console and consent portal, served from this process (service.console).

        They get an App of their own: its exiftool process and vault connection are then
        never shared with the pollers' and the sweep's threads.
        """
        from plugin.app import App
        from plugin.web.app import create_console_app

        self.console_app = App(settings, config_file=self.config_file, **self._app_options)
        return Mount("/", app=create_console_app(settings, config_file=self.config_file,
                                                 app=self.console_app))

    def stop(self) -> None:
        """Drain in order; safe to call twice and after a failed start."""
        self._stopping.set()
        if self.server is not None:
            self.server.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
            self._http_thread = None
        for thread in self._threads:
            thread.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        self._threads = []
        if self.consumer is not None:
            grace = self.app.settings.service.shutdown_grace if self.app else 0
            try:
                self.consumer.stop(graceful=grace > 0)
            except Exception:
                log.exception("stopping the workers failed")
            self.consumer = None
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if self.console_app is not None:
            self.console_app.close()
            self.console_app = None
        if self.app is not None:
            try:
                self.app.audit.sync_head()
            finally:
                self.app.close()
                self.app = None
