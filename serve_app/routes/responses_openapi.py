"""What `/openapi.json` says about the `POST /v1/responses` body (serve_app/routes/openapi.py's
style: built from the limits the validator uses, serve_app/responses/protocol.py)."""

from __future__ import annotations

from typing import Any

from serve_app.openai_api import protocol as chat_protocol
from serve_app.openai_api import tools as chat_tools
from serve_app.responses import protocol
from serve_app.routes.openapi import _param, closed_body, text_message


def response_create_schema() -> dict[str, Any]:
    """The `/v1/responses` body this server accepts."""
    message = text_message(sorted(protocol._PART_TYPES))
    message["properties"]["type"] = {"type": "string", "enum": ["message"]}
    limit = {"maxLength": chat_protocol.MAX_CONTENT_CHARS}
    name = {"type": "string", "pattern": chat_tools._NAME.pattern}
    call_id = {"type": "string", "maxLength": 256}
    harmless = {"id": {"type": "string"}, "status": {"type": "string"}}
    function_call = {
        "type": "object",
        "required": ["type", "call_id", "name", "arguments"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": ["function_call"]},
            "call_id": call_id,
            "name": name,
            "arguments": {"type": "string", "maxLength": chat_tools.MAX_ARGUMENT_CHARS},
            **harmless,
        },
        "description": "A call the model made (as its answer gave it), sent back",
    }
    function_call_output = {
        "type": "object",
        "required": ["type", "call_id", "output"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": ["function_call_output"]},
            "call_id": call_id,
            "output": {"anyOf": [{"type": "string"}, {"type": "array"}]},
            **harmless,
        },
        "description": "A call's result: the model reads it as a <tool_response>",
    }
    tool = {
        "type": "object",
        "required": ["type", "name"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "name": name,
            "description": {"type": "string", "maxLength": chat_tools.MAX_DESCRIPTION_CHARS},
            "parameters": {"type": "object", "description": "A JSON schema of type object"},
            "strict": {"type": "boolean"},
        },
    }
    properties: dict[str, Any] = {
        "model": {"type": "string", "description": "The served model (GET /v1/models); 404 else"},
        "input": {
            "anyOf": [
                {"type": "string", **limit},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": chat_protocol.MAX_MESSAGES,
                    "items": {"anyOf": [message, function_call, function_call_output]},
                },
            ],  # fmt: skip
            "description": f"At most {chat_protocol.MAX_CONTENT_CHARS} characters in all; a "
            "prompt longer than the model's context, even with the chain's oldest turns "
            "dropped, is 413",
        },
        "instructions": {"type": "string", "maxLength": protocol.MAX_INSTRUCTIONS_CHARS},
        "previous_response_id": {
            "type": "string",
            "maxLength": 128,
            "description": "Continue the conversation of this stored response (the latest of "
            "its chain, 409 else; 404 if it is not this API key's)",
        },
        "store": {"type": "boolean", "description": "Keep the response (default true)"},
        "stream": {"type": "boolean"},
        "max_output_tokens": {
            **_param("max_new_tokens"),
            "description": "Capped to what the context leaves",
        },
        "temperature": _param("temperature"),
        "top_p": _param("top_p"),
        "top_k": {"anyOf": [{"type": "integer", "enum": [-1]}, _param("top_k")]},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "user": {"type": "string", "maxLength": chat_protocol.MAX_USER_CHARS},
        "tools": {"type": "array", "maxItems": chat_tools.MAX_TOOLS, "items": tool},
        "tool_choice": {
            "anyOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "name"],
                    "properties": {"type": {"type": "string", "enum": ["function"]}, "name": name},
                },
            ],
            "description": "required / a function: decoded under the call's JSON schema",
        },
        "text": {
            "type": "object",
            "properties": {
                "format": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                        "name": name,
                        "schema": {"type": "object"},
                    },
                }
            },
        },  # fmt: skip
        "metadata": {
            "type": "object",
            "maxProperties": protocol.MAX_METADATA_KEYS,
            "propertyNames": {"maxLength": 64},
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
    }
    return closed_body(
        properties,
        ["model", "input"],
        "Function tools only (other tool types: 400); a forced call and text.format at once: 400",
    )
