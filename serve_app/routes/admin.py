"""Operator endpoints (the admin token; loopback only without one) and health."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import psutil
import ray
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from serve_app import metrics
from serve_app.access import Guard
from serve_app.config import MODEL_DEPLOYMENT_NAME
from serve_app.routes import openapi

STATIC_DIR = Path(__file__).parent.parent / "static"

router = APIRouter()
_ADMIN_ERRORS = openapi.errors(*openapi.ADMIN)
GUARDS = {
    path: Guard.ADMIN
    for path in ("/load", "/resource_usage", "/outcomes", "/outcomes/ledger", "/v1/usage")
}


@router.get("/load", responses=_ADMIN_ERRORS)
async def load(request: Request) -> dict:
    """Requests waiting and holding a slot across ingress replicas, and the slots and queue
    places of what Serve runs now (model replicas are scaled outside the args)."""
    parts = request.app.state.parts
    totals = await parts.store.load()
    status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
    app = status.applications.get(parts.app_name)
    deployments = app.deployments if app else {}

    def running(name: str) -> int:
        state = deployments.get(name)
        return int(state.replica_states.get("RUNNING", 0)) if state else 0

    queue = parts.config.max_queued_requests
    return {
        **totals,
        "capacity": running(MODEL_DEPLOYMENT_NAME) * parts.config.max_ongoing_requests,
        # Serve bounds the queue per caller, that is per ingress replica.
        "max_queued": -1 if queue < 0 else queue * running(parts.ingress_name),
        # This ingress replica's fair queue: each tenant's places, waiting and share.
        "fair_queue": parts.admission.fair_queue.snapshot(),
        # This ingress replica's model calls by routing decision (session_router.py).
        "routing": metrics.routing_snapshot(),
    }


def _resource_usage() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory": {
            "total_bytes": memory.total,
            "used_bytes": memory.used,
            "percent": memory.percent,
        },
        "cluster": {"total": ray.cluster_resources(), "available": ray.available_resources()},
    }


@router.get("/resource_usage", responses=_ADMIN_ERRORS)
async def resource_usage() -> dict:
    # Ray's resource calls block: they run on a worker thread, not the event loop.
    return await asyncio.to_thread(_resource_usage)


@router.get("/outcomes", responses=_ADMIN_ERRORS)
async def outcomes(request: Request) -> dict:
    return await request.app.state.parts.store.outcome_totals()


@router.get("/outcomes/ledger", responses=_ADMIN_ERRORS)
async def outcome_ledger(
    request: Request, request_id: Annotated[list[str] | None, Query()] = None
) -> dict:
    return await request.app.state.parts.store.outcome_ledger(request_id)


@router.get("/v1/usage", responses=_ADMIN_ERRORS)
async def usage(request: Request) -> dict:
    return await request.app.state.parts.edge.access.usage_report()


@router.get("/healthz", responses=openapi.errors(*openapi.EDGE, 503))
async def healthz(request: Request) -> Response:
    """200 once the whole application (model included) is running, 503 before."""
    app_name = serve.get_replica_context().app_name
    status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
    app_status = status.applications.get(app_name)
    if app_status is None or app_status.status != "RUNNING":
        state = app_status.status if app_status else "UNKNOWN"
        return JSONResponse({"status": "starting", "application": state}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/health", responses=openapi.errors(*openapi.EDGE, 503))
async def health(request: Request) -> Response:
    """/healthz under the name vLLM and TGI use (OpenAI-protocol clients such as guidellm probe
    it before a run)."""
    return await healthz(request)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    page = STATIC_DIR / "index.html"
    if not page.exists():
        return JSONResponse({"error": "not_found", "message": "the web UI is not installed"}, 404)
    return FileResponse(page)
