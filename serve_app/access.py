"""Who may call what: the admin token of the operator endpoints, and API keys with per-key
limits and usage on the chat endpoints. Pure logic; the HTTP edge (serve_app/edge.py) applies it.

Admin endpoints (`/outcomes`, `/outcomes/ledger`, `/load`, `/resource_usage`, `/v1/usage`):
* `CHATSTREAM_ADMIN_TOKEN` set: `Authorization: Bearer <token>` is required (401 without a
  bearer token, 403 with a wrong one; compared in constant time).
* unset (a plain local `serve run`): only loopback clients are answered (403 otherwise). Ray
  Serve's proxy hands the client's address through to the ingress; uvicorn replaces it with
  `X-Forwarded-For` only when the direct peer is itself a loopback proxy, so a reverse proxy on
  the same host does not make every client look local, and a remote client cannot claim to be.

API keys (`serve_app.api_keys`): off unless `CHATSTREAM_API_KEYS` or `CHATSTREAM_API_KEYS_FILE`
is set. When on, `/v1/*` and `/chat_stream` need `Authorization: Bearer <key>` (401 before any
slot is taken). Each key's concurrent streams and tokens per minute are limited by `KeyQuotas`,
checked before ChatStream's own admission (a key at its limit never waits for, nor takes,
another key's slot), with a Retry-After computed from when the limit frees. Usage per key id
(requests by outcome, refusals, prompt and completion tokens) is counted in `KeyUsage` and in
Prometheus counters labelled by key id. With `session_store=redis` the limits and the usage of
`/v1/usage` are the store's, shared by every ingress replica (`SharedKeyQuotas`); with the
memory and ray stores each ingress replica limits and counts on its own.
With keys off, usage is counted under the id `anonymous` and nothing is limited.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from serve_app import metrics
from serve_app.api_keys import (
    ANONYMOUS_KEY_ID,
    ApiKeyRing,
    KeyLimits,
    KeyQuotas,
    KeyUsage,
    QuotaExceeded,
    QuotaLease,
    bearer_token,
    load_api_keys,
)
from serve_app.background import Background
from serve_app.config import ADMIN_TOKEN_ENV, ChatStreamConfig
from serve_app.refusals import Refusal
from serve_app.shared_quotas import SharedKeyQuotas
from serve_app.stores.base import KeyStateStore

logger = logging.getLogger("ray.serve")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def check_admin(request: Request, admin_token: str | None) -> None:
    """Raise Refusal (401/403) unless `request` may read the operator endpoints."""
    if not admin_token:
        host = request.client.host if request.client else None
        if _is_loopback(host):
            return
        raise Refusal(
            403,
            "forbidden",
            f"operator endpoints answer only loopback clients unless {ADMIN_TOKEN_ENV} is set "
            "on the server",
        )
    presented = bearer_token(request.headers.get("authorization"))
    if presented is None:
        raise Refusal(
            401,
            "unauthorized",
            "this endpoint needs 'Authorization: Bearer <admin token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Digests first: compare_digest is constant-time only for inputs of equal length.
    if not hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(), hashlib.sha256(admin_token.encode()).digest()
    ):
        raise Refusal(403, "forbidden", "the admin token is not valid")


class Guard(enum.Enum):
    """What a route needs from its caller (the HTTP edge checks it: serve_app/edge.py)."""

    OPEN = "open"  # request id and header limits only
    ADMIN = "admin"  # the admin token (or loopback without one)
    KEY = "key"  # an API key, when keys are on
    ADMITS = "admits"  # an API key and a hold on its stream limit: the route admits generations


@dataclass(eq=False)
class Caller:
    """Who sent a request, as the HTTP edge found it: the request id, the API key's id
    (`anonymous` when keys are off) and its hold on the key's stream limit, if any."""

    request_id: str
    key_id: str = ANONYMOUS_KEY_ID
    lease: QuotaLease | None = None

    def release(self) -> None:
        """Give the key's stream back (idempotent; the request is over)."""
        if self.lease is not None:
            self.lease.release()


def caller_of(request: Request) -> Caller | None:
    """The caller the edge found for `request`, if it has been checked."""
    return getattr(request.state, "caller", None)


class Gate(Protocol):
    """What the services need of the HTTP edge (serve_app/edge.py), for requests that reach
    them through a user's own route, which no middleware checked."""

    async def enter(self, request: Request, guard: Guard) -> Caller: ...

    async def read_body(self, request: Request, request_body: bytes | None = None) -> bytes: ...

    async def refuse(
        self, request: Request, refusal: Refusal, *, openai: bool | None = None
    ) -> Response: ...


def key_limits(config: ChatStreamConfig) -> KeyLimits:
    return KeyLimits(
        max_concurrent_streams=config.api_key_max_concurrent_streams or None,
        tokens_per_minute=config.api_key_tokens_per_minute or None,
    )


