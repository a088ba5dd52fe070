"""What `/openapi.json` says about the `POST /v1/responses` body (serve_app/routes/openapi.py's
style: built from the limits the validator uses, serve_app/responses/protocol.py)."""

from __future__ import annotations

from typing import Any

from serve_app.openai_api import protocol as chat_protocol
from serve_app.responses import protocol
from serve_app.routes.openapi import _param, closed_body, text_message


def response_create_schema() -> dict[str, Any]:
    """The `/v1/responses` body this server accepts."""
    message = text_message(sorted(protocol._PART_TYPES))
    message["properties"]["type"] = {"type": "string", "enum": ["message"]}
    limit = {"maxLength": chat_protocol.MAX_CONTENT_CHARS}
    properties: dict[str, Any] = {
        "model": {"type": "string", "description": "The served model (GET /v1/models); 404 else"},
        "input": {
            "anyOf": [
                {"type": "string", **limit},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": chat_protocol.MAX_MESSAGES,
                    "items": message,
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
        "Tools and text.format structured outputs are not supported yet (400)",
    )
