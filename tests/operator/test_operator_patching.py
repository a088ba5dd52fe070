"""Minimal merge patches: nothing when in sync, only what differs otherwise."""

from __future__ import annotations

import copy

from chatstream_operator.patching import merge_patch
from chatstream_operator.render import render_rayservice


def _apply(obj: dict, patch: dict) -> dict:
    """RFC 7386 merge patch, to check that applying the patch reaches the desired state."""
    out = copy.deepcopy(obj)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _apply(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _as_stored(desired: dict) -> dict:
    """What the API server returns: our object plus server-side fields and defaults."""
    stored = copy.deepcopy(desired)
    stored["metadata"].update(resourceVersion="42", uid="u-1", generation=3, namespace="ns")
    head = stored["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    stored["status"] = {"serviceStatus": "Running"}
    return stored


def test_no_patch_when_nothing_changed():
    desired = render_rayservice("chat", {"replicas": 2})
    assert merge_patch(_as_stored(desired), desired) == {}


def test_scaling_patches_only_what_changed():
    current = _as_stored(render_rayservice("chat", {"replicas": 2}))
    desired = render_rayservice("chat", {"replicas": 5})
    patch = merge_patch(current, desired)
    assert set(patch) == {"spec"}
    assert set(patch["spec"]) == {"serveConfigV2", "rayClusterConfig"}
    assert set(patch["spec"]["rayClusterConfig"]) == {"workerGroupSpecs"}
    assert patch["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 5
    assert merge_patch(_apply(current, patch), desired) == {}


def test_none_means_absent():
    assert merge_patch({"a": 1, "b": 2}, {"a": 1, "b": None}) == {"b": None}
    assert merge_patch({"a": 1}, {"a": 1, "b": None}) == {}


def test_types_matter_but_int_and_float_compare_by_value():
    assert merge_patch({"a": 1}, {"a": True}) == {"a": True}
    assert merge_patch({"a": "1"}, {"a": 1}) == {"a": 1}
    assert merge_patch({"a": 1.0}, {"a": 1}) == {}


def test_lists_are_replaced_whole_and_nones_inside_are_dropped():
    current = {"l": [{"x": 1}, {"x": 2}]}
    assert merge_patch(current, {"l": [{"x": 1}]}) == {"l": [{"x": 1}]}
    assert merge_patch({}, {"m": {"a": 1, "b": None}}) == {"m": {"a": 1}}
    assert merge_patch({"m": "scalar"}, {"m": {"a": 1}}) == {"m": {"a": 1}}
