"""Drain at the Serve level (issue 13): what KubeRay does with the operator's render, done by
hand on a private local Ray cluster, while streams run.

The cluster offers the custom resources the render asks for, as the head pod
(`chatstream_head`, for the ingress) and the worker pods (`chatstream_model`) do; the
operator's own `render_rayservice` gives the Serve config (its serveConfigV2), applied with
`serve deploy` to the cluster's dashboard; a change while answers stream is the same request
sent at once (`RayCluster.put`: the PUT that `serve deploy` and
KubeRay send), since the CLI alone takes seconds to start on a busy 2-core machine.
The mock engine answers in about 10 s and the drain bound is lowered to match (spec.drain), so
the module runs in a few minutes on 2 cores.

What a user would notice:
- `kubectl scale` 3 -> 1 while 6 answers stream: every answer arrives whole, each request is
  recorded once as `success` (the ledger holds nothing open), the ingress replica is the same
  one, the model replica that stays is one of the three;
- the same when Serve's autoscaler scales down (its lower bound lowered, a short
  downscale delay) while the answers stream;
- a change of generation defaults (the application's arguments: Serve rebuilds the app, every
  replica is replaced): no answer is cut, and requests sent meanwhile are served or honestly
  refused (429/503).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import httpx
import pytest
import yaml

from serve_app.config import INGRESS_DEPLOYMENT_NAME, MODEL_DEPLOYMENT_NAME
from serve_app.engines.mock import mock_answer_tokens
from tests.ray_cluster import RayCluster
from tests.support import new_request_id, outcome_of, wait_for

pytest.importorskip("chatstream_operator")
from chatstream_operator.drain import drain_bounds  # noqa: E402
from chatstream_operator.render import (  # noqa: E402
    HEAD_SLOT,
    HEAD_SLOTS,
    MODEL_SLOT,
    render_rayservice,
)

APP = "chatstream"
TOKEN_SEC = 0.05
ANSWER_TOKENS = 200  # about 10 s per answer
SLOTS = 2  # maxOngoingRequests per model replica
# A mock ChatStream as a user would write it; model replicas take a fifth of a CPU (2 cores).
SPEC: dict[str, Any] = {
    "engine": "mock",
    "mock": {"mode": "round", "timePerTokenSec": TOKEN_SEC},
    "replicas": 3,
    "maxOngoingRequests": SLOTS,
    "maxQueuedRequests": 16,
    "generation": {"maxNewTokens": ANSWER_TOKENS},
    "resources": {"cpus": 0.2},
    # The lowered drain bound: 5 s + 200 x 0.1 s = 25 s per answer (50 s for the ingress).
    "drain": {"timePerTokenSec": 0.1, "firstTokenSec": 5},
}
# What a rendered Serve config may stream at most at once with three replicas.
STREAMS = 3 * SLOTS


def render(**changes: Any) -> dict[str, Any]:
    """The operator's serveConfigV2 for SPEC with `changes` (top-level spec fields)."""
    spec = {**SPEC, **changes}
    return yaml.safe_load(render_rayservice("chat", spec)["spec"]["serveConfigV2"])


def with_autoscaling_knobs(config: dict[str, Any], **knobs: Any) -> dict[str, Any]:
    """Serve autoscaling options the operator leaves at Serve's defaults (a downscale delay of
    600 s is too long for a test), added to the ChatModel override."""
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        if deployment["name"] == MODEL_DEPLOYMENT_NAME:
            deployment["autoscaling_config"].update(knobs)
    return config


@pytest.fixture(scope="module")
def cluster():
    # Room for a rebuild: 3 old model replicas drain while 3 new ones start.
    # One node that offers what the head pod offers (the ingress's HEAD_SLOT) and what the
    # worker pods offer (a MODEL_SLOT per model replica).
    resources = {MODEL_SLOT: 8, HEAD_SLOT: HEAD_SLOTS}
    with RayCluster(num_cpus=4, resources=resources) as running:
        yield running


def replicas(cluster: RayCluster, deployment: str) -> dict[str, str]:
    """replica id -> state of `deployment`'s replicas."""
    app = cluster.application(APP) or {}
    found = app.get("deployments", {}).get(deployment, {})
    return {r["replica_id"]: r["state"] for r in found.get("replicas", [])}


def scaling_down(cluster: RayCluster, target: int) -> bool:
    """Serve took the new model replica count: the target is set, or replicas are stopping."""
    app = cluster.application(APP) or {}
    model = app.get("deployments", {}).get(MODEL_DEPLOYMENT_NAME, {})
    states = [r["state"] for r in model.get("replicas", [])]
    return model.get("target_num_replicas") == target or "STOPPING" in states