class Access:
    """The admin token, the API key ring (None: keys off), per-key quotas and usage."""

    def __init__(
        self,
        config: ChatStreamConfig,
        environ: Mapping[str, str] | None = None,
        *,
        key_state: KeyStateStore | None = None,
        replica_id: str = "",
        background: Background | None = None,
    ) -> None:
        """`key_state` (Redis): limits and usage shared by every ingress replica; without it
        (memory and ray stores) each replica limits and counts on its own."""
        environ = os.environ if environ is None else environ
        self.admin_token = environ.get(ADMIN_TOKEN_ENV) or None
        self.keys: ApiKeyRing | None = load_api_keys(environ)  # ApiKeyError: fail at start
        self.quotas = KeyQuotas(key_limits(config) if self.keys else KeyLimits())
        self.usage = KeyUsage()
        self.shared: SharedKeyQuotas | None = None
        if key_state is not None and background is not None:
            self.shared = SharedKeyQuotas(key_state, self.quotas.limits, replica_id, background)
        if self.admin_token is None:
            logger.warning(
                "%s is not set: /outcomes, /outcomes/ledger, /load, /resource_usage and "
                "/v1/usage answer loopback clients only",
                ADMIN_TOKEN_ENV,
            )
        if self.keys is not None:
            logger.info("API keys on: %d key ids %s", len(self.keys.key_ids), self.keys.key_ids)

    @property
    def keys_on(self) -> bool:
        return self.keys is not None

    # ------------------------------------------------------------------ admin
    def require_admin(self, request: Request) -> None:
        check_admin(request, self.admin_token)

    @property
    def key_ids(self) -> list[str]:
        """The ids that limits and usage are kept under (the configured keys, or `anonymous`)."""
        return self.keys.key_ids if self.keys is not None else [ANONYMOUS_KEY_ID]

    async def usage_report(self) -> dict[str, Any]:
        """The admin JSON: per key id usage and what it holds now; `scope` says whose figures:
        every ingress replica's (`cluster`, a store that shares them) or this one's."""
        usage = self.usage.snapshot()
        if self.shared is None:
            for key_id, figures in usage.items():
                figures["now"] = self.quotas.snapshot(key_id)
            return {"api_keys": self.keys_on, "scope": "ingress_replica", "keys": usage}
        keys = {}
        for key_id in dict.fromkeys([*self.key_ids, *usage]):
            figures = await self.shared.report(key_id)
            if figures["requests"] or figures["rejections"] or figures["now"]["running_streams"]:
                keys[key_id] = figures
        return {"api_keys": self.keys_on, "scope": "cluster", "keys": keys}

    async def release_lost(self, grace_sec: float) -> int:
        """Drop the streams that ingress replicas which died still held (shared limits only)."""
        if self.shared is None:
            return 0
        return await self.shared.release_lost([*self.key_ids, "unauthenticated"], grace_sec)

    # ------------------------------------------------------------------ keys
    def authenticate(self, request: Request) -> str | None:
        """The caller's key id (`anonymous` when keys are off), or None for a missing or wrong
        key."""
        if self.keys is None:
            return ANONYMOUS_KEY_ID
        return self.keys.authenticate(request.headers.get("authorization"))

    async def take_stream(self, key_id: str) -> QuotaLease:
        """Take one of the key's streams (across every replica, with shared limits); raises
        QuotaExceeded over a limit (counted by whoever renders the refusal)."""
        if self.shared is not None:
            return await self.shared.admit(key_id)
        return self.quotas.admit(key_id)

    async def admit(self, key_id: str) -> QuotaLease:
        """`take_stream`, with a refusal counted here."""
        try:
            return await self.take_stream(key_id)
        except QuotaExceeded as exc:
            self.rejected(key_id, exc.reason)
            raise

    def rejected(self, key_id: str | None, reason: str) -> None:
        key_id = key_id or "unauthenticated"
        self.usage.record_rejection(key_id, reason)
        if self.shared is not None:
            self.shared.rejected(key_id, reason)
        metrics.KEY_REJECTIONS.get().inc(tags={"key_id": key_id, "reason": reason})

    def finished(
        self, key_id: str, outcome: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """An admitted request's outcome and tokens: usage, metrics and the token budget."""
        self.usage.record_outcome(key_id, outcome, prompt_tokens, completion_tokens)
        if self.shared is not None:
            self.shared.finished(key_id, outcome, prompt_tokens, completion_tokens)
        else:
            self.quotas.account(key_id, prompt_tokens + completion_tokens)
        metrics.KEY_REQUESTS.get().inc(tags={"key_id": key_id, "outcome": outcome})
        if prompt_tokens:
            metrics.KEY_TOKENS.get().inc(prompt_tokens, tags={"key_id": key_id, "kind": "prompt"})
        if completion_tokens:
            metrics.KEY_TOKENS.get().inc(
                completion_tokens, tags={"key_id": key_id, "kind": "completion"}
            )
