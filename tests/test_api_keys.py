"""serve_app.api_keys: loading, hashed lookup, per-key limits with a fake clock, usage."""

from __future__ import annotations

import pytest

from serve_app import api_keys
from serve_app.api_keys import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    ApiKeyError,
    ApiKeyRing,
    KeyLimits,
    KeyQuotas,
    KeyUsage,
    QuotaExceeded,
    bearer_token,
    load_api_keys,
)

KEYS = """
# team keys
alice:sk-alice-0123456789
bob : sk-bob:with:colons
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------- keys
def test_lookup_by_bearer_token():
    ring = ApiKeyRing.from_lines(KEYS)
    assert ring.key_ids == ["alice", "bob"]
    assert ring.authenticate("Bearer sk-alice-0123456789") == "alice"
    assert ring.authenticate("bearer   sk-bob:with:colons ") == "bob"
    assert ring.authenticate("Bearer sk-alice-012345678") is None
    assert ring.authenticate("Basic sk-alice-0123456789") is None
    assert ring.authenticate("Bearer ") is None
    assert ring.authenticate(None) is None
    assert bearer_token("Bearer abc") == "abc"


def test_keys_are_kept_only_hashed():
    ring = ApiKeyRing.from_lines(KEYS)
    stored = repr(vars(ring))
    assert "sk-alice" not in stored and "sk-bob" not in stored
    assert all(len(digest) == 32 for _, digest in ring._entries)
    assert repr(ring) == "ApiKeyRing(key_ids=['alice', 'bob'])"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "holds no API key"),
        ("# only a comment\n", "holds no API key"),
        ("no-colon-here-secret", "line 1"),
        ("bad id:sk-secret-123456", "line 1"),
        ("alice:xQz9", "shorter than"),
        ("alice:sk-secret-123456\nalice:sk-secret-654321", "appears twice"),
        ("alice:sk-secret-123456\nbob:sk-secret-123456", "repeats another"),
    ],
)
def test_bad_key_lines(text, fragment):
    with pytest.raises(ApiKeyError, match=fragment) as info:
        ApiKeyRing.from_lines(text)
    assert "sk-secret" not in str(info.value) and "xQz9" not in str(info.value)


def test_load_from_env_or_file(tmp_path):
    assert load_api_keys({}) is None
    assert load_api_keys({API_KEYS_ENV: KEYS}).key_ids == ["alice", "bob"]
    path = tmp_path / "keys"
    path.write_text("carol:sk-carol-0123456789\n")
    assert load_api_keys({API_KEYS_FILE_ENV: str(path)}).authenticate(
        "Bearer sk-carol-0123456789"
    ) == ("carol")
    with pytest.raises(ApiKeyError, match="only one"):
        load_api_keys({API_KEYS_ENV: KEYS, API_KEYS_FILE_ENV: str(path)})
    with pytest.raises(ApiKeyError, match="cannot read"):
        load_api_keys({API_KEYS_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(ApiKeyError, match="holds no API key"):  # set but empty: fail closed
        load_api_keys({API_KEYS_ENV: ""})


# ---------------------------------------------------------------------------------- limits
def test_concurrent_streams_with_a_computed_retry_after():
    clock = FakeClock()
    quotas = KeyQuotas(KeyLimits(max_concurrent_streams=2), clock=clock)
    first, second = quotas.admit("alice"), quotas.admit("alice")
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit("alice")
    assert info.value.reason == "concurrency_limit_exceeded"
    assert info.value.retry_after_s == api_keys.DEFAULT_STREAM_RETRY_AFTER_S  # no history yet
    assert "alice" in info.value.message
    other = quotas.admit("bob")  # a key at its limit does not hold back another key

    clock.advance(10)
    first.release()
    first.release()  # idempotent
    assert quotas.snapshot("alice")["running_streams"] == 1
    third = quotas.admit("alice")  # started at t+10
    clock.advance(4)
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit("alice")
    # Streams last ~10 s; the oldest running one (second) is 14 s old: overdue, retry soon.
    assert info.value.retry_after_s == api_keys.MIN_RETRY_AFTER_S
    second.release()  # lasted 14 s: mean 10 + 0.2 * (14 - 10) = 10.8
    clock.advance(1)
    fourth = quotas.admit("alice")
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit("alice")
    # The oldest running stream (third) is 5 s old: expected to end in 10.8 - 5 s.
    assert info.value.retry_after_s == pytest.approx(5.8)
    for lease in (third, fourth, other):
        lease.release()
    assert quotas.snapshot("alice")["running_streams"] == 0


def test_tokens_per_minute_frees_as_the_window_slides():
    clock = FakeClock()
    quotas = KeyQuotas(KeyLimits(tokens_per_minute=100), clock=clock)
    quotas.admit("alice").release()
    quotas.account("alice", 60)
    clock.advance(10)
    quotas.account("alice", 50)  # accounted after the fact: 110 now, over the budget
    quotas.account("alice", 0)
    clock.advance(10)
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit("alice")
    assert info.value.reason == "tokens_per_minute_exceeded"
    # The 60 tokens of t=0 leave the window at t=60 (now t=20): 50 left, under 100.
    assert info.value.retry_after_s == pytest.approx(40)
    quotas.admit("bob").release()  # other keys are unaffected
    clock.advance(39.9)
    with pytest.raises(QuotaExceeded):
        quotas.admit("alice")
    clock.advance(0.1)
    quotas.admit("alice").release()
    assert quotas.snapshot("alice")["tokens_in_window"] == 50


def test_tokens_retry_after_needs_several_entries_to_expire():
    clock = FakeClock()
    quotas = KeyQuotas(KeyLimits(tokens_per_minute=100), clock=clock)
    for _ in range(5):
        quotas.account("alice", 30)  # 150 in all, one every 5 s
        clock.advance(5)
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit("alice")
    # Below 100 needs 150 - 30 - 30 = 90: the second entry (t=5) leaves at t=65; now t=25.
    assert info.value.retry_after_s == pytest.approx(40)


def test_per_key_limits_and_validation():
    quotas = KeyQuotas(
        KeyLimits(max_concurrent_streams=1),
        {"batch": KeyLimits(max_concurrent_streams=3, tokens_per_minute=1000)},
        clock=FakeClock(),
    )
    leases = [quotas.admit("batch") for _ in range(3)]
    with pytest.raises(QuotaExceeded):
        quotas.admit("batch")
    quotas.admit("alice")
    with pytest.raises(QuotaExceeded):
        quotas.admit("alice")
    assert quotas.snapshot("batch")["tokens_per_minute"] == 1000
    for lease in leases:
        lease.release()
    unlimited = KeyQuotas(clock=FakeClock())
    held = [unlimited.admit("x") for _ in range(100)]
    assert unlimited.snapshot("x")["running_streams"] == len(held)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            KeyLimits(tokens_per_minute=bad)


# ---------------------------------------------------------------------------------- usage
def test_usage_by_key():
    usage = KeyUsage()
    usage.record_outcome("alice", "success", prompt_tokens=10, completion_tokens=5)
    usage.record_outcome("alice", "client_disconnected_while_streaming", 10, 2)
    usage.record_rejection("alice", "tokens_per_minute_exceeded")
    usage.record_rejection("bob", "concurrency_limit_exceeded")
    assert usage.snapshot() == {
        "alice": {
            "requests": {"success": 1, "client_disconnected_while_streaming": 1},
            "rejections": {"tokens_per_minute_exceeded": 1},
            "prompt_tokens": 20,
            "completion_tokens": 7,
            "total_tokens": 27,
        },
        "bob": {
            "requests": {},
            "rejections": {"concurrency_limit_exceeded": 1},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        },
    }
