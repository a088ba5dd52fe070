"""Secrets: which environment variables of the Ray pods come from which Secret keys (pure).

Secrets reach the Serve application only as environment variables that reference Secret keys
(`valueFrom.secretKeyRef`), never as literals in the Serve config or the RayService: anyone who
may read the RayService would read them there.

| variable                    | from                                  | when                     |
|-----------------------------|---------------------------------------|--------------------------|
| CHATSTREAM_REDIS_URL        | spec.session.redisUrlSecretRef        | session.store is redis   |
| CHATSTREAM_SESSION_SECRET   | spec.session.signingKeySecretRef      | always                   |
| CHATSTREAM_ADMIN_TOKEN      | spec.auth.adminTokenSecretRef         | always                   |
| CHATSTREAM_API_KEYS         | spec.auth.apiKeysSecretRef            | when given               |

The signing key and the admin token have a fallback: the Secret `<name>-chatstream` that the
operator generates (random values) and owns, keys `session-secret` and `admin-token`. It is
created once and never rewritten, so cookies stay valid across RayService upgrades and Ray
cluster replacements; deleting the ChatStream deletes it (owner reference).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from typing import Any

from . import MANAGED_BY_LABEL, NAME_LABEL, OPERATOR_NAME

# Copies of serve_app/config.py's constants (the operator image does not ship serve_app); a
# unit test asserts they stay equal.
REDIS_URL_ENV = "CHATSTREAM_REDIS_URL"
SESSION_SECRET_ENV = "CHATSTREAM_SESSION_SECRET"
ADMIN_TOKEN_ENV = "CHATSTREAM_ADMIN_TOKEN"
API_KEYS_ENV = "CHATSTREAM_API_KEYS"

# The operator-generated Secret's keys.
SESSION_SECRET_KEY = "session-secret"
ADMIN_TOKEN_KEY = "admin-token"


def generated_secret_name(name: str) -> str:
    """The Secret the operator generates for ChatStream `name`."""
    return f"{name}-chatstream"


def _ref(ref: Mapping[str, Any]) -> dict[str, str]:
    return {"name": ref["name"], "key": ref["key"]}


def secret_refs(name: str, spec: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Environment variable -> {name, key} of the Secret key it is read from."""
    session = spec.get("session") or {}
    auth = spec.get("auth") or {}
    generated = generated_secret_name(name)
    refs: dict[str, dict[str, str]] = {}
    if session.get("store") == "redis" and session.get("redisUrlSecretRef"):
        refs[REDIS_URL_ENV] = _ref(session["redisUrlSecretRef"])
    signing = session.get("signingKeySecretRef")
    refs[SESSION_SECRET_ENV] = (
        _ref(signing) if signing else {"name": generated, "key": SESSION_SECRET_KEY}
    )
    admin = auth.get("adminTokenSecretRef")
    refs[ADMIN_TOKEN_ENV] = _ref(admin) if admin else {"name": generated, "key": ADMIN_TOKEN_KEY}
    if auth.get("apiKeysSecretRef"):
        refs[API_KEYS_ENV] = _ref(auth["apiKeysSecretRef"])
    return refs


def secret_env(name: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Ray containers' `env` entries, each a `secretKeyRef` (never a literal value)."""
    return [
        {"name": env, "valueFrom": {"secretKeyRef": dict(ref)}}
        for env, ref in secret_refs(name, spec).items()
    ]


def generated_keys(name: str, spec: Mapping[str, Any]) -> list[str]:
    """Keys of the operator-generated Secret that the pods read; empty: no Secret needed."""
    generated = generated_secret_name(name)
    return sorted(
        ref["key"] for ref in secret_refs(name, spec).values() if ref["name"] == generated
    )


def render_generated_secret(name: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A new operator-generated Secret with fresh random values, or None when none is needed.
    Without namespace and owner (see kopf.adopt); created only when it does not exist yet."""
    keys = generated_keys(name, spec)
    if not keys:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": generated_secret_name(name),
            "labels": {MANAGED_BY_LABEL: OPERATOR_NAME, NAME_LABEL: name},
        },
        "type": "Opaque",
        "data": {
            key: base64.b64encode(secrets.token_urlsafe(32).encode()).decode() for key in keys
        },
    }
