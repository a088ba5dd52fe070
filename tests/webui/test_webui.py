"""The chat page, end to end: a real `serve run` (mock engine) driven by Debian's headless Chromium.

The mock engine runs in echo mode (the answer is the user's text, word by word, 0.05 s per word),
so answers are known in advance and their length sets how long a stream lasts. The model allows
one generation at a time and one waiting request: a third concurrent request gets 429.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing")
expect = sync_api.expect

from serve_app.local_server import LocalServe  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECONDS_PER_WORD = 0.05
FAIL_MARKER = "FAIL-AFTER-FIRST-WORD"  # the mock engine raises after one word of such a prompt

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's Chromium is not installed at /usr/bin/chromium "
        "(apt-get update && apt-get install -y chromium)",
    ),
    pytest.mark.timeout(180),  # the first test also waits for `serve run` to start
]


def words(count: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    ARTIFACTS.mkdir(exist_ok=True)
    args = {
        "engine": "mock",
        "mock_mode": "echo",
        "mock_time_per_token_sec": SECONDS_PER_WORD,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,  # Ray Serve refuses 0
        "retry_after_sec": 1,
        "mock_fail_marker": FAIL_MARKER,
    }
    with LocalServe(args, log_path=ARTIFACTS / "webui-serve.log") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser):
    """A fresh browser context (so a fresh session cookie) with the chat page loaded."""
    context = browser.new_context(base_url=server.url, viewport={"width": 900, "height": 640})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    open_page(page)
    yield page
    context.close()
    assert not errors, f"uncaught JavaScript errors: {errors}"


def open_page(page) -> None:
    page.goto("/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


# ---- helpers ----------------------------------------------------------------------------------


def send(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def assistant(page):
    return page.locator("#messages li.assistant")


def user(page):
    return page.locator("#messages li.user")


def wait_answer(page, text: str, index: int = -1) -> None:
    item = assistant(page).nth(index)
    expect(item).to_have_attribute("data-state", "done", timeout=30_000)
    expect(item.locator(".content")).to_have_text(text)


def api_get(page, server, path: str) -> dict:
    """GET with the page's own session cookie."""
    resp = page.request.get(server.url + path)
    assert resp.ok, resp.text()
    return resp.json()


def outcomes(server) -> dict:
    return httpx.get(server.url + "/outcomes", timeout=10).json()


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---- tests ------------------------------------------------------------------------------------


def test_answer_streams_in_before_it_is_complete(page):
    text = words(40, "w")  # 2 s of streaming
    send(page, text)
    expect(user(page).locator(".content")).to_have_text(text)
    # Partial text is on screen while the stream is still running.
    page.wait_for_function(
        """() => {
            const item = document.querySelector('#messages li.assistant');
            const text = item && item.querySelector('.content').textContent;
            return item.dataset.state === 'streaming' && text.includes('w3')
                && !text.includes('w39');
        }""",
        polling=20,
    )
    wait_answer(page, text)
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()


def test_history_survives_reload_and_screenshot(page, server):
    turns = ["Hello ChatStream! Please echo this.", "Streaming answers appear word by word."]
    for turn in turns:
        send(page, turn)
        wait_answer(page, turn)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(user(page).locator(".content")).to_have_text(turns)
    expect(assistant(page).locator(".content")).to_have_text(turns)
    roles = [m["role"] for m in api_get(page, server, "/history")["messages"]]
    assert roles == ["user", "assistant"] * 2
    # The README's screenshot: a third answer caught while it streams in.
    third = "Answers stream in word by word; press Stop (or Escape) to cut one short."
    send(page, third)
    expect(assistant(page).nth(2).locator(".content")).to_contain_text("word by word;")
    page.screenshot(path=str(ARTIFACTS / "webui-conversation.png"))
    wait_answer(page, third)


