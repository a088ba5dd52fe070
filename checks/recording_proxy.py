"""A pass-through HTTP proxy on loopback that records each request it forwards.

Used by the Open WebUI check to show exactly what a real client sends to the service. It only
observes: the request goes upstream byte for byte (less hop-by-hop headers) and the answer
comes back byte for byte, streamed as it arrives (Server-Sent Events included).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

# Headers that belong to one connection, not to the request (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}
SHOWN_HEADERS = ("content-type", "accept", "user-agent", "authorization")


def _body_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"_unparsed": raw[:200].decode(errors="replace")}


class RecordingProxy:
    """`with RecordingProxy("http://127.0.0.1:8000") as proxy: ...; proxy.records`."""

    def __init__(self, upstream: str, read_timeout_s: float = 600.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.records: list[dict[str, Any]] = []
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, read=read_timeout_s))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _begin(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.records.append(entry)
            self.in_flight += 1
            self.last_activity = time.monotonic()

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.last_activity = time.monotonic()

    def wait_idle(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until nothing is in flight and no request came for `quiet_s` (a client's
        background requests after the one awaited); False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.in_flight == 0 and time.monotonic() - self.last_activity >= quiet_s:
                    return True
            time.sleep(0.2)
        return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: each answer ends when the connection closes, so a stream of unknown
            # length needs no re-chunking here.
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:  # quiet: the records say it all
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                entry: dict[str, Any] = {
                    "time": time.time(),
                    "method": self.command,
                    "path": self.path,
                    "headers": {
                        k.lower(): ("<redacted>" if k.lower() == "authorization" else v)
                        for k, v in self.headers.items()
                        if k.lower() in SHOWN_HEADERS
                    },
                    "body": _body_json(raw),
                }
                proxy._begin(entry)
                try:
                    self._relay(entry, headers, raw)
                finally:
                    entry["seconds"] = round(time.time() - entry["time"], 2)
                    proxy._end()

            def _relay(self, entry: dict[str, Any], headers: dict[str, str], raw: bytes) -> None:
                request = proxy._client.build_request(
                    self.command, proxy.upstream + self.path, headers=headers, content=raw
                )
                try:
                    response = proxy._client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    entry["error"] = repr(exc)
                    self.send_error(502, f"upstream unreachable: {exc!r}")
                    return
                entry["status"] = response.status_code
                entry["response_headers"] = {
                    k: v for k, v in response.headers.items() if k.lower().startswith("x-")
                }
                try:
                    self.send_response(response.status_code)
                    for key, value in response.headers.items():
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    self.end_headers()
                    for chunk in response.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    entry["client_left"] = True
                finally:
                    response.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        return Handler


def body_fields(body: Any) -> dict[str, Any]:
    """The shape of a chat completion request body: its top-level fields and the fields used
    inside messages, content parts, stream_options and tools (names only, no text)."""
    if not isinstance(body, dict):
        return {}
    shape: dict[str, Any] = {"top_level": sorted(body)}
    messages = body.get("messages")
    if isinstance(messages, list):
        shape["messages"] = [
            {
                "role": m.get("role"),
                "fields": sorted(m),
                "content_parts": [sorted(p) for p in m["content"] if isinstance(p, dict)]
                if isinstance(m.get("content"), list)
                else None,
            }
            for m in messages
            if isinstance(m, dict)
        ]
    for key in ("stream_options", "response_format"):
        if isinstance(body.get(key), dict):
            shape[key] = body[key]
    if isinstance(body.get("tools"), list):
        shape["tools"] = [
            (t.get("function") or {}).get("name") for t in body["tools"] if isinstance(t, dict)
        ]
    for key in ("stream", "tool_choice", "max_tokens", "max_completion_tokens", "temperature"):
        if key in body:
            shape[key] = body[key]
    return shape


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per recorded request: method, path, status, and the body's shape for POSTs."""
    return [
        {
            "method": r["method"],
            "path": r["path"],
            "status": r.get("status", r.get("error")),
            **({"body": body_fields(r["body"])} if r["method"] == "POST" else {}),
        }
        for r in records
    ]
