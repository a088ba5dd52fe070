"""Unknown request fields, accepted and ignored (as vLLM's server does), and said so: listed in
a response header and counted. Names come from the client: the header carries them
percent-encoded and bounded, and the metric counts them by where they were (a bounded label),
never by name."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

from serve_app import metrics

IGNORED_FIELDS_HEADER = "x-chatstream-ignored-fields"
MAX_HEADER_NAMES = 32
MAX_HEADER_CHARS = 2048
_NAME_CHARS = 128


def where(name: str) -> str:
    """The metric label of an ignored field's path."""
    if name.startswith("messages["):
        return "content_part" if ".content[" in name else "message"
    if name.startswith("stream_options."):
        return "stream_options"
    return "top_level"  # a top-level name may itself hold a dot: never a label


def header_value(names: Sequence[str]) -> str:
    """The header's value: comma-separated, percent-encoded names, at most MAX_HEADER_NAMES
    and MAX_HEADER_CHARS (a trailing `...` says some were left out)."""
    parts: list[str] = []
    size = 0
    for name in names[:MAX_HEADER_NAMES]:
        part = quote(name[:_NAME_CHARS], safe="[]._-")
        if size + len(part) + 1 > MAX_HEADER_CHARS:
            break
        parts.append(part)
        size += len(part) + 1
    if len(parts) < len(names):
        parts.append("...")
    return ",".join(parts)


def report(names: Sequence[str], route: str) -> dict[str, str]:
    """Count `names` (IGNORED_FIELDS) and return the response headers that list them."""
    if not names:
        return {}
    counter = metrics.IGNORED_FIELDS.get()
    for name in names:
        counter.inc(tags={"route": route, "where": where(name)})
    return {IGNORED_FIELDS_HEADER: header_value(names)}
