"""Minimal JSON merge patches (RFC 7386) from what is in the cluster to what is desired.

Only the keys the operator renders are compared: fields that the API server or KubeRay add
(defaults, status, resourceVersion, ...) are not drift. A `None` in the desired object means
"must be absent" and becomes a deletion in the patch. Lists cannot be merged by a merge patch,
so a list that differs anywhere is sent whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _covers(current: Any, desired: Any) -> bool:
    """Whether `current` already holds everything `desired` asks for."""
    if isinstance(desired, Mapping):
        if not isinstance(current, Mapping):
            return False
        return all(
            (key not in current) if value is None else _covers(current.get(key), value)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(current) == len(desired)
            and all(_covers(c, d) for c, d in zip(current, desired, strict=True))
        )
    # bool is an int in Python; 1 and True are different values in JSON.
    return (
        type(current) is type(desired)
        and current == desired
        or (
            isinstance(current, (int, float))
            and isinstance(desired, (int, float))
            and not isinstance(current, bool)
            and not isinstance(desired, bool)
            and current == desired
        )
    )


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest merge patch that makes `current` cover `desired`; {} when nothing differs."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if key in current:
                patch[key] = None
        elif isinstance(value, Mapping) and isinstance(current.get(key), Mapping):
            sub = merge_patch(current[key], value)
            if sub:
                patch[key] = sub
        elif not _covers(current.get(key), value):
            patch[key] = _strip_nones(value)
    return patch


def _strip_nones(value: Any) -> Any:
    """A value to send as is: `None`s inside it mean "absent", so they are dropped."""
    if isinstance(value, Mapping):
        return {k: _strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nones(v) for v in value]
    return value
