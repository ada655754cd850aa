"""ACCEPTANCE (issue #9): the whole consent story in a real browser, on real photos.

Headless Chromium from Debian (/usr/bin/chromium) driven by Playwright, each actor with a fresh
profile (user-data-dir); the console and portal served by uvicorn on 127.0.0.1 in a thread.

  admin logs in -> adds a person -> records their old paper consent (ended last month)
  -> creates a renewal invitation -> the person opens the link, grants two channels and
  biometric consent, uploads a real selfie (Barack Obama's reference photo from the demo data)
  -> the library is rescanned: his photos carry his name in the XMP (read back with exiftool)
  -> the person withdraws through the receipt link -> after the sweep the name is gone.

Every page is screenshotted to test-artifacts/ (git-ignored) and checked with axe: no label or
contrast violations. Skips when Chromium or the test data is absent; with
CONSENTRY_REQUIRE_SERVICES=1 a missing Chromium fails instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from datetime import date, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from plugin.app import App
from plugin.cli import scan_app
from plugin.settings import load
from plugin.setup import initialise
from plugin.sweep import sweep
from tests.web_client import serve

CHROMIUM = Path(os.environ.get("CONSENTRY_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# axe rules about form labels, accessible names and colour contrast (WCAG 1.3.1, 1.4.3, 4.1.2).
LABEL_AND_CONTRAST = {
    "label", "label-title-only", "form-field-multiple-labels", "select-name",
    "input-button-name", "button-name", "link-name", "color-contrast", "color-contrast-enhanced",
}
PERSON = "Barack Obama"
SELFIE = "people/Barack_Obama/ref-1.jpg"
LIBRARY = {  # photo -> who the manifest says is in it
    "library/portraits/IMG_3301.jpg": "Barack_Obama",
    "library/events/2024-summit/IMG_2043.jpg": "Barack_Obama",
    "library/portraits/IMG_3310.jpg": None,
}
ADMIN, PASSWORD = "admin", "a-long-password-123"


def _chromium_or_skip() -> None:
    required = os.environ.get("CONSENTRY_REQUIRE_SERVICES") == "1"
    problem = None
    if not CHROMIUM.exists():
        problem = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import axe_playwright_python  # noqa: F401
            import playwright.sync_api  # noqa: F401
        except ImportError as err:
            problem = f"playwright / axe-playwright-python not installed: {err}"
    if problem:
        if required:
            pytest.fail(problem + " and CONSENTRY_REQUIRE_SERVICES=1")
        pytest.skip(problem)


def persons_in(files: list[Path]) -> dict[str, list[str]]:
    out = subprocess.run(["exiftool", "-j", "-struct", "-XMP-iptcExt:PersonInImage",
                          "-XMP-mwg-rs:RegionInfo", *map(str, files)],
                         check=True, capture_output=True, text=True).stdout
    found = {}
    for meta in json.loads(out):
        names = meta.get("PersonInImage") or []
        names = [names] if isinstance(names, str) else names
        regions = (meta.get("RegionInfo") or {}).get("RegionList") or []
        names += [r["Name"] for r in regions if r.get("Name")]
        found[meta["SourceFile"]] = names
    return found


class Pages:
    """Screenshot + axe for every page an actor sees."""

    def __init__(self, out: Path) -> None:
        from axe_playwright_python.sync_playwright import Axe

        self.out, self.axe, self.n, self.problems = out, Axe(), 0, []

    def check(self, page, name: str) -> None:
        self.n += 1
        page.screenshot(path=str(self.out / f"{self.n:02d}-{name}.png"), full_page=True)
        results = self.axe.run(page)
        bad = [v for v in results.response["violations"] if v["id"] in LABEL_AND_CONTRAST]
        for v in bad:
            targets = [n.get("target") for n in v.get("nodes", [])][:5]
            self.problems.append(f"{name}: {v['id']} ({v['impact']}) at {targets}")
        (self.out / f"{self.n:02d}-{name}.axe.json").write_text(
            json.dumps([{"id": v["id"], "impact": v["impact"], "help": v["help"],
                         "nodes": len(v.get("nodes", []))}
                        for v in results.response["violations"]], indent=2))


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)  # git-ignored (.gitignore)
    for old in ARTIFACTS.glob("[0-9][0-9]-*"):
        old.unlink()
    return ARTIFACTS


@pytest.mark.slow
def test_consent_portal_in_a_real_browser(tmp_path, demo_data, engine, artifacts):
    _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    lib = tmp_path / "photos"
    for rel in LIBRARY:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / rel, lib / rel)
    files = {rel: lib / rel for rel in LIBRARY}
    obama_files = [files[r] for r, who in LIBRARY.items() if who == "Barack_Obama"]
    cfg = tmp_path / "consentry.toml"
    initialise(cfg, photos=lib)
    settings = load(cfg)
    quiet = Console(file=io.StringIO())
    with App(settings, config_file=cfg, engine=engine) as app:
        from plugin.web.app import create_console_app

        assert scan_app(app, paths=[], out=quiet) == 0   # the library as it was: nobody named
        assert not any(persons_in(obama_files).values())
        web = create_console_app(settings, config_file=cfg, app=app, secret="b" * 40)
        con = web.state.console
        con.accounts.create(ADMIN, PASSWORD)
        pages = Pages(artifacts)
        with serve(web) as base, sync_playwright() as pw:
            def browser(profile: str):
                return pw.chromium.launch_persistent_context(
                    str(tmp_path / profile), executable_path=str(CHROMIUM), headless=True,
                    args=ARGS, locale="en-GB", viewport={"width": 1100, "height": 900})

            # -- the admin ----------------------------------------------------------------
            admin_ctx = browser("admin-profile")
            page = admin_ctx.new_page()
            page.goto(base + "/admin/login")
            pages.check(page, "admin-login")
            page.fill("#username", ADMIN)
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"/admin/?$"))
            pages.check(page, "admin-dashboard")

            page.goto(base + "/admin/people/new")
            page.fill("#display_name", PERSON)
            pages.check(page, "admin-person-new")
            page.click("main button[type=submit]")
            # Adding a person leads straight to recording their consent.
            page.wait_for_url(re.compile(r"/admin/people/[0-9a-f-]{36}/consents/new$"))
            subject_id = page.url.split("/people/")[1].split("/")[0]
            person_url = f"{base}/admin/people/{subject_id}"

            # His paper quitclaim from two years ago, ended last month: hence the renewal.
            today = date.today()
            page.fill("#document_ref", "paper-quitclaim-2024.pdf")
            page.fill("#document_sha256", "a" * 64)
            page.fill("#signed_at", (today - timedelta(days=730)).isoformat())
            page.fill("#valid_from", (today - timedelta(days=730)).isoformat())
            page.check("#ch_internal")
            page.fill("#publication_until", (today - timedelta(days=30)).isoformat())
            pages.check(page, "admin-consent-new")
            page.click("main form button[type=submit]")
            page.wait_for_url(person_url)
            expect(page.locator("main")).to_contain_text("paper-quitclaim-2024.pdf")
            pages.check(page, "admin-person")

            invite_link = page.locator(f"a[href$='/p/admin/invite/{subject_id}']")
            if invite_link.count():
                invite_link.first.click()
            else:  # the person page does not link it (yet): the route is the contract
                page.goto(f"{base}/p/admin/invite/{subject_id}")
            page.wait_for_url(re.compile(r"/p/admin/invite/"))
            pages.check(page, "admin-invite")
            for code in settings.policy.channels:
                if code not in ("internal", "website"):
                    page.uncheck(f"#ch-{code}")
            page.click("main form button[type=submit]")
            link = page.locator("#invite-link").input_value()
            assert link.startswith(base + "/p/i/")
            pages.check(page, "admin-invite-created")

            # -- the person, in their own browser --------------------------------------
            person_ctx = browser("person-profile")
            me = person_ctx.new_page()
            me.goto(link)
            expect(me.locator("h1")).to_contain_text("Your consent for the use of photos")
            expect(me.locator("main")).to_contain_text("What face recognition means")
            pages.check(me, "portal-invite")
            me.goto(link + "?lang=nl")
            expect(me.locator("main")).to_contain_text("Wat gezichtsherkenning betekent")
            pages.check(me, "portal-invite-nl")
            me.goto(link + "?lang=en")
            me.check("#ch-internal")
            me.check("#ch-website")
            me.check("#bio-yes")
            me.set_input_files("#selfie", str(demo_data / SELFIE))
            me.fill("#signed-name", PERSON)
            me.check("#confirm")
            me.click("main form button[type=submit]")
            me.wait_for_url(re.compile(r"/p/r/"))
            expect(me.locator("main")).to_contain_text("your answer is recorded")
            expect(me.locator("main")).to_contain_text("Face recognition: granted")
            pages.check(me, "portal-receipt")
            withdraw_url = me.locator("#withdraw-link").get_attribute("href")
            assert app.vault.subjects() and str(app.vault.subjects()[0]) == subject_id

            # The same link a second time: refused with a clear page.
            me.goto(link)
            expect(me.locator("h1")).to_contain_text("already been used")
            pages.check(me, "portal-link-used")

            # -- the library is rescanned: his photos now carry his name ---------------
            assert con.call(lambda a: scan_app(a, paths=[], out=quiet)) == 0
            named = persons_in(obama_files)
            for f in obama_files:
                assert PERSON in named[str(f)], (f, named[str(f)])
            assert not persons_in([files["library/portraits/IMG_3310.jpg"]])[
                str(files["library/portraits/IMG_3310.jpg"])]

            # -- he withdraws through the receipt link ---------------------------------
            me.goto(withdraw_url if withdraw_url.startswith("http") else base + withdraw_url)
            expect(me.locator("h1")).to_contain_text("Withdraw your consent")
            pages.check(me, "portal-withdraw")
            me.check("#confirm")
            me.click("main form button[type=submit]")
            expect(me.locator("h1")).to_contain_text("Your consent is withdrawn")
            pages.check(me, "portal-withdrawn")
            assert app.vault.subjects() == []           # templates destroyed at once

            # -- after the sweep the name is gone (the withdrawal re-labels at once, as
            # `consents withdraw` does; the sweep must agree and leave it gone) ----------
            result = con.call(lambda a: sweep(a.pipeline))
            assert subject_id in {str(s) for s in result.subjects_changed}
            gone = persons_in(obama_files)
            for f in obama_files:
                assert PERSON not in gone[str(f)], (f, gone[str(f)])

            response = page.goto(person_url)
            assert response is not None and response.status == 200, response and response.status
            pages.check(page, "admin-person-after")
            person_ctx.close()
            admin_ctx.close()
        assert pages.n >= 12
        assert not pages.problems, "axe label/contrast violations:\n" + "\n".join(pages.problems)
