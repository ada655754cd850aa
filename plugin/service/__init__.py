"""Service mode (`consentry serve`): one process that keeps the libraries up to date.

    webhooks ──► http.py ──► webhooks.py ──► JobQueue.submit ──► workers (plugin/jobs.py)
    pollers.py (one thread per connector) ─────┘
    scheduler.py: consent sweep, queue reaper     health.py: per-connector state → /healthz,
    metrics.py: /metrics from the database        `consentry status`, /metrics
    runner.py: wires it together, SIGTERM drains it

Nothing here imports a connector: connectors come built from the App (plugin/app.py).
"""
