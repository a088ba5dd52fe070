"""Turn application arguments into a Serve application: `serve run serve_app:app key=value`."""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from chatstream_defaults import answer_seconds, ray_serve_env, wait_loop_seconds
from serve_app.config import ChatStreamConfig, parse_args
from serve_app.engines.threads import local_model_cpus, usable_cores
from serve_app.ingress import ChatStreamIngress
from serve_app.model_deployment import ChatModel

# The model deployment's request router (session_router.py), by import path: Serve imports it
# in every process that calls the model.
SESSION_ROUTER_PATH = "serve_app.session_router:SessionAffinityRouter"


def drain_options(config: ChatStreamConfig, factor: float = 1.0) -> dict[str, float]:
    """Graceful-shutdown options: a replica that goes finishes its streams within the bound
    (`factor` times the model's: the ingress holds a wait for a slot, then the answer)."""
    # The operator's default bound (chatstream_defaults), unless set.
    timeout = config.graceful_shutdown_timeout_s or answer_seconds(config.max_new_tokens)
    loop = config.graceful_shutdown_wait_loop_s or wait_loop_seconds(timeout)
    return {"graceful_shutdown_timeout_s": timeout * factor, "graceful_shutdown_wait_loop_s": loop}


def model_deployment_options(config: ChatStreamConfig) -> dict[str, Any]:
    """Serve options of the model deployment: the concurrency limit, the queue, replicas, GPUs."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        # num_cpus left empty (local `serve run`): reserve what lets every replica fit on this
        # machine beside the ingress (at most one CPU); the replicas still compute on all of its
        # cores between them (serve_app/engines/threads.py).
        "ray_actor_options": {
            "num_cpus": (
                local_model_cpus(config, usable_cores())
                if config.num_cpus is None
                else config.num_cpus
            ),
            "num_gpus": config.num_gpus,
        },
        # Loading a model can take minutes on a cold node.
        "health_check_timeout_s": 60,
        # A dead engine worker fails the check (engines' check_health): Serve hears of it
        # within 2 s, not Serve's default 10, and replaces the replica.
        "health_check_period_s": 2,
        **drain_options(config),
    }
    if config.session_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=SESSION_ROUTER_PATH
        )
    options.update(placement_options(config))
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


def placement_options(config: ChatStreamConfig) -> dict[str, Any]:
    """vLLM with tensor parallelism: the replica's GPUs as a Ray placement group, one bundle per
    GPU after the replica's own CPU bundle; vLLM's Ray workers take the GPU bundles."""
    if config.engine != "vllm" or config.tensor_parallel_size == 1:
        return {}
    cpus = 1.0 if config.num_cpus is None else config.num_cpus
    return {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": cpus}] + [{"GPU": 1.0}] * config.tensor_parallel_size,
        "placement_group_strategy": "STRICT_PACK",
    }


def build_app(config: ChatStreamConfig, ingress: Deployment = ChatStreamIngress) -> Application:
    """The model deployment behind `ingress` (ours, or your own that uses ChatStream)."""
    model = ChatModel.options(**model_deployment_options(config)).bind(config)
    return ingress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        **drain_options(config, factor=2),
    ).bind(model, config)


def use_ray_serve_env() -> None:
    """Ray Serve's throughput-optimized mode (chatstream_defaults.RAY_SERVE_ENV) for the Ray cluster
    that `serve run serve_app:app` starts: it builds the application before it starts Ray, and
    Ray's processes inherit its environment. A no-op once Ray runs (a cluster's processes get
    the variables from their own environment)."""
    if not ray.is_initialized():
        os.environ.update(ray_serve_env(os.environ))


def app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for `serve run serve_app:app [key=value ...]` and Serve config files
    (`import_path: serve_app:app`, `args: {...}`); keys are ChatStreamConfig's fields."""
    config = parse_args(args)  # a bad argument fails before anything is changed
    use_ray_serve_env()
    return build_app(config)