def test_stop_aborts_the_stream_and_server_counts_it(page, server):
    before = outcomes(server)["outcomes"]["client_disconnected_while_streaming"]
    text = words(200, "s")  # 10 s of streaming
    send(page, text)
    expect(assistant(page).locator(".content")).to_contain_text("s5")
    page.get_by_role("button", name="Stop").click()
    item = assistant(page).first
    expect(item).to_have_attribute("data-state", "stopped")
    wait_for(
        lambda: outcomes(server)["outcomes"]["client_disconnected_while_streaming"] == before + 1,
        what="client_disconnected_while_streaming to grow by one",
    )
    partial = item.locator(".content").text_content()
    assert partial.startswith("s0 s1") and "s199" not in partial
    # The server keeps the partial answer, as ChatStream does.
    history = wait_for(
        lambda: (m := api_get(page, server, "/history")["messages"]) and len(m) == 2 and m,
        what="the partial answer in /history",
    )
    assert text.startswith(history[1]["content"]) and "s199" not in history[1]["content"]
    expect(page.locator("#send")).to_be_enabled()


def test_regenerate_replaces_the_last_answer(page, server):
    send(page, "alpha beta gamma")
    wait_answer(page, "alpha beta gamma")
    first_id = assistant(page).first.get_attribute("data-message-id")
    assert first_id, "the page keeps X-ChatStream-Last-Generated-Message-Id"
    with page.expect_request("**/chat_stream") as request:
        page.get_by_role("button", name="Regenerate").click()
    assert request.value.post_data_json == {"regenerate": True}
    expect(assistant(page).first).not_to_have_attribute("data-message-id", first_id)
    wait_answer(page, "alpha beta gamma")
    # Replaced, not appended: one question and one answer, on screen and on the server.
    expect(assistant(page)).to_have_count(1)
    expect(user(page)).to_have_count(1)
    messages = api_get(page, server, "/history")["messages"]
    assert [m["content"] for m in messages] == ["alpha beta gamma"] * 2


def test_clear_empties_view_and_history(page, server):
    send(page, "to be forgotten")
    wait_answer(page, "to be forgotten")
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#messages li")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert api_get(page, server, "/history")["messages"] == []
    open_page(page)
    expect(page.locator("#messages li")).to_have_count(0)


def stream_in_background(server, text: str) -> tuple[threading.Thread, threading.Event]:
    """POST /chat_stream from a thread (its own session); the event is set at the first chunk."""
    first_chunk = threading.Event()

    def run() -> None:
        body = {"user_input": text}
        with httpx.stream("POST", server.url + "/chat_stream", json=body, timeout=30) as resp:
            for _ in resp.iter_text():
                first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, first_chunk


def test_busy_service_shows_retry_message_then_answers(page, server):
    rejected_before = outcomes(server)["rejections"].get("too_many_requests", 0)
    # Fill the only model slot, then the only queue place: the page's request gets 429.
    running, first_chunk = stream_in_background(server, words(80, "busy"))  # 4 s of streaming
    assert first_chunk.wait(15), "the slot-filling stream never started"
    queued, _ = stream_in_background(server, "queued")
    wait_for(
        lambda: httpx.get(server.url + "/load", timeout=10).json()["queued"] == 1,
        what="one request waiting in the queue (GET /load)",
    )
    try:
        send(page, "after the rush")
        expect(page.locator("#status")).to_contain_text("busy, retrying in")
    finally:
        running.join(30)
        queued.join(30)
    wait_answer(page, "after the rush")  # retried on its own once there was room
    expect(page.locator("#status")).to_be_empty()
    assert outcomes(server)["rejections"]["too_many_requests"] > rejected_before


