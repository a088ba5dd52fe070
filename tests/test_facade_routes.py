"""A user's own routes in front of both APIs, through the facade
(serve_app/examples/own_routes.py): the edge's checks and the callback rules hold there too."""

from __future__ import annotations

import httpx
import pytest

from serve_app.api_keys import API_KEYS_ENV
from serve_app.local_server import LocalServe
from tests.support import new_request_id, wait_for

KEY = "facade-key-0123456789"


@pytest.fixture(scope="module")
def service():
    args = {"engine": "mock", "mock_mode": "echo", "api_key_max_concurrent_streams": 1}
    with LocalServe(
        args,
        import_path="serve_app.examples.own_routes:build",
        env={API_KEYS_ENV: f"alice:{KEY}"},
    ) as server:
        yield server


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def callback_for(client: httpx.Client, request_id: str) -> dict:
    calls = wait_for(
        lambda: [c for c in client.get("/my/callbacks").json() if c["request_id"] == request_id]
    )
    assert len(calls) == 1
    return calls[0]


def test_a_users_chat_route_needs_the_api_key(client):
    """The facade checked no key: with keys on, a user's own route answered anyone."""
    refused = client.post("/my/chat", json={"user_input": "no key"})
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_api_key"
    answered = client.post(
        "/my/chat", json={"user_input": "with key"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answered.status_code == 200 and answered.text == "with key"


def test_a_users_completions_route_needs_the_api_key_and_answers_in_openais_shape(client):
    refused = client.post(
        "/my/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_v1_callbacks_run_on_the_bounded_callback_pool(client):
    """The /v1 path ran sync callbacks with `asyncio.to_thread`, outside the bounded pool
    (`callback_threads`) that every other callback uses."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in (
        ("/my/chat", {"user_input": "pool one"}),
        ("/my/v1/chat/completions",
         {"model": "mock", "messages": [{"role": "user", "content": "pool two"}]}),
    ):  # fmt: skip
        request_id = new_request_id("pool")
        response = client.post(
            path, json=body, headers={**headers, "X-ChatStream-Request-Id": request_id}
        )
        assert response.status_code == 200
        call = callback_for(client, request_id)
        assert call["message"] == "success"
        assert call["thread"].startswith("chatstream-callback"), call
