"""What `/openapi.json` says about the routes: request bodies and error responses.

The routes read their bodies raw (the seed's interception hands `request_body` over), so
FastAPI cannot see them; these schemas describe them, built from the same limits the
validators use. Limits that depend on the prompt's length in tokens (the model's context) are
stated in the descriptions: JSON Schema cannot express them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serve_app.config import MIN_TEMPERATURE, GenerationParams
from serve_app.openai_api import protocol, sampling
from serve_app.openai_api.encoding import SSE_MEDIA_TYPE
from serve_app.openai_api.ignored import IGNORED_FIELDS_HEADER
from serve_app.validation import MAX_USER_INPUT_CHARS


class ChatStreamError(BaseModel):
    """ChatStream's JSON error."""

    error: str
    message: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    error: OpenAIErrorDetail


_WHY = {
    400: "The request is malformed or a value is out of range (named in the error)",
    401: "An API key (or the admin token) is required",
    403: "The admin token is wrong, or the client is not on loopback",
    404: "Not found (a model or message this server does not have)",
    409: "The session's (or response chain's) previous answer is still streaming, or there "
    "is nothing to regenerate, or previous_response_id is not its chain's latest",
    413: "The body, or the prompt for the model's context, is too large",
    429: "All generation slots and queue places, or the API key's limits, are taken; "
    "see Retry-After",
    431: "The request's headers are too large",
    500: "The engine failed before the answer started",
    503: "The session store cannot be reached; see Retry-After",
}
# What every route can answer at the edge: a malformed request id (400), oversized headers.
EDGE = (400, 431)
ADMIN = (*EDGE, 401, 403)
SESSION = (*EDGE, 503)
CHAT = (*EDGE, 401, 409, 413, 429, 500, 503)
OPENAI = (*EDGE, 401, 404, 413, 429, 500, 503)


