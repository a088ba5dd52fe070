"""The `helm test` pod's script, run here against a local server that answers like ChatStream
(and like a broken one): it passes only on a streamed 200 text/plain answer, and only if the
operator endpoints refuse a request without the admin token and answer one with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


TOKEN = "s3cret-admin-token"


class FakeChatStream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[dict] = []
    admin_open = False  # a broken server: its operator endpoints need no token
    admin_headers: list[str | None] = []

    def do_GET(self):
        FakeChatStream.admin_headers.append(self.headers.get("Authorization"))
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if self.path in ("/outcomes", "/load") and (authorized or FakeChatStream.admin_open):
            self._json(200, b'{"ongoing": 0, "queued": 0}')
        elif self.path in ("/outcomes", "/load"):
            self._json(401, b'{"error": "unauthorized"}')
        else:
            self._json(404, b'{"error": "not_found"}')

    def _json(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    chat_headers: list[str | None] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatStream.received.append(body)
        FakeChatStream.chat_headers.append(self.headers.get("Authorization"))
        if self.path == "/chat_stream":  # like ChatStream: chunks as they are generated
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for token in ("Hello", " there", "!"):
                data = token.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/buffered":  # the whole answer at once
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"Hello!")
        else:  # e.g. a refused request
            data = b'{"error": "invalid_request"}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, *_):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeChatStream)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    FakeChatStream.received.clear()
    FakeChatStream.admin_headers.clear()
    FakeChatStream.chat_headers.clear()
    FakeChatStream.admin_open = False
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def run_test_pod(render, tmp_path):
    """Run the test pod's container command locally, with its env but another URL."""
    (pod,) = [m for m in render() if m["kind"] == "Pod"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    (token,) = [e for e in container["env"] if e["name"] == "ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "chat-chatstream", "key": "admin-token"}

    def run(url: str, **extra: str) -> subprocess.CompletedProcess:
        base = url.rsplit("/", 1)[0]
        return subprocess.run(
            container["command"],
            env={**env, "URL": url, "ADMIN_URL": base, "ADMIN_TOKEN": TOKEN,
                 "TMPDIR": str(tmp_path), "PATH": os.environ["PATH"], **extra},  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def test_passes_when_the_answer_streams(server, run_test_pod):
    result = run_test_pod(f"{server}/chat_stream")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: the answer streamed back" in result.stdout
    assert "answer: Hello there!" in result.stdout
    assert FakeChatStream.received[0]["user_input"]
    assert "PASS: the operator endpoints need the admin token" in result.stdout
    assert FakeChatStream.admin_headers == [None, f"Bearer {TOKEN}"] * 2  # /outcomes, /load
    assert TOKEN not in result.stdout + result.stderr


def test_fails_when_the_operator_endpoints_are_open(server, run_test_pod):
    FakeChatStream.admin_open = True
    result = run_test_pod(f"{server}/chat_stream")

    assert result.returncode != 0
    assert "FAIL: /outcomes answered 200 without the admin token" in result.stdout


def test_fails_when_the_answer_is_not_streamed(server, run_test_pod):
    result = run_test_pod(f"{server}/buffered")

    assert result.returncode != 0
    assert "FAIL: the answer was not streamed" in result.stdout


def test_fails_when_the_request_is_refused(server, run_test_pod):
    result = run_test_pod(f"{server}/refuses")

    assert result.returncode != 0
    assert "FAIL: the status is not 200" in result.stdout


def test_sends_no_api_key_unless_the_chatstream_has_some(server, run_test_pod):
    assert run_test_pod(f"{server}/chat_stream").returncode == 0
    assert FakeChatStream.chat_headers == [None]


def test_sends_the_first_api_key_when_the_chatstream_has_some(server, run_test_pod):
    keys = "# team keys\n\n ci : k3y-of-the-ci-0123456789 \nother:another-key-0123456789\n"
    result = run_test_pod(f"{server}/chat_stream", API_KEYS=keys)

    assert result.returncode == 0, result.stdout + result.stderr
    assert FakeChatStream.chat_headers == ["Bearer k3y-of-the-ci-0123456789"]
    assert "k3y-of-the-ci" not in result.stdout + result.stderr
