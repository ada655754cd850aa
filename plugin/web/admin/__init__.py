"""Admin console pages, mounted at /admin (route names `admin:<name>`).

Every route except login is wrapped in `security.admin_only` (admin session + CSRF on unsafe
methods); `tests/test_console.py` walks `routes` and checks that.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from plugin.web.admin import audit, auth, consents, dashboard, people, review

routes: list[BaseRoute] = [*auth.routes, *dashboard.routes, *people.routes, *consents.routes,
                           *review.routes, *audit.routes]

PUBLIC = frozenset({"login", "login_post"})  # the only routes reachable without an admin session
