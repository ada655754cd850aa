"""The web side (issue #9): the admin console and the data-subject portal.

Server-rendered HTML (Starlette + Jinja2), no JavaScript needed for any action, bound to
127.0.0.1 by default with a TLS reverse proxy in front. `app.create_console_app` builds the
ASGI app; `security` holds sessions, CSRF and login rate limiting; `i18n` the EN/NL catalogs.
"""
