"""The `helm test` pod's script, run here against a local server that answers like ChatStream
(and like a broken one): it passes only on a streamed 200 text/plain answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


class FakeChatStream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatStream.received.append(body)
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
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def run_test_pod(render, tmp_path):
    """Run the test pod's container command locally, with its env but another URL."""
    (pod,) = [m for m in render() if m["kind"] == "Pod"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}

    def run(url: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            container["command"],
            env={**env, "URL": url, "TMPDIR": str(tmp_path), "PATH": os.environ["PATH"]},
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


def test_fails_when_the_answer_is_not_streamed(server, run_test_pod):
    result = run_test_pod(f"{server}/buffered")

    assert result.returncode != 0
    assert "FAIL: the answer was not streamed" in result.stdout


def test_fails_when_the_request_is_refused(server, run_test_pod):
    result = run_test_pod(f"{server}/refuses")

    assert result.returncode != 0
    assert "FAIL: the status is not 200" in result.stdout
