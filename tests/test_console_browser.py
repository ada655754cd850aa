"""Admin pages in a real browser (Debian Chromium via Playwright), each checked with axe.

A smoke test beside tests/test_console.py: every admin page renders, the forms work without
JavaScript, and axe finds no violation (labels, contrast, lang, headings, landmarks...).
Screenshots and axe reports go to test-artifacts/ (git-ignored). Skips without Chromium.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_console import ADMIN, ALICE, PASSWORD, site  # noqa: F401  (the fixture)

CHROMIUM = Path(os.environ.get("CONSENTRY_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.skip(f"playwright not installed: {err}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_admin_pages_in_a_browser_pass_axe(site, browser):  # noqa: F811
    from axe_playwright_python.sync_playwright import Axe

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    axe, problems = Axe(), {}
    base, sid = site["base"], site["alice"].id
    page = browser.new_context(locale="en-GB").new_page()

    def check(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        report = axe.run(page).response
        (ARTIFACTS / f"{name}.axe.json").write_text(json.dumps(report["violations"], indent=2))
        if report["violations"]:
            problems[name] = [(v["id"], len(v["nodes"])) for v in report["violations"]]

    page.goto(f"{base}/admin/")
    assert "/admin/login" in page.url
    check("login")
    page.get_by_label("Username").fill(ADMIN)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/admin/")
    check("dashboard")
    for name, path in (("people", "/admin/people"), ("person", f"/admin/people/{sid}"),
                       ("consent-new", f"/admin/people/{sid}/consents/new"),
                       ("review", "/admin/review"), ("audit", "/admin/audit"),
                       ("erase", f"/admin/people/{sid}/erase"),
                       ("person-new", "/admin/people/new"), ("dashboard-nl", "/admin/?lang=nl")):
        page.goto(base + path)
        assert page.locator("h1").count() == 1, name
        check(name)
    # A form without JavaScript: search, then the skip link leads to main.
    page.goto(f"{base}/admin/people?lang=en")
    page.get_by_label("Search by name or id").fill("alice")
    page.get_by_role("button", name="Search").click()
    assert ALICE in page.content()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    assert not problems, problems
