"""The requests Open WebUI 0.12.4 actually sends for one chat with its default settings
(recorded by scripts/check_openwebui.sh, tests/data/openwebui_0.12.4_chat_requests.json),
parsed by the service's own request parser: all accepted, nothing unknown, the 36 built-in
tools read as offered under `auto`. The full check (Open WebUI's page in Chromium) is too heavy
for CI; this keeps its requests from regressing. Pure: no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.openai_api.protocol import parse_chat_completion

RECORDED = Path(__file__).parent / "data" / "openwebui_0.12.4_chat_requests.json"
BODIES = json.loads(RECORDED.read_text())["requests"]
MODEL = "mock"  # the model the recording was made against


def test_the_recording_holds_one_chat_and_its_three_background_tasks():
    streamed = [b for b in BODIES if b.get("stream")]
    assert len(BODIES) == 4 and len(streamed) == 1
    assert len(streamed[0]["tools"]) == 36


@pytest.mark.parametrize("index", range(len(BODIES)))
def test_each_recorded_request_is_accepted_with_nothing_ignored(index):
    body = BODIES[index]
    request = parse_chat_completion(json.dumps(body), served_model=MODEL)
    assert request.ignored == ()
    assert request.stream is bool(body.get("stream"))
    assert request.messages[-1]["role"] == "user"
    if body.get("tools"):
        assert [t.name for t in request.tools] == [t["function"]["name"] for t in body["tools"]]
        assert request.tool_choice.mode == "auto"  # Open WebUI sends no tool_choice
    else:
        assert request.tools == ()


def test_the_title_task_budget_is_taken_as_given():
    title = next(b for b in BODIES if "max_tokens" in b)
    request = parse_chat_completion(json.dumps(title), served_model=MODEL)
    assert request.params["max_new_tokens"] == title["max_tokens"] == 1000
