"""The HTTP edge: what every request meets before a route, once.

`Edge.enter` checks a request as its route's `Guard` says: the headers' size (431) and the
request id (400) for every route; the admin token for operator routes; the API key (401) for
`/v1` routes; the key and a hold on its stream limit (429 with a computed Retry-After) for the
routes that admit a generation. What it found is the request's `Caller`
(`request.state.caller`); entering again returns it, so a user's own route through the
ChatStream facade gets the same checks as ChatStream's own routes, exactly once.

`Edge.refuse` is the one place a `Refusal` becomes an HTTP answer: ChatStream's JSON error, or
OpenAI's error object on `/v1`, with the request id headers; refusals of admitting routes are
counted (metrics, the rejection ledger, the key's usage). `EdgeMiddleware` runs `enter` for
ChatStream's own app, by the guard each router declares.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app import metrics
from serve_app.access import Access, Caller, Guard, caller_of
from serve_app.api_keys import QuotaExceeded
from serve_app.refusals import Refusal, authentication_error, rate_limited, store_unavailable
from serve_app.stores import StateStore, StoreUnavailable
from serve_app.validation import (
    OPENAI_REQUEST_ID_HEADER,
    REQUEST_ID_HEADER,
    check_header_size,
    read_body,
    request_id_from,
)

logger = logging.getLogger("ray.serve")


def route_path(scope: Scope) -> str:
    """The path as the app routes it (without the Serve application's route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def guard_of(guards: Mapping[str, Guard], path: str) -> Guard:
    """The guard of `path`: its own entry, else that of a template (`/v1/responses/{id}`)
    whose fixed segments it matches; OPEN if none."""
    if path in guards:
        return guards[path]
    segments = path.split("/")
    for template, guard in guards.items():
        fixed = template.split("/")
        if (
            "{" in template
            and len(fixed) == len(segments)
            and all(f.startswith("{") or f == s for f, s in zip(fixed, segments, strict=True))
        ):
            return guard
    return Guard.OPEN


def is_openai_route(request: Request) -> bool:
    return route_path(request.scope).startswith("/v1/")


class Edge:
    """Checks callers and renders refusals; one per ingress replica."""

    def __init__(self, access: Access, store: StateStore, max_body_bytes: int) -> None:
        self.access = access
        self._store = store
        self._max_body_bytes = max_body_bytes

    async def enter(self, request: Request, guard: Guard) -> Caller:
        """The request's caller, checked as `guard` says (once per request). Raises Refusal."""
        caller = caller_of(request)
        if caller is not None:
            return caller
        request.state.guard = guard
        try:
            check_header_size(request.headers)
            request_id = request_id_from(request.headers)
        except Refusal:
            request.state.caller = Caller(uuid.uuid4().hex)  # an id for the refusal's headers
            raise
        caller = request.state.caller = Caller(request_id)
        if guard is Guard.ADMIN:
            self.access.require_admin(request)
        elif guard in (Guard.KEY, Guard.ADMITS):
            key_id = self.access.authenticate(request)
            if key_id is None:
                raise authentication_error(
                    "this server needs 'Authorization: Bearer <API key>'"
                    if not is_openai_route(request)
                    else "a valid API key is required"
                )
            caller.key_id = key_id
            if guard is Guard.ADMITS:
                try:
                    caller.lease = await self.access.take_stream(key_id)
                except QuotaExceeded as exceeded:
                    raise rate_limited(
                        exceeded.message, exceeded.retry_after_s, exceeded.reason
                    ) from None
                except StoreUnavailable as exc:  # shared limits, and the store is down
                    raise store_unavailable(exc) from None
        return caller

    async def read_body(self, request: Request, request_body: bytes | None = None) -> bytes:
        """The body (or the one a route already read), refused (413) over the limit."""
        return await read_body(request, request_body, self._max_body_bytes)

    async def refuse(
        self, request: Request, refusal: Refusal, *, openai: bool | None = None
    ) -> Response:
        """Answer `refusal` (counted, when the route admits generations)."""
        caller = caller_of(request) or Caller(uuid.uuid4().hex)
        caller.release()
        guard = getattr(request.state, "guard", Guard.ADMITS)
        if guard is Guard.ADMITS:
            await self._count(caller, refusal)
        if openai is None:  # operator endpoints answer in ChatStream's shape, /v1/usage too
            openai = is_openai_route(request) and guard is not Guard.ADMIN
        response = refusal.response(openai)
        response.headers[REQUEST_ID_HEADER] = caller.request_id
        if openai:
            response.headers[OPENAI_REQUEST_ID_HEADER] = caller.request_id
        return response

    async def _count(self, caller: Caller, refusal: Refusal) -> None:
        metrics.REJECTIONS.get().inc(tags={"reason": refusal.code})
        self.access.rejected(
            caller.key_id if refusal.code != "invalid_api_key" else None, refusal.code
        )
        try:
            await self._store.record_rejection(caller.request_id, refusal.code)
        except StoreUnavailable:
            logger.warning(
                "request %s: rejection %s not recorded (store down)",
                caller.request_id,
                refusal.code,
            )


class EdgeMiddleware:
    """ASGI middleware: `Edge.enter` for every request of ChatStream's own app, by its route's
    guard (`guards`: path -> Guard; others are OPEN). The caller's hold on its key's streams is
    given back when the response is over, whatever happened (the bookkeeping gives it back as
    soon as the outcome is known)."""

    def __init__(self, app: ASGIApp, edge: Edge, guards: Mapping[str, Guard]) -> None:
        self.app = app
        self.edge = edge
        self.guards = dict(guards)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            caller = await self.edge.enter(request, guard_of(self.guards, route_path(scope)))
        except Refusal as refusal:
            response = await self.edge.refuse(request, refusal)
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            caller.release()


def exception_handlers(edge: Edge) -> dict[Any, Any]:
    """FastAPI exception handlers: a route's Refusal, and the store being down, rendered by
    `edge`."""

    async def refused(request: Request, refusal: Refusal) -> Response:
        return await edge.refuse(request, refusal)

    async def store_down(request: Request, exc: StoreUnavailable) -> Response:
        return await edge.refuse(request, store_unavailable(exc))

    return {Refusal: refused, StoreUnavailable: store_down}
