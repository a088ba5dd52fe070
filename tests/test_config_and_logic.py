"""Pure parts of serve_app: configuration, outcome classification, the ledger, turn planning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.exceptions import RayTaskError
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import SESSION_ROUTER_PATH, model_deployment_options
from serve_app.config import ChatStreamConfig, parse_args
from serve_app.conversation import ChatPrompt, plan_turn
from serve_app.engines.mock import MockPromptFormatter
from serve_app.engines.threads import local_model_cpus, torch_threads, usable_cores
from serve_app.local_server import free_port, port_pick_range
from serve_app.outcomes import Outcome, OutcomeLedger, classify_outcome
from serve_app.refusals import Refusal
from serve_app.session_state import trim_history
from serve_app.sessions import CookieSigner
from serve_app.validation import ChatTurnRequest


# --------------------------------------------------------------------------- configuration
def test_picked_ports_avoid_the_ranges_ray_and_the_kernel_hand_out():
    """A Serve port picked from the ephemeral range was once taken by a Ray daemon before
    `serve run` bound it (a gRPC answer on the HTTP port)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low, high = (int(p) for p in ephemeral)
    picks = [free_port() for _ in range(50)]
    assert len(set(picks)) == 50  # never the same port twice in one process
    for port in picks:
        assert port in port_pick_range()
        assert not low <= port <= high, "in the kernel's ephemeral range"
        assert not 10002 <= port <= 19999, "in Ray's worker port range"


def test_serve_config_file_validates_with_serves_schema():
    with open("serve_config.yaml") as f:
        document = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    assert application.import_path == "serve_app:app"
    assert parse_args(application.args).engine == "transformers"


