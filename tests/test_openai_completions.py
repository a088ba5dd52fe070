"""`/v1/completions` as pure functions (serve_app/openai_api/completions.py, plan_prompt): the
body's parsing, the prompt's checks, and the `text_completion` objects, judged by the `openai`
SDK's own `Completion` type. No Ray, no server (test_openai_api.py runs the route)."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion

from serve_app.config import GenerationParams
from serve_app.engines.mock import MockPromptFormatter
from serve_app.model_contract import TokenLogprob, TopLogprob
from serve_app.openai_api.completions import (
    CompletionRequest,
    CompletionStreamEncoder,
    parse_completion,
    text_completion,
)
from serve_app.openai_api.service import plan_prompt
from serve_app.refusals import Refusal

MODEL = "m"
DEFAULTS = GenerationParams().model_dump()


def parse(body: dict) -> CompletionRequest:
    return parse_completion(json.dumps({"model": MODEL, **body}), served_model=MODEL)


def refused(body: dict) -> Refusal:
    with pytest.raises(Refusal) as info:
        parse(body)
    assert info.value.status_code == 400
    return info.value


class Formatter(MockPromptFormatter):
    """The mock's formatter with a vocabulary, as a formatter with a tokenizer has."""

    def __init__(self, context: int = 20) -> None:
        self.context_length = context
        self.tokenizer = _Vocab()


class _Vocab:
    def __len__(self) -> int:
        return 100

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def test_prompts_text_ids_and_one_element_batches():
    assert parse({"prompt": "once upon"}).prompt == "once upon"
    assert parse({"prompt": ["once"]}).prompt == "once"
    assert parse({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse({"prompt": [[1, 2]]}).prompt == [1, 2]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_bodies_name_the_field(body, param):
    assert refused(body).param == param


def test_fields_map_like_chat_and_unknown_ones_are_listed():
    request = parse({"prompt": "x", "max_tokens": 5, "logprobs": 2, "seed": 3, "n": 1,
                     "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True},
                     "cache_control": {}, "suffix": ""})  # fmt: skip
    assert request.params == {"max_new_tokens": 5}
    assert (request.sampling.logprobs, request.seed, request.stop) == (2, 3, ("\n",))
    assert request.include_usage and request.ignored == ("cache_control",)
    assert parse({"prompt": "x", "logprobs": 0}).sampling.logprobs == 0
    assert parse({"prompt": "x"}).sampling.logprobs is None


def test_plan_prompt_checks_ids_and_context():
    formatter = Formatter(context=6)
    model_input, echoed, params = plan_prompt(parse({"prompt": "a b c", "echo": True}),
                                              formatter, DEFAULTS, token_ids=True)  # fmt: skip
    assert (model_input, echoed, params["max_new_tokens"]) == ("a b c", "a b c", 3)
    ids, echoed, _ = plan_prompt(parse({"prompt": [1, 2], "echo": True}), formatter, DEFAULTS,
                                 token_ids=True)  # fmt: skip
    assert (ids, echoed) == ([1, 2], "t1 t2")
    for body, token_ids, param in [
        ({"prompt": [1, 100]}, True, "prompt"),  # over the vocabulary
        ({"prompt": [1, 2]}, False, "prompt"),  # an engine without a tokenizer
        ({"prompt": "a b c d e f"}, True, "prompt"),  # no room left
        ({"prompt": "a b", "max_tokens": 5}, True, "max_tokens"),
    ]:
        with pytest.raises(Refusal) as info:
            plan_prompt(parse(body), formatter, DEFAULTS, token_ids=token_ids)
        assert info.value.param == param


LOGPROBS = (TokenLogprob(1, " b", -0.5, (TopLogprob(1, " b", -0.5),)),)


def test_whole_answer_validates_as_the_sdks_completion():
    answer = text_completion(model=MODEL, text=" b", finish_reason="length", prompt_tokens=1,
                             completion_tokens=1, logprobs=LOGPROBS)  # fmt: skip
    completion = Completion.model_validate(answer)
    assert completion.choices[0].text == " b" and completion.usage.total_tokens == 2
    assert completion.choices[0].logprobs.top_logprobs == [{" b": -0.5}]
    echoed = text_completion(model=MODEL, text=" b", finish_reason="stop", prompt_tokens=1,
                             completion_tokens=1, echoed="a")  # fmt: skip
    assert echoed["choices"][0]["text"] == "a b" and echoed["choices"][0]["logprobs"] is None


def events(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e[len("data: ") :]) for e in text.split("\n\n")[:-2]]


def test_stream_echo_text_finish_and_usage():
    request = parse({"prompt": "a", "stream": True, "echo": True,
                     "stream_options": {"include_usage": True}})  # fmt: skip
    encoder = CompletionStreamEncoder(request, echoed="a")
    text = encoder.feed(" b", prompt_tokens=1, completion_tokens=1)
    text += encoder.end(prompt_tokens=1, completion_tokens=1, finish_reason="stop")
    chunks = events(text)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["a b", ""]
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 2
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stream_logprobs_offsets_follow_the_text():
    encoder = CompletionStreamEncoder(parse({"prompt": "a", "stream": True, "logprobs": 1}))
    first = events(encoder.feed(" b", logprobs=LOGPROBS) + "data: [DONE]\n\n")[0]
    second = events(encoder.feed(" b", logprobs=LOGPROBS) + "data: [DONE]\n\n")[0]
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