def errors(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for `statuses`, in ChatStream's or OpenAI's error shape."""
    model = OpenAIError if openai else ChatStreamError
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """FastAPI `openapi_extra=` documenting a JSON request body the route reads itself."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _param(name: str) -> dict[str, Any]:
    """One generation parameter's schema, from GenerationParams' own field (one definition)."""
    schema = GenerationParams.model_json_schema()["properties"][name]
    schema.pop("default", None)
    schema.pop("title", None)
    if name == "temperature":  # 0 (greedy), or at least MIN_TEMPERATURE
        schema = {
            "description": schema.get("description", ""),
            "anyOf": [
                {"type": "number", "enum": [0]},
                {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": schema["maximum"]},
            ],
        }
    return schema


def generation_params_schema(*, closed: bool) -> dict[str, Any]:
    """Optional overrides (null: not given); `closed`: no other keys."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            name: {"anyOf": [_param(name), {"type": "null"}]}
            for name in GenerationParams.model_fields
        },
    }
    if closed:
        schema["additionalProperties"] = False
    return schema


def chat_turn_schema() -> dict[str, Any]:
    turn = generation_params_schema(closed=False)
    turn["properties"]["max_new_tokens"]["description"] = (
        "Capped to what the model's context leaves after the prompt"
    )
    turn["properties"]["user_input"] = {
        "type": "string",
        "maxLength": MAX_USER_INPUT_CHARS,
        "pattern": r"\S",
        "description": "The user's turn (not blank). A prompt longer than the model's context, "
        "even with the oldest turns dropped, is 413 prompt_too_long",
    }
    turn["properties"]["regenerate"] = {
        "type": "boolean",
        "description": "Answer the last user turn again, replacing the last answer",
    }
    turn["anyOf"] = [
        {"required": ["user_input"]},
        {"required": ["regenerate"], "properties": {"regenerate": {"enum": [True]}}},
    ]
    return turn


FEEDBACK_SCHEMA = {
    "type": "object",
    "required": ["message_id", "rating"],
    "properties": {
        "message_id": {"type": "string", "minLength": 1},
        "rating": {"type": "string", "enum": ["good", "bad"]},
        "comment": {"type": "string", "maxLength": 2000},
    },
}


def text_message(part_types: list[str], open_: bool = False) -> dict[str, Any]:
    """A message whose content is a string or an array of text parts of `part_types`; `open_`:
    other keys (of the message and its parts) are accepted and ignored."""
    part = {
        "type": "object",
        "required": ["type", "text"],
        "additionalProperties": open_,
        "properties": {"type": {"type": "string", "enum": part_types}, "text": {"type": "string"}},
    }
    return {
        "type": "object",
        "required": ["role", "content"],
        "additionalProperties": open_,
        "properties": {
            "role": {"type": "string", "enum": sorted(protocol.ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]},
        },
    }


def chat_completion_schema() -> dict[str, Any]:
    """The `/v1/chat/completions` body this server accepts."""
    message = text_message(["text"], open_=True)
    budget = {**_param("max_new_tokens"), "description": "With the prompt, at most the context"}
    stop = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_STOP_CHARS}
    properties: dict[str, Any] = {
        "model": {"type": "string", "description": "The served model (GET /v1/models); 404 else"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": protocol.MAX_MESSAGES,
            "items": message,
            "description": f"At most {protocol.MAX_CONTENT_CHARS} characters of content in "
            "all; a prompt that leaves no room in the model's context is 400",
        },
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "additionalProperties": True,  # unknown ones are ignored, as at the top level
            "properties": {
                "include_usage": {"type": ["boolean", "null"]},
                "continuous_usage_stats": {"type": ["boolean", "null"]},
            },
        },
        "max_tokens": budget,
        "max_completion_tokens": budget,
        "temperature": _param("temperature"),
        "top_p": _param("top_p"),
        "top_k": {"anyOf": [{"type": "integer", "enum": [-1]}, _param("top_k")]},
        "stop": {
            "anyOf": [
                stop,
                {"type": "array", "items": stop, "maxItems": protocol.MAX_STOP_SEQUENCES},
            ]
        },
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "user": {"type": "string", "maxLength": protocol.MAX_USER_CHARS},
        **sampling_properties(),
    }
    body = closed_body(
        properties,
        ["model", "messages"],
        "max_tokens and max_completion_tokens, when both are sent, must agree. Unknown fields "
        f"(also inside messages and content parts) are ignored and listed in the "
        f"`{IGNORED_FIELDS_HEADER}` response header. A sampling field the engine does not "
        "honour is a 400 naming the engine.",
    )
    body["additionalProperties"] = True
    return body


def completion_schema() -> dict[str, Any]:
    """The `/v1/completions` body this server accepts."""
    chat = chat_completion_schema()["properties"]
    shared = ["model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k",
              "stop", "seed", "user", "n", "ignore_eos", "min_tokens", "presence_penalty",
              "frequency_penalty", "logit_bias"]  # fmt: skip
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    text = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_CONTENT_CHARS}
    one = [text, ids]
    properties: dict[str, Any] = {
        **{name: chat[name] for name in shared},
        "prompt": {
            "anyOf": [
                *one,
                {"type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": one}},
            ],
            "description": "Text or token ids (below the vocabulary size; engines with a "
            "tokenizer only); with max_tokens, within the model's context",
        },
        "echo": {
            "type": "boolean",
            "description": "The prompt before the answer (not with logprobs)",
        },  # fmt: skip
        "logprobs": {"type": "integer", "minimum": 0, "maximum": sampling.MAX_LEGACY_LOGPROBS},
    }
    properties["model"] = {"type": "string", "description": "The served model; 404 else"}
    for name in properties.keys() - {"model", "prompt"}:
        if "anyOf" not in properties[name] or {"type": "null"} not in properties[name]["anyOf"]:
            properties[name] = {"anyOf": [properties[name], {"type": "null"}]}
    return {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": True,
        "properties": properties,
        "description": "Unknown fields are ignored and listed in the "
        f"`{IGNORED_FIELDS_HEADER}` response header; a sampling field the engine does not "
        "honour is a 400 naming the engine; echo with logprobs is a 400.",
    }


def sampling_properties() -> dict[str, Any]:
    """OpenAI's sampling fields, with the limits serve_app/openai_api/sampling.py checks."""
    penalty = {"type": "number", "minimum": sampling.PENALTY_RANGE[0],
               "maximum": sampling.PENALTY_RANGE[1]}  # fmt: skip
    low, high = sampling.LOGIT_BIAS_RANGE
    return {
        "n": {"type": "integer", "minimum": 1, "maximum": sampling.MAX_CHOICES,
              "description": "Choices; more than 1 is a 400 until the admission runs n streams"},
        "ignore_eos": {"type": "boolean", "description": "vLLM's: generate past end-of-sequence"},
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": sampling.MAX_MIN_TOKENS,
                       "description": "vLLM's: no end-of-sequence before this many tokens"},
        "presence_penalty": penalty,
        "frequency_penalty": penalty,
        "logit_bias": {
            "type": "object", "maxProperties": sampling.MAX_LOGIT_BIAS_ENTRIES,
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": low, "maximum": high},
        },
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": sampling.MAX_TOP_LOGPROBS,
                         "description": "Needs logprobs: true"},
        "response_format": {"anyOf": [
            {"type": "object", "required": ["type"],
             "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"type": "string", "enum": ["json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "schema": {"type": ["object", "null"],
                                   "description": "A valid JSON schema (none: any object)"},
                        "strict": {"type": ["boolean", "null"]},
                        "description": {"type": ["string", "null"]},
                    },
                },
            }},
        ]},
    }  # fmt: skip


def closed_body(
    properties: dict[str, Any], required: list[str], description: str
) -> dict[str, Any]:
    """A request body with only `properties`; those not `required` may be null (not given)."""
    for name in properties.keys() - set(required):
        properties[name] = {"anyOf": [properties[name], {"type": "null"}]}
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
        "description": description,
    }


def answer_or_events(description: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entry of a /v1 route answering JSON, or SSE when streaming."""
    return {
        200: {
            "description": description,
            "content": {"application/json": {}, SSE_MEDIA_TYPE: {}},
        }
    }


def finish_document(api: Any, served_model: str) -> None:
    """What only the running app knows: the served model's name. And what FastAPI cannot say
    of one route serving two methods: `/generation_params` is one route (so that a 405 lists
    both methods in `Allow`), read with GET and set with PUT; `/v1/responses/{response_id}`
    too (GET and DELETE)."""
    paths = api.openapi()["paths"]
    route = paths["/generation_params"]
    route["get"].pop("requestBody", None)
    route["get"]["operationId"] = "get_generation_params"
    route["put"]["operationId"] = "set_generation_params"
    route = paths["/v1/responses/{response_id}"]  # likewise GET and DELETE
    route["get"]["operationId"] = "retrieve_response"
    route["delete"]["operationId"] = "delete_response"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"]["enum"] = [served_model]