def test_command_line_strings_are_coerced_and_checked():
    config = parse_args({"engine": "mock", "max_ongoing_requests": "2", "cookie_secure": "true"})
    assert config.max_ongoing_requests == 2 and config.cookie_secure is True
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        parse_args({"max_ongoing_requests": "0"})
    with pytest.raises(ValidationError, match="no_such_knob"):
        parse_args({"no_such_knob": "1"})
    with pytest.raises(ValidationError, match="min_replicas"):
        parse_args({"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="num_gpus"):
        parse_args({"engine": "mock", "num_gpus": 1})
    with pytest.raises(ValidationError, match="max_queued_requests"):
        parse_args({"max_queued_requests": 0})


def test_model_deployment_options_follow_the_config():
    fixed = model_deployment_options(parse_args({"num_replicas": 3, "num_gpus": 1, "num_cpus": 1}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert fixed["request_router_config"].request_router_class == SESSION_ROUTER_PATH
    local = parse_args({"num_replicas": 2})  # num_cpus empty: derived from this machine
    assert model_deployment_options(local)["ray_actor_options"]["num_cpus"] == local_model_cpus(
        local, usable_cores()
    )
    plain = model_deployment_options(parse_args({"session_affinity": False}))
    assert "request_router_config" not in plain
    scaled = model_deployment_options(parse_args({"min_replicas": 1, "max_replicas": 4}))
    assert scaled["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in scaled
    assert scaled["max_ongoing_requests"] == 32 and scaled["max_queued_requests"] == 64


def test_a_local_run_reserves_what_fits_the_machine_or_refuses_naming_the_knob():
    """`serve run serve_app:app num_replicas=2` on 2 cores: 2 x 1 CPU + the ingress's 0.5 never
    fit, and Serve waited forever; now each model replica reserves a share that fits."""
    two = parse_args({"num_replicas": 2})
    assert local_model_cpus(two, cores=2) == 0.75  # (2 - 0.5 ingress) / 2
    assert 2 * local_model_cpus(two, cores=2) + two.ingress_num_cpus <= 2
    assert local_model_cpus(two, cores=8) == 1.0  # at most one, as before
    assert local_model_cpus(parse_args({"min_replicas": 1, "max_replicas": 3}), cores=2) == 0.5
    with pytest.raises(ValueError, match="num_replicas.*num_cpus"):
        local_model_cpus(parse_args({"num_replicas": 7}), cores=2)
    # The replicas share the cores between their torch threads instead of each taking all.
    assert torch_threads(two) == max(1, usable_cores() // 2)
    assert torch_threads(parse_args({})) == usable_cores()


# --------------------------------------------------------------------------- outcomes
@pytest.mark.parametrize(
    ("sent", "completed", "exc", "expected"),
    [
        (3, True, None, Outcome.SUCCESS),
        (0, True, None, Outcome.SUCCESS),  # an empty answer, fully sent
        (2, False, asyncio.CancelledError(), Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING),
        (0, False, asyncio.CancelledError(), Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING),
        (1, False, GeneratorExit(), Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING),
        (1, False, ConnectionResetError(), Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING),
        (1, False, RuntimeError("engine"), Outcome.UNKNOWN_ERROR_OCCURRED),
        (0, False, RuntimeError("engine"), Outcome.UNKNOWN_ERROR_OCCURRED),
    ],
)
def test_classify_outcome(sent, completed, exc, expected):
    assert classify_outcome(sent, completed, exc) is expected


def test_an_engine_oserror_is_not_mistaken_for_a_disconnect():
    # Ray re-raises a remote error as a subclass of both RayTaskError and the cause's type.
    remote = RayTaskError("generate", "traceback", OSError("disk")).as_instanceof_cause()
    assert isinstance(remote, OSError)
    assert classify_outcome(1, False, remote) is Outcome.UNKNOWN_ERROR_OCCURRED


def test_ledger_counts_and_keeps_the_newest_ids():
    ledger = OutcomeLedger(max_entries=2)
    ledger.record_outcome("r-a", "a", "success")
    ledger.record_outcome("r-b", "b", "client_disconnected_while_streaming")
    ledger.record_outcome("r-c", "c", "success")
    ledger.record_rejection("d", "too_many_requests")
    totals = ledger.totals()
    assert totals["outcomes"]["success"] == 2 and totals["admitted"] == 3
    assert totals["rejections"] == {"too_many_requests": 1}
    assert ledger.lookup(["a", "b", "c"])["outcomes"] == {
        "b": "client_disconnected_while_streaming",
        "c": "success",
    }
    with pytest.raises(ValueError):
        ledger.record_outcome("r-e", "e", "finished")
    ledger.record_outcome("r-c", "c", "success")  # a retried write of the same record
    assert ledger.totals()["admitted"] == 3


# --------------------------------------------------------------------------- turns and sessions
FORMATTER = MockPromptFormatter(ChatStreamConfig(engine="mock", max_context_tokens=40))
DEFAULTS = ChatStreamConfig().generation_defaults().model_dump()


def history_after_answer(messages, answer: str, message_id: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": answer, "message_id": message_id}]


def plan(history, **turn):
    return plan_turn(
        history, ChatTurnRequest(**turn), defaults=DEFAULTS, session_params={}, formatter=FORMATTER
    )


def test_a_turn_appends_the_user_input_and_caps_the_answer_to_the_context():
    result = plan([], user_input="hello there", max_new_tokens=1000)
    assert result.messages == [{"role": "user", "content": "hello there"}]
    assert result.params["max_new_tokens"] == 40 - result.prompt_tokens


def test_regenerate_answers_the_last_user_message_again():
    history = history_after_answer([{"role": "user", "content": "q"}], "a", "m1")
    assert plan(history, regenerate=True).messages == [{"role": "user", "content": "q"}]
    with pytest.raises(Refusal) as refused:
        plan([], regenerate=True)
    assert refused.value.status_code == 409


def test_oldest_turns_are_dropped_to_fit_and_a_lone_oversized_input_is_refused():
    history = []
    for index in range(4):
        history = history_after_answer(
            [*history, {"role": "user", "content": f"q{index} " + "w " * 8}], "a " * 4, str(index)
        )
    result = plan(history, user_input="latest")
    assert result.prompt_tokens < 40 and result.messages[-1]["content"] == "latest"
    assert result.messages[0]["role"] == "user" and len(result.messages) < len(history) + 1
    with pytest.raises(Refusal) as refused:
        plan([], user_input="w " * 60)
    assert refused.value.status_code == 413


def test_trim_history_keeps_whole_turns():
    history = [{"role": r, "content": str(i)} for i in range(3) for r in ("user", "assistant")]
    assert [m["content"] for m in trim_history(history, 2)] == ["1", "1", "2", "2"]


def test_signed_cookie_round_trip_and_forgery():
    signer = CookieSigner("secret", max_age_sec=60)
    assert signer.unsign(signer.sign("session-1")) == "session-1"
    assert signer.unsign("session-1") is None
    assert CookieSigner("other", 60).unsign(signer.sign("session-1")) is None


def test_cancellations_surfacing_through_ray_or_task_groups_are_disconnects():
    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import RequestCancelledError

    assert classify_outcome(1, False, TaskCancelledError()) is (
        Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
    )
    assert classify_outcome(0, False, RequestCancelledError("r1")) is (
        Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
    )
    group = BaseExceptionGroup("stream", [asyncio.CancelledError(), TaskCancelledError()])
    assert classify_outcome(1, False, group) is Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
    mixed = BaseExceptionGroup("stream", [asyncio.CancelledError(), RuntimeError("engine")])
    assert classify_outcome(1, False, mixed) is Outcome.UNKNOWN_ERROR_OCCURRED


def test_chat_prompt_renders_the_system_prompt_first():
    prompt = ChatPrompt([{"role": "user", "content": "hi"}], FORMATTER, "be brief")
    assert (
        prompt.create_prompt()
        == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    )
