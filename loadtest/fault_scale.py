"""The `scale` kind of `python -m loadtest.fault`: change a Serve deployment's replica count
through the running Serve config, as KubeRay does after `kubectl scale`, and wait until each
count has settled (see loadtest/fault.py for the command line)."""

from __future__ import annotations

import copy
import time

INGRESS_DEPLOYMENT = "ChatStreamIngress"


def _deployments(details: dict, app: str) -> dict:
    application = details.get("applications", {}).get(app) or {}
    return application.get("deployments", {}) if application.get("status") == "RUNNING" else {}


def _replica_states(details: dict, app: str, deployment: str) -> dict[str, str]:
    found = details.get("applications", {}).get(app, {}).get("deployments", {}).get(deployment)
    return {r["replica_id"]: r["state"] for r in (found or {}).get("replicas", [])}


def _settled(details: dict, app: str, deployment: str, replicas: int) -> bool:
    """The app runs, `deployment` is healthy with exactly `replicas` RUNNING replicas and none
    starting or stopping (removed replicas have drained and exited)."""
    found = _deployments(details, app).get(deployment)
    if not found or found.get("status") != "HEALTHY":
        return False
    states = list(_replica_states(details, app, deployment).values())
    return len(states) == replicas and all(state == "RUNNING" for state in states)


def with_replicas(details: dict, app: str, deployment: str, replicas: int) -> dict:
    """The running Serve config (every application as deployed) with `deployment`'s
    `num_replicas` override of `app` set to `replicas`, and nothing else changed."""
    applications = []
    for name, application in details["applications"].items():
        config = copy.deepcopy(application["deployed_app_config"])
        if name == app:
            overrides = config.setdefault("deployments", [])
            override = next((d for d in overrides if d.get("name") == deployment), None)
            if override is None:
                override = {"name": deployment}
                overrides.append(override)
            if override.get("autoscaling_config"):
                raise ValueError(f"{app}#{deployment} autoscales: change its bounds instead")
            override["num_replicas"] = replicas
        applications.append(config)
    config = {"applications": applications}
    for key in ("proxy_location", "http_options"):
        if details.get(key) is not None:
            config[key] = details[key]
    return config


def scale_deployment(
    dashboard_url: str,
    app: str,
    deployment: str,
    steps: list[int],
    hold_sec: float,
    recovery_timeout: float,
) -> dict[str, object]:
    """Scale `app#deployment` through the Serve config to each count of `steps` in turn."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard_url)
    details = client.get_serve_details()
    app = app or next(iter(details.get("applications", {})), "")
    before = _replica_states(details, app, deployment)
    ingress_before = set(_replica_states(details, app, INGRESS_DEPLOYMENT))
    name = f"{app}#{deployment} replicas {' -> '.join(map(str, [len(before), *steps]))}"
    if not before:
        return {"killed": "", "recovered": False, "detail": f"no replica of {app}#{deployment}"}
    started = time.time()
    timings = []
    for replicas in steps:
        step_started = time.monotonic()
        client.deploy_applications(with_replicas(details, app, deployment, replicas))
        deadline = step_started + recovery_timeout
        while not _settled(details := client.get_serve_details(), app, deployment, replicas):
            if time.monotonic() > deadline:
                states = _replica_states(details, app, deployment)
                detail = f"not settled at {replicas} after {recovery_timeout}s: {states}"
                return {"killed": name, "recovered": False, "detail": detail}
            time.sleep(0.25)
        timings.append(f"{replicas} in {time.monotonic() - step_started:.1f}s")
        time.sleep(hold_sec)
    ingress_after = set(_replica_states(details, app, INGRESS_DEPLOYMENT))
    kept = ingress_after == ingress_before
    detail = "settled at " + ", ".join(timings)
    if not kept:
        detail += (
            f"; the ingress replicas changed: {sorted(ingress_before)} -> {sorted(ingress_after)}"
        )
    up_at = time.time()
    return {
        "killed": name,
        "recovered": kept,
        "seconds": round(up_at - started, 1),
        "detail": detail,
        "down_at": started,
        "up_at": up_at,
        "state_lost": False,
        "ingress_kept": kept,
    }
