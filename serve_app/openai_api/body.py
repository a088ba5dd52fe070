"""A JSON request body and its keys, as pure functions shared by the `/v1` parsers (chat,
completions, Responses): the body loaded within the depth bound, unknown keys found (ignored and
reported on chat and completions, refused by the Responses API's strict check), known keys that
are accepted only with their neutral value, and strict booleans."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serve_app.refusals import invalid_request, unsupported_parameter
from serve_app.validation import MAX_JSON_DEPTH, json_depth_exceeds


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _load_body(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(body, Mapping):
        return dict(body)
    try:
        data = json.loads(body or b"", parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        data = None  # deeper than Python's parser goes: refused just below
    if data is None or json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise invalid_request(
            f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object", code="invalid_json")
    return data


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    # bool is an int: `n: true` must not pass as `n: 1`, nor `logprobs: 0` as `false`.
    return any(type(value) is type(n) and value == n for n in neutral) or (
        isinstance(value, float) and any(type(n) is int and value == n for n in neutral)
    )


def _check_keys(
    data: Mapping[str, Any],
    supported: set[str],
    harmless: set[str],
    neutral: Mapping[str, tuple[Any, ...]],
    prefix: str = "",
) -> None:
    """The strict check (the Responses API's): an unknown field is a 400 `unknown_parameter`."""
    for key in _ignored_keys(data, supported | harmless, neutral, prefix):
        raise invalid_request(
            f"Unrecognized request argument supplied: {key}", key, "unknown_parameter"
        )


def _ignored_keys(
    data: Mapping[str, Any],
    known: set[str],
    neutral: Mapping[str, tuple[Any, ...]] | None = None,
    prefix: str = "",
) -> list[str]:
    """Refuse a `neutral`-only field with another value; return the unknown fields' names."""
    ignored = []
    for key, value in data.items():
        if key in known:
            continue
        name = f"{prefix}{key}"
        if neutral is not None and key in neutral:
            if not _is_neutral(value, neutral[key]):
                raise unsupported_parameter(name)
            continue
        ignored.append(name)
    return ignored


def strict_bool(data: Mapping[str, Any], key: str, param: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_request(f"'{param}' must be a boolean", param, "invalid_type")
    return value
