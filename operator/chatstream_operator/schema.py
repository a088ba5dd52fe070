"""The ChatStream CRD's own OpenAPI schema, checked by the operator (defence in depth).

The API server validates a ChatStream against the CRD before the operator sees it, but not
always: Helm never upgrades `crds/`, so an old CRD may be installed; objects stored before a
schema change are not re-checked; emulators apply no schema. A spec that skipped the check
(`replicas: -5`) would reach the RayService. So the operator checks every spec against the
same schema, read from the same file (the chart's `crds/`; the operator image copies it into
the package as `crd/chatstreams.chatstream.dev.yaml`), with a small validator for the subset of
OpenAPI v3 that the CRD uses. Standard library and PyYAML only.

Also KubeRay's naming rules, which a RayService named like the ChatStream must meet
(ray-operator/controllers/ray/utils/validation.go): a DNS-1035 label of at most 47 characters.
"""

from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import yaml

CRD_FILE = "chatstreams.chatstream.dev.yaml"
_HERE = pathlib.Path(__file__).resolve().parent
CRD_LOCATIONS = (
    _HERE / "crd" / CRD_FILE,  # the operator image
    _HERE.parents[1] / "helm" / "chatstream" / "crds" / CRD_FILE,  # a checkout of the repository
)

# KubeRay refuses longer RayService names (it derives Service and cluster names from them).
MAX_RAYSERVICE_NAME_LENGTH = 47
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def spec_schema() -> dict[str, Any]:
    """The `spec` schema of the ChatStream CRD's storage version."""
    for path in CRD_LOCATIONS:
        if path.is_file():
            crd = yaml.safe_load(path.read_text())
            version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
            return version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    raise FileNotFoundError(f"the ChatStream CRD ({CRD_FILE}) is in none of {CRD_LOCATIONS}")


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict, Mapping),
    "array": (list, tuple),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _type_ok(value: Any, expected: str) -> bool:
    if expected in ("integer", "number") and isinstance(value, bool):
        return False
    if expected == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(expected, (object,)))


def schema_problems(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
    """What in `value` breaks `schema` (the OpenAPI v3 subset of CRDs), each naming its field."""
    if value is None:
        return [] if schema.get("nullable") else [f"{path} must not be null"]
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        return [f"{path} must be of type {expected}, not {type(value).__name__} ({value!r})"]
    problems: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path} ({value!r}) must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            if schema.get("exclusiveMinimum") is True and value <= schema["minimum"]:
                problems.append(f"{path} ({value}) must be more than {schema['minimum']}")
            elif value < schema["minimum"]:
                problems.append(f"{path} ({value}) must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path} ({value}) must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{path} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{path} must have at most {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path} ({value!r}) must match {schema['pattern']}")
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{path} must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{path} must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, Mapping):
        properties = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                problems.append(f"{path}.{key} is required")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                problems += schema_problems(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, Mapping):
                problems += schema_problems(item, extra, f"{path}.{key}")
            elif properties and not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{key} is not a field of the ChatStream CRD")
    return problems


def spec_problems(spec: Mapping[str, Any]) -> list[str]:
    """The spec checked against the CRD's own schema."""
    return schema_problems(spec, spec_schema(), "spec")


def name_problems(name: str) -> list[str]:
    """KubeRay's rules for the RayService's name (the ChatStream's)."""
    problems = []
    if len(name) > MAX_RAYSERVICE_NAME_LENGTH:
        problems.append(
            f"metadata.name ({name}) has {len(name)} characters; KubeRay accepts a RayService "
            f"name of at most {MAX_RAYSERVICE_NAME_LENGTH}: re-create the ChatStream shorter"
        )
    if not DNS_1035_LABEL.match(name):
        problems.append(
            f"metadata.name ({name}) must be a DNS-1035 label for KubeRay (lower-case letters, "
            "digits and '-', starting with a letter): re-create the ChatStream under such a name"
        )
    return problems