def settled(cluster: RayCluster, model_replicas: int) -> bool:
    """The application runs with exactly `model_replicas` model replicas, none starting or
    stopping, and answers on HTTP."""
    app = cluster.application(APP)
    if not app or app["status"] != "RUNNING":
        return False
    for name, deployment in app["deployments"].items():
        states = [r["state"] for r in deployment["replicas"]]
        if deployment["status"] != "HEALTHY" or any(s != "RUNNING" for s in states):
            return False
        if name == MODEL_DEPLOYMENT_NAME and len(states) != model_replicas:
            return False
    try:
        return httpx.get(f"{cluster.url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def deploy_and_settle(cluster: RayCluster, config: dict[str, Any], model_replicas: int) -> None:
    cluster.deploy(config)
    wait_for(lambda: settled(cluster, model_replicas), 150, 1.0)


def expected_answer(user_input: str, tokens: int = ANSWER_TOKENS) -> str:
    return "".join(itertools.islice(mock_answer_tokens("round", user_input), tokens))


class Stream(threading.Thread):
    """One chat turn, read to the end in the background by a client of its own."""

    def __init__(self, url: str, user_input: str) -> None:
        super().__init__(daemon=True)
        self.url, self.user_input = url, user_input
        self.request_id = new_request_id("drain")
        self.first_chunk = threading.Event()
        self.status_code: int | None = None
        self.error = ""
        self.text = ""
        self.ended_at = 0.0

    def run(self) -> None:
        headers = {"X-ChatStream-Request-Id": self.request_id}
        try:
            with (
                httpx.Client(base_url=self.url, timeout=120) as client,
                client.stream(
                    "POST", "/chat_stream", json={"user_input": self.user_input}, headers=headers
                ) as response,
            ):
                self.status_code = response.status_code
                for chunk in response.iter_text():
                    self.text += chunk
                    self.first_chunk.set()
        except httpx.HTTPError as exc:  # the connection broke: a cut stream
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()
            self.first_chunk.set()

    @property
    def whole(self) -> bool:
        return self.status_code == 200 and self.text == expected_answer(self.user_input)

    def describe(self) -> str:
        return (
            f"{self.request_id}: HTTP {self.status_code} {self.error} "
            f"{len(self.text)}/{len(expected_answer(self.user_input))} characters"
        )


def start_streams(cluster: RayCluster, count: int, label: str) -> list[Stream]:
    """`count` streams, returned once each has its first chunk (each holds a slot)."""
    streams = [Stream(cluster.url, f"{label} {i} river cloud") for i in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_chunk.wait(30), stream.describe()
        assert stream.status_code == 200, stream.describe()
    return streams


def outcome_totals(cluster: RayCluster) -> dict[str, Any]:
    return httpx.get(f"{cluster.url}/outcomes", timeout=10).json()


def assert_all_whole_and_recorded(
    cluster: RayCluster, streams: list[Stream], before: dict[str, Any]
) -> None:
    for stream in streams:
        stream.join(90)
        assert not stream.is_alive(), stream.describe()
    cut = [s.describe() for s in streams if not s.whole]
    assert not cut, f"cut streams: {cut}"
    for stream in streams:
        assert outcome_of(cluster.url, stream.request_id, timeout_s=30) == "success"

    def exact() -> dict[str, Any] | None:
        after = outcome_totals(cluster)
        grew = after["outcomes"]["success"] - before["outcomes"]["success"]
        return after if grew == len(streams) and after["open"] == 0 else None

    after = wait_for(exact, 30, 0.5)
    assert after["admitted"] - before["admitted"] == len(streams)
    assert (
        after["outcomes"]["unknown_error_occurred"] == before["outcomes"]["unknown_error_occurred"]
    )


def drain_options(cluster: RayCluster, deployment: str) -> tuple[float, float]:
    config = cluster.application(APP)["deployments"][deployment]["deployment_config"]
    return config["graceful_shutdown_timeout_s"], config["graceful_shutdown_wait_loop_s"]


def test_a_scale_down_from_3_to_1_drains_every_stream(cluster):
    deploy_and_settle(cluster, render(replicas=3), 3)
    # The render's drain bounds are what Serve runs with, for both deployments.
    bounds = drain_bounds(SPEC)
    assert drain_options(cluster, MODEL_DEPLOYMENT_NAME) == (bounds.answer_s, bounds.wait_loop_s)
    assert drain_options(cluster, INGRESS_DEPLOYMENT_NAME) == (bounds.ingress_s, bounds.wait_loop_s)
    ingress_before = replicas(cluster, INGRESS_DEPLOYMENT_NAME)
    model_before = replicas(cluster, MODEL_DEPLOYMENT_NAME)
    before = outcome_totals(cluster)

    streams = start_streams(cluster, STREAMS, "scale")  # every slot of the 3 replicas
    cluster.put(render(replicas=1))  # what KubeRay does after `kubectl scale --replicas 1`
    # The scale reached Serve while the answers were still streaming.
    wait_for(lambda: scaling_down(cluster, 1), 30, 0.2)
    assert any(s.is_alive() for s in streams), "the answers ended before the scale"

    assert_all_whole_and_recorded(cluster, streams, before)
    wait_for(lambda: settled(cluster, 1), 60, 1.0)
    assert replicas(cluster, INGRESS_DEPLOYMENT_NAME) == ingress_before  # not restarted
    assert set(replicas(cluster, MODEL_DEPLOYMENT_NAME)) < set(model_before)


def test_an_autoscaling_scale_down_drains_every_stream(cluster):
    # Autoscaling held at 3 (bounds 3..3), then the lower bound goes to 1: Serve's autoscaler
    # decides the scale-down itself. One replica is enough for the load by the target
    # (6 ongoing / 6 per replica), so it removes two replicas that both hold streams.
    def autoscaling(min_replicas: int) -> dict[str, Any]:
        bounds = {"minReplicas": min_replicas, "maxReplicas": 3, "targetOngoingRequests": 6}
        return with_autoscaling_knobs(
            render(replicas=None, autoscaling=bounds),
            downscale_delay_s=1.0,
            upscale_delay_s=1.0,
            look_back_period_s=2.0,
        )

    deploy_and_settle(cluster, autoscaling(3), 3)  # autoscaling on: Serve rebuilds once
    ingress_before = replicas(cluster, INGRESS_DEPLOYMENT_NAME)
    model_before = replicas(cluster, MODEL_DEPLOYMENT_NAME)
    before = outcome_totals(cluster)

    streams = start_streams(cluster, STREAMS, "autoscale")
    cluster.put(autoscaling(1))  # a bound changes: applied in place
    wait_for(lambda: scaling_down(cluster, 1), 30, 0.2)
    assert any(s.is_alive() for s in streams), "the answers ended before the scale-down"

    assert_all_whole_and_recorded(cluster, streams, before)
    wait_for(lambda: settled(cluster, 1), 60, 1.0)
    assert replicas(cluster, INGRESS_DEPLOYMENT_NAME) == ingress_before
    assert set(replicas(cluster, MODEL_DEPLOYMENT_NAME)) < set(model_before)


def test_a_change_of_generation_defaults_cuts_no_stream(cluster):
    deploy_and_settle(cluster, render(replicas=3), 3)
    ingress_before = replicas(cluster, INGRESS_DEPLOYMENT_NAME)
    user = httpx.Client(base_url=cluster.url, timeout=30)  # a conversation across the rebuild
    turn = {"user_input": "remember me", "max_new_tokens": 4}
    assert user.post("/chat_stream", json=turn).status_code == 200
    history = user.get("/history").json()["messages"]
    before = outcome_totals(cluster)

    streams = start_streams(cluster, STREAMS, "rebuild")
    generation = {"maxNewTokens": ANSWER_TOKENS, "temperature": 0.5, "topK": 20}
    cluster.put(render(replicas=3, generation=generation))  # new args: Serve rebuilds
    # Requests sent while the application is rebuilt: served whole, or honestly refused.
    during = [Stream(cluster.url, f"during {i} meadow") for i in range(2)]
    for stream in during:
        stream.start()
        time.sleep(1.0)
    for stream in during:
        stream.join(90)
        assert stream.whole or stream.status_code in (429, 503), stream.describe()
    served = [s for s in during if s.status_code == 200]

    assert_all_whole_and_recorded(cluster, streams + served, before)
    wait_for(lambda: settled(cluster, 3), 120, 1.0)
    # A rebuild replaces the ingress too (its old replica drained its streams first).
    assert not set(replicas(cluster, INGRESS_DEPLOYMENT_NAME)) & set(ingress_before)
    params = httpx.get(f"{cluster.url}/generation_params", timeout=10).json()
    assert params["temperature"] == 0.5 and params["top_k"] == 20
    assert user.get("/history").json()["messages"] == history  # the session carried over
    user.close()


def test_a_replica_still_streaming_at_its_drain_bound_is_stopped_and_accounted(cluster):
    # The bound set below the answer (1 s + 200 x 0.01 s = 3 s < 10 s): what "how long a
    # scale-down may take" means when an answer takes longer. The two replicas that go hold two
    # streams each; theirs are cut at the bound, each recorded once as unknown_error_occurred.
    short_drain = {"timePerTokenSec": 0.01, "firstTokenSec": 1}
    deploy_and_settle(cluster, render(replicas=3, drain=short_drain), 3)
    assert drain_options(cluster, MODEL_DEPLOYMENT_NAME)[0] == 3.0
    before = outcome_totals(cluster)

    streams = start_streams(cluster, STREAMS, "bound")
    cluster.put(render(replicas=1, drain=short_drain))
    for stream in streams:
        stream.join(90)
    whole = [s for s in streams if s.whole]
    cut = [s for s in streams if not s.whole]
    assert len(whole) == SLOTS and len(cut) == 2 * SLOTS, [s.describe() for s in streams]
    for stream in whole:
        assert outcome_of(cluster.url, stream.request_id, timeout_s=30) == "success"
    for stream in cut:
        assert outcome_of(cluster.url, stream.request_id, timeout_s=30) == "unknown_error_occurred"
    after = wait_for(lambda: (t := outcome_totals(cluster))["open"] == 0 and t, 30, 0.5)
    assert after["admitted"] - before["admitted"] == STREAMS
    grew = {k: after["outcomes"][k] - before["outcomes"][k] for k in after["outcomes"]}
    assert grew["success"] == SLOTS and grew["unknown_error_occurred"] == 2 * SLOTS, grew
