"""serve_app.access without a server: who may read the operator endpoints, and the per-key
bookkeeping of the chat routes (the HTTP behaviour is in tests/test_openai_api.py)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serve_app.access import Access, check_admin
from serve_app.api_keys import API_KEYS_ENV, QuotaExceeded
from serve_app.config import ADMIN_TOKEN_ENV, ChatStreamConfig
from serve_app.refusals import Refusal

TOKEN = "admin-token-0123456789"


def request(client: str = "127.0.0.1", authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "headers": headers, "client": (client, 50000)})


@pytest.mark.parametrize("client", ["127.0.0.1", "127.8.9.10", "::1"])
def test_without_a_token_loopback_clients_are_answered(client):
    check_admin(request(client), None)


@pytest.mark.parametrize("client", ["10.1.2.3", "192.168.0.7", "2001:db8::1", "", "testclient"])
def test_without_a_token_other_clients_are_refused(client):
    with pytest.raises(Refusal) as caught:
        check_admin(request(client), None)
    assert caught.value.status_code == 403
    assert ADMIN_TOKEN_ENV in caught.value.message


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Basic dXNlcjpwYXNz", 401),
        ("Bearer", 401),
        ("Bearer wrong", 403),
        (f"Bearer {TOKEN}x", 403),
        (f"Bearer {TOKEN[:-1]}", 403),
    ],
)
def test_with_a_token_a_missing_or_wrong_one_is_refused_even_on_loopback(authorization, status):
    with pytest.raises(Refusal) as caught:
        check_admin(request("127.0.0.1", authorization), TOKEN)
    assert caught.value.status_code == status
    assert TOKEN not in caught.value.message


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_with_a_token_the_right_one_is_answered_from_anywhere(scheme):
    check_admin(request("203.0.113.9", f"{scheme} {TOKEN}"), TOKEN)


def test_keys_off_everyone_is_anonymous_and_unlimited():
    access = Access(ChatStreamConfig(engine="mock", api_key_tokens_per_minute=1), environ={})
    assert not access.keys_on
    assert access.authenticate(request()) == "anonymous"
    leases = [asyncio.run(access.admit("anonymous")) for _ in range(50)]
    access.finished("anonymous", "success", 10, 1000)
    asyncio.run(access.admit("anonymous"))  # no budget without keys
    for lease in leases:
        lease.release()


def test_keys_on_limits_and_usage_per_key():
    config = ChatStreamConfig(
        engine="mock", api_key_tokens_per_minute=100, api_key_max_concurrent_streams=1
    )
    environ = {API_KEYS_ENV: "a:key-a-0123456789\nb:key-b-0123456789", ADMIN_TOKEN_ENV: TOKEN}
    access = Access(config, environ=environ)
    assert access.admin_token == TOKEN and access.keys_on
    assert access.authenticate(request(authorization="Bearer key-b-0123456789")) == "b"
    assert access.authenticate(request(authorization="Bearer key-c-0123456789")) is None
    assert access.authenticate(request()) is None

    lease = asyncio.run(access.admit("a"))
    with pytest.raises(QuotaExceeded) as caught:
        asyncio.run(access.admit("a"))  # one stream at a time
    assert caught.value.reason == "concurrency_limit_exceeded"
    asyncio.run(access.admit("b")).release()  # another key is not affected
    lease.release()
    access.finished("a", "success", 40, 60)
    with pytest.raises(QuotaExceeded) as caught:
        asyncio.run(access.admit("a"))  # 100 tokens used in this minute
    assert caught.value.reason == "tokens_per_minute_exceeded"
    assert 59 <= caught.value.retry_after_s <= 60

    report = asyncio.run(access.usage_report())
    assert report["api_keys"] is True
    a = report["keys"]["a"]
    assert a["requests"] == {"success": 1}
    assert (a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (40, 60, 100)
    assert a["rejections"] == {"concurrency_limit_exceeded": 1, "tokens_per_minute_exceeded": 1}
    assert a["now"]["running_streams"] == 0 and a["now"]["tokens_in_window"] == 100
