"""ChatStream's original three endpoint examples, as written, run against the facade on Serve."""

from __future__ import annotations

import httpx
import pytest

from serve_app.local_server import LocalServe
from tests.support import new_request_id, wait_for


@pytest.fixture(scope="module")
def service():
    args = {"engine": "mock", "mock_mode": "echo", "mock_time_per_token_sec": 0.02}
    with LocalServe(args, import_path="serve_app.examples.seed_endpoints:build") as server:
        yield server


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def callbacks_for(client: httpx.Client, request_id: str) -> list[dict]:
    """What the example's completion callback recorded for `request_id`."""
    return [c for c in client.get("/callbacks").json() if c["request_id"] == request_id]


def test_plain_endpoint_streams_the_answer(service, client):
    request_id = new_request_id("plain")
    response = client.post(
        "/chat_stream",
        json={"user_input": "plain form works"},
        headers={"X-ChatStream-Request-Id": request_id},
    )
    assert response.status_code == 200
    assert response.text == "plain form works"
    assert response.headers["X-ChatStream-Request-Id"] == request_id


def test_intercepted_body_is_handed_over(client):
    response = client.post(
        "/chat_stream_intercepted", json={"user_input": "read twice", "regenerate": False}
    )
    assert response.status_code == 200
    assert response.text == "read twice"
    assert client.get("/history").status_code == 404  # the example app has only its own routes


def test_callback_fires_once_with_the_session_prompt(service, client):
    request_id = new_request_id("cb")
    response = client.post(
        "/chat_stream_with_callback",
        json={"user_input": "call me back"},
        headers={"X-ChatStream-Request-Id": request_id},
    )
    assert response.text == "call me back"

    (call,) = wait_for(lambda: callbacks_for(client, request_id))
    assert call["message"] == "success"
    assert call["prompt"].count("call me back") == 2  # the question and the saved answer


def test_callback_reports_a_disconnect(service, client):
    request_id = new_request_id("cb-gone")
    with client.stream(
        "POST",
        "/chat_stream_with_callback",
        json={"user_input": " ".join(f"w{i}" for i in range(200)), "max_new_tokens": 200},
        headers={"X-ChatStream-Request-Id": request_id},
    ) as response:
        next(response.iter_text())

    (call,) = wait_for(lambda: callbacks_for(client, request_id))
    assert call["message"] == "client_disconnected_while_streaming"
