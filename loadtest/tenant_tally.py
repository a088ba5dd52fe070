"""The tally of the tenants load test (loadtest/tenant_users.py), without Locust: which keys
flood, what each key got, and whether a polite key was locked out."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

KEYS_ENV = "CHATSTREAM_API_KEYS"
CHECK_KEY_ENV = "CHATSTREAM_LOADTEST_API_KEY"  # = openai_user.API_KEY_ENV
FLOOD_PREFIX = "flood"


def keys_from_environment() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(flood keys, polite keys) as (key id, key) pairs."""
    pairs = []
    for line in os.environ.get(KEYS_ENV, "").splitlines():
        key_id, sep, key = line.strip().partition(":")
        if sep and not key_id.startswith("#"):
            pairs.append((key_id.strip(), key.strip()))
    checks = os.environ.get(CHECK_KEY_ENV, "")  # the final check's key: nobody's tenant
    flood = [p for p in pairs if p[0].startswith(FLOOD_PREFIX)]
    return flood, [p for p in pairs if not p[0].startswith(FLOOD_PREFIX) and p[1] != checks]


@dataclass
class Tally:
    admitted: int = 0
    refused: int = 0
    first_chunk_s: list[float] = field(default_factory=list)


TALLIES: dict[str, Tally] = {}


def tenant_report() -> tuple[str, bool]:
    """The per-key table, and False if a polite key was locked out (nothing admitted)."""
    if not TALLIES:
        return "", True
    lines = [f"{'key id':<12} {'admitted':>8} {'refused':>8} {'first chunk p50':>16} {'p95':>8}"]
    locked_out = []
    for key_id, tally in sorted(TALLIES.items()):
        times = sorted(tally.first_chunk_s)
        p50 = statistics.median(times) if times else float("nan")
        p95 = times[int(0.95 * (len(times) - 1))] if times else float("nan")
        lines.append(
            f"{key_id:<12} {tally.admitted:>8} {tally.refused:>8} {p50:>15.2f}s {p95:>7.2f}s"
        )
        if not key_id.startswith(FLOOD_PREFIX) and tally.admitted == 0:
            locked_out.append(key_id)
    if locked_out:
        lines.append(f"LOCKED OUT (no request admitted): {', '.join(locked_out)}")
    return "\n".join(lines), not locked_out
