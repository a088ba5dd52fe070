"""Builds what one ingress replica runs, once, from the model handle and the config: the store,
the prompt formatter, the edge, sessions, admission with its bookkeeping and heartbeat, and the
`/v1` service. Nothing here handles a request."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.access import Access
from serve_app.admission import Admission
from serve_app.background import Background
from serve_app.bookkeeping import Bookkeeping
from serve_app.config import REDIS_URL_ENV, SESSION_SECRET_ENV, ChatStreamConfig
from serve_app.edge import Edge
from serve_app.engines import make_prompt_formatter
from serve_app.engines.base import PromptFormatter
from serve_app.fair_queue import FairQueue
from serve_app.liveness import LoadBoard, follow_model_slots, heartbeat
from serve_app.openai_api.service import OpenAIService
from serve_app.session_state import SessionLimits
from serve_app.sessions import CookieSigner, Sessions
from serve_app.stores import StateStore, StoreSettings, make_store


def store_settings(config: ChatStreamConfig, namespace: str) -> StoreSettings:
    return StoreSettings(
        namespace=namespace,
        session_ttl_sec=config.session_ttl_sec,
        max_sessions=config.max_sessions,
        max_new_sessions=config.max_new_sessions,
        limits=session_limits(config),
        ledger_size=config.ledger_size,
        signing_key=os.environ.get(SESSION_SECRET_ENV, ""),
    )


def session_limits(config: ChatStreamConfig) -> SessionLimits:
    return SessionLimits(
        max_turns=config.session_max_turns, max_feedback=config.session_max_feedback
    )


def model_slots(config: ChatStreamConfig) -> int:
    """The model's slots at most (autoscaling: at its largest, so that the queue it scales on
    still shows): what the fair queue lets through to the model handle at once. Each ingress
    replica lets that many through; beyond it, requests wait their turn in the ingress."""
    replicas = config.max_replicas or config.num_replicas or 1
    return config.max_ongoing_requests * replicas


@dataclass(frozen=True)
class Parts:
    """One ingress replica's services (see the module docstring)."""

    config: ChatStreamConfig
    store: StateStore
    formatter: PromptFormatter
    edge: Edge  # also the services' Gate (serve_app/access.py)
    sessions: Sessions
    bookkeeping: Bookkeeping
    admission: Admission
    openai: OpenAIService
    app_name: str
    ingress_name: str
    heartbeat: asyncio.Task
    capacity_follower: asyncio.Task

    async def drain(self) -> None:
        """On shutdown: pending bookkeeping and callbacks get `shutdown_drain_sec`."""
        await self.bookkeeping.background.drain(
            self.config.shutdown_drain_sec, forever={self.heartbeat, self.capacity_follower}
        )


async def build_parts(model: DeploymentHandle, config: ChatStreamConfig) -> Parts:
    """Inside a Serve ingress replica (e.g. in an `async def __init__`). A bad API key
    configuration or an unusable store fails here, at start."""
    context = serve.get_replica_context()
    replica_id = context.replica_id.unique_id
    store = make_store(
        config.session_store,
        store_settings(config, context.app_name),
        redis_url=os.environ.get(REDIS_URL_ENV, ""),
    )
    await store.verify()  # StoreMisconfigured: one line naming the setting; the replica stops
    formatter = await asyncio.to_thread(make_prompt_formatter, config)
    background = Background()
    # Redis shares the per-key limits and usage between replicas; other stores: None.
    access = Access(
        config, key_state=store.key_state(), replica_id=replica_id, background=background
    )
    bookkeeping = Bookkeeping(
        store,
        session_limits(config),
        background,
        access,
        callback_timeout_sec=config.callback_timeout_sec,
        callback_threads=config.callback_threads,
    )
    board = LoadBoard(store, replica_id, background)
    admission = Admission(
        model,
        store,
        bookkeeping,
        board,
        replica_id=replica_id,
        retry_after_sec=config.retry_after_sec,
        fair_queue=FairQueue(
            model_slots(config), config.max_queued_requests, config.fair_share_weights
        ),
    )
    edge = Edge(access, store, config.max_body_bytes)
    signer = CookieSigner(await store.signing_key(), config.session_ttl_sec)
    return Parts(
        config=config,
        store=store,
        formatter=formatter,
        edge=edge,
        sessions=Sessions(store, signer, formatter, config),
        bookkeeping=bookkeeping,
        admission=admission,
        openai=OpenAIService(config, formatter, edge, admission),
        app_name=context.app_name,
        ingress_name=context.deployment,
        heartbeat=background.spawn(
            heartbeat(board, store, bookkeeping.count_lost, access.release_lost)
        ),
        capacity_follower=background.spawn(
            follow_model_slots(
                admission.fair_queue.resize, context.app_name, config.max_ongoing_requests
            )
        ),
    )