def test_client_error_shows_server_message_and_keeps_text(page, server):
    too_long = words(2100, "x")  # more words than the mock model's 2048-token context
    expected = page.request.post(
        server.url + "/chat_stream", data={"user_input": too_long}, timeout=10_000
    )
    assert 400 <= expected.status < 500
    send(page, too_long)
    status = page.locator("#status")
    expect(status).to_have_text(expected.json()["message"])
    expect(status).to_have_attribute("data-kind", "error")
    expect(page.locator("#messages li")).to_have_count(0)  # the refused turn is not shown
    expect(page.get_by_label("Message")).to_have_value(too_long)  # and its text is not lost


def test_engine_failure_mid_stream_is_reported(page, server):
    failed_before = outcomes(server)["outcomes"]["unknown_error_occurred"]
    text = f"first {FAIL_MARKER} then nothing"
    send(page, text)
    # Chromium reports the cut body as "network error", before or after the first chunk.
    expect(page.locator("#status")).to_have_text(
        re.compile(r"^(The answer was cut off|The request failed) \(.+\)\. Please try again\.$")
    )
    expect(page.locator("#status")).to_have_attribute("data-kind", "error")
    wait_for(
        lambda: outcomes(server)["outcomes"]["unknown_error_occurred"] == failed_before + 1,
        what="unknown_error_occurred to grow by one",
    )
    # The server kept nothing of the failed turn; the page shows that and gives the text back.
    assert api_get(page, server, "/history")["messages"] == []
    expect(page.locator("#messages li")).to_have_count(0)
    expect(page.get_by_label("Message")).to_have_value(text)


def test_settings_panel_updates_session_params(page, server):
    page.get_by_text("Settings", exact=True).click()
    current = api_get(page, server, "/generation_params")
    expect(page.get_by_label("Temperature")).to_have_value(str(current["temperature"]))
    page.get_by_label("Temperature").fill("0.25")
    page.get_by_label("Max new tokens").fill("3")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#settings-status")).to_have_text("Saved.")
    params = api_get(page, server, "/generation_params")
    assert (params["temperature"], params["max_new_tokens"]) == (0.25, 3)
    # The session's max_new_tokens now cuts the echo to three words.
    send(page, "one two three four five")
    wait_answer(page, "one two three")
    # Out of range: the server refuses, the page shows why, nothing changes.
    page.get_by_label("Temperature").fill("5")
    page.get_by_role("button", name="Save settings").click()
    expected = page.request.put(server.url + "/generation_params", data={"temperature": 5})
    assert expected.status == 400
    expect(page.locator("#settings-status")).to_have_text(expected.json()["message"])
    assert api_get(page, server, "/generation_params")["temperature"] == 0.25


def test_keyboard_only(page):
    # The message box has focus on load; Shift+Enter adds a line, Enter sends.
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(page.get_by_label("Message")).to_have_value("first line\nsecond line")
    expect(page.locator("#messages li")).to_have_count(0)
    page.keyboard.press("Enter")
    wait_answer(page, "first line\nsecond line")
    assert user(page).first.locator(".content").text_content() == "first line\nsecond line"
    # Every control is reachable with Tab.
    reached = set()
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert {"regenerate", "clear", "SUMMARY", "input", "send"} <= reached
    # Every control (the closed settings panel's too) has a name a screen reader can announce.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, button, select')]
            .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute('aria-label')
                && !c.textContent.trim())
            .map((c) => c.outerHTML)"""
    )
    assert unnamed == []
    # Escape stops a running answer.
    page.get_by_label("Message").focus()
    page.keyboard.type(words(100, "k"))
    page.keyboard.press("Enter")
    expect(assistant(page).nth(1).locator(".content")).to_contain_text("k2")
    page.keyboard.press("Escape")
    expect(assistant(page).nth(1)).to_have_attribute("data-state", "stopped")


def test_narrow_screen_has_no_horizontal_scroll(page):
    page.set_viewport_size({"width": 360, "height": 640})
    send(page, "a-very-long-unbroken-word-" * 8)
    wait_answer(page, "a-very-long-unbroken-word-" * 8)
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    for control in ("#send", "#stop", "#input", "#clear"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, control
