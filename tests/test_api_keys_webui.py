"""The web page against a service with API keys on: without a key it says so and opens
Settings; with the key saved there (kept in the browser) the answer streams."""

from __future__ import annotations

from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing")
expect = sync_api.expect

from serve_app.api_keys import API_KEYS_ENV  # noqa: E402
from serve_app.local_server import LocalServe  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]
KEY = "sk-browser-0123456789"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed"),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def server():
    env = {API_KEYS_ENV: f"browser:{KEY}"}
    with LocalServe({"engine": "mock", "mock_mode": "echo"}, env=env) as running:
        yield running


def test_the_page_asks_for_a_key_and_then_chats_with_it(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=server.url)
        context.set_default_timeout(15_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto("/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")

        page.get_by_label("Message").fill("hello there")
        page.get_by_label("Message").press("Enter")
        expect(page.locator("#status")).to_contain_text("needs an API key")
        expect(page.locator("#settings")).to_have_attribute("open", "")
        expect(page.get_by_label("Message")).to_have_value("hello there")  # given back

        page.get_by_label("API key").fill(KEY)
        page.get_by_role("button", name="Save key").click()
        expect(page.locator("#key-status")).to_have_text("Key saved in this browser.")
        page.get_by_label("Message").press("Enter")
        answer = page.locator("#messages li.assistant").last
        expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
        expect(answer.locator(".content")).to_have_text("hello there")

        page.reload()  # the key stays in this browser
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.get_by_label("API key")).to_have_value(KEY)
        page.locator("#settings summary").click()
        page.get_by_role("button", name="Forget key").click()
        assert page.evaluate("localStorage.getItem('chatstream_api_key')") is None
        context.close()
        browser.close()
        assert not errors, f"uncaught JavaScript errors: {errors}"
