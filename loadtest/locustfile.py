"""ChatStream load test: four client behaviours, and a final check that the server's outcome
accounting matches what the clients saw, request id by request id.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 14 -r 7 -t 45s

Users (weights are options, see `--help`), and the outcome each implies:
- ChatUser: multi-turn conversations, reads every answer to the end -> success
- EarlyQuitterUser: closes before the first chunk (queued for a slot) -> ..._before_streaming
- MidStreamQuitterUser: reads 1-3 chunks of a long answer, then closes -> ..._while_streaming
- BadInputUser: malformed JSON, missing/empty/oversized input, bad params -> 4xx, not admitted
- FailingPromptUser (opt-in): the mock engine's fail marker -> unknown_error_occurred
- OpenAIUser (loadtest/openai_user.py): /v1/chat/completions streamed and not, reading to the
  end, quitting mid-stream or before the first chunk -> the outcomes above

The final check reads the operator endpoints with `Authorization: Bearer $CHATSTREAM_ADMIN_TOKEN`
when that variable is set (needed unless the service runs without a token, on loopback).

Fault profiles (`--fault-at S --fault-kind K`): kill a model replica, kill the shared-state
actor, or restart / kill the Redis of session_store=redis mid-run. Requests refused while the
store is down are `503 store_unavailable` at the client: counted, not errors. `scale` is no
fault: the model deployment goes through `--fault-scale-replicas` (3 -> 1 -> 3) by its Serve
config, and nothing may show it (no cut stream, no error; 429s are honest refusals).

At test stop: wait until the service is quiet (0 ongoing, 0 queued), compare every request id's
outcome or rejection with the server's ledger, compare the totals, check that no slot is left
occupied and that one fresh request streams at once; print the table; any difference makes the
process exit code 1. The service must serve no other traffic during the run (totals are
compared as deltas). Single-process Locust only (the client records live in this process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `locust -f` puts only loadtest/ on the path
    sys.path.insert(0, str(_ROOT))

from loadtest.accounting import (  # noqa: E402
    ABSENT,
    BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    WHILE_STREAMING,
    AccountingReport,
    ClientRecord,
    ServerView,
    compare,
    format_report,
    rejected,
    report_as_dict,
    server_view_from_json,
)
from loadtest.openai_user import OpenAIUser  # noqa: E402

logger = logging.getLogger("chatstream.loadtest")

REQUEST_ID_HEADER = "X-ChatStream-Request-Id"
STORE_UNAVAILABLE = "store_unavailable"
TURN_IN_PROGRESS = "turn_in_progress"
NOTHING_TO_REGENERATE = "nothing_to_regenerate"
FAULT_KINDS = ("replica", "state-actor", "redis-restart", "redis-kill", "scale")
STORE_FAULTS = ("state-actor", "redis-restart", "redis-kill")
WORDS = ("river", "cloud", "lantern", "harbor", "meadow", "signal", "copper", "orbit", "garden")


# --------------------------------------------------------------------------- options
@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("ChatStream load test")
    group.add_argument("--chatter-weight", type=int, default=6, help="weight of ChatUser")
    group.add_argument("--early-quitter-weight", type=int, default=3, help="EarlyQuitterUser")
    group.add_argument("--mid-stream-quitter-weight", type=int, default=3, help="MidStream...")
    group.add_argument("--bad-input-weight", type=int, default=2, help="weight of BadInputUser")
    group.add_argument("--openai-weight", type=int, default=2, help="weight of OpenAIUser")
    group.add_argument(
        "--failing-prompt-weight",
        type=int,
        default=0,
        help="weight of FailingPromptUser (needs --fail-marker = the service's mock_fail_marker)",
    )
    group.add_argument("--fail-marker", default="", help="the service's mock_fail_marker")
    group.add_argument(
        "--early-quit-sec",
        type=float,
        default=0.25,
        help="early quitters close this long after sending; must be below the service's time "
        "to first token (mock_initial_wait_sec) so that no chunk can have been sent",
    )
    group.add_argument("--answer-tokens", type=int, default=16, help="chatters' max_new_tokens")
    group.add_argument(
        "--long-answer-tokens",
        type=int,
        default=2000,
        help="mid-stream quitters' max_new_tokens: so long that the service cannot finish the "
        "answer before their close reaches it, however far the client lags (echo mode answers "
        "with the prompt: up to 300 words)",
    )
    group.add_argument("--turns", type=int, default=4, help="chat turns before clear_context")
    group.add_argument(
        "--too-long-words", type=int, default=3000, help="words of the prompt_too_long probe"
    )
    group.add_argument("--request-timeout", type=float, default=60.0, help="client read timeout")
    group.add_argument("--quiesce-timeout", type=float, default=30.0, help="wait at test stop")
    group.add_argument(
        "--fresh-ttfb-max", type=float, default=5.0, help="fresh request's first-chunk bound"
    )
    group.add_argument(
        "--fault-at",
        type=float,
        default=0.0,
        help="inject the fault (--fault-kind) this many seconds after the start (0: never)",
    )
    group.add_argument(
        "--fault-kind",
        choices=FAULT_KINDS,
        default="replica",
        help="replica: kill a model replica; state-actor: kill the shared-state actor "
        "(session_store=ray); redis-restart / redis-kill: SIGTERM / SIGKILL the Redis of "
        "session_store=redis and start it again after --fault-down-sec; scale: change the "
        "model replica count through the Serve config (--fault-scale-replicas), as a "
        "`kubectl scale` does",
    )
    group.add_argument(
        "--fault-scale-replicas",
        default="1,3",
        help="scale: the model replica counts to go through, in order (each settles, drained)",
    )
    group.add_argument(
        "--fault-scale-hold-sec", type=float, default=3.0, help="scale: how long each count holds"
    )
    group.add_argument(
        "--fault-ray-address", default="", help="GCS address (ip:port) of the service's Ray cluster"
    )
    group.add_argument(
        "--fault-redis-dir", default="", help="redis-*: the Redis directory (redis.conf, redis.pid)"
    )
    group.add_argument(
        "--fault-down-sec", type=float, default=3.0, help="redis-*: how long Redis stays down"
    )
    group.add_argument(
        "--fault-allow-state-loss",
        action="store_true",
        help="state-actor: a restart that comes back empty is expected (requests sent before "
        "it may then lack their entry); by default it fails the run",
    )
    group.add_argument(
        "--fault-app", default="", help="Serve application of the deployment (default: any)"
    )
    group.add_argument("--fault-deployment", default="ChatModel", help="deployment to kill")
    group.add_argument(
        "--accounting-report", default="", help="also write the accounting report as JSON here"
    )


@dataclass(frozen=True)
class Options:
    """The custom options with their defaults (also when Locust runs without a parser)."""

    chatter_weight: int = 6
    early_quitter_weight: int = 3
    mid_stream_quitter_weight: int = 3
    bad_input_weight: int = 2
    openai_weight: int = 2
    failing_prompt_weight: int = 0
    fail_marker: str = ""
    early_quit_sec: float = 0.25
    answer_tokens: int = 16
    long_answer_tokens: int = 2000
    turns: int = 4
    too_long_words: int = 3000
    request_timeout: float = 60.0
    quiesce_timeout: float = 30.0
    fresh_ttfb_max: float = 5.0
    fault_at: float = 0.0
    fault_kind: str = "replica"
    fault_ray_address: str = ""
    fault_redis_dir: str = ""
    fault_down_sec: float = 3.0
    fault_scale_replicas: str = "1,3"
    fault_scale_hold_sec: float = 3.0
    fault_allow_state_loss: bool = False
    fault_app: str = ""
    fault_deployment: str = "ChatModel"
    accounting_report: str = ""

    @classmethod
    def from_environment(cls, environment: Environment) -> Options:
        parsed = environment.parsed_options
        return cls(
            **{k: getattr(parsed, k) for k in cls.__dataclass_fields__ if hasattr(parsed, k)}
        )


# --------------------------------------------------------------------------- run state
@dataclass
class FaultResult:
    attempted: bool = False
    kind: str = ""
    killed: str = ""
    recovered: bool = False
    detail: str = ""
    started_at: float = 0.0  # wall clock: the injection began
    up_at: float = 0.0  # wall clock: the fault is over (0 while it lasts)
    state_lost: bool = False  # the state holder restarted empty (state-actor)
    first_id_after: int = -1  # request numbers from here on were sent after the fault


@dataclass
class RunState:
    """Everything the users observed in this run (reset at each test start)."""

    options: Options = field(default_factory=Options)
    prefix: str = ""
    records: list[ClientRecord] = field(default_factory=list)
    totals_before: dict[str, Any] = field(default_factory=dict)
    quitters_in_flight: int = 0
    quiet: bool = False  # quitters pause while the fault injector works
    fault: FaultResult = field(default_factory=FaultResult)
    warnings: list[str] = field(default_factory=list)
    unsupported: str = ""
    fault_greenlet: gevent.Greenlet | None = None
    report: AccountingReport | None = None
    next_number: int = 0

    def reset(self, options: Options) -> None:
        """Forget the previous run (the web UI may start several in one process)."""
        self.__init__(options=options)  # type: ignore[misc]
        self.prefix = f"lt{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}"

    def new_id(self, kind: str) -> str:
        number, self.next_number = self.next_number, self.next_number + 1
        return f"{self.prefix}-{kind}-{number}"

    def record(self, request_id: str, behaviour: str, *accepts: str, violation: str = "") -> None:
        self.records.append(ClientRecord(request_id, behaviour, tuple(accepts), violation))

    @property
    def errors_expected(self) -> bool:
        """Engine errors (cut streams, 500s) are part of the scenario only when a model replica
        is killed. A store fault must show as 503 store_unavailable, never as a 500."""
        return self.options.fault_at > 0 and self.options.fault_kind == "replica"

    @property
    def store_fault(self) -> bool:
        """The state store goes away mid-run: 503 store_unavailable while it is down, and 409
        turn_in_progress while a turn's release waits for the store (retried in the background)."""
        return self.options.fault_at > 0 and self.options.fault_kind in STORE_FAULTS

    def overlaps_store_fault(self, started_at: float) -> bool:
        """A request sent at `started_at` (wall clock) and answered now met the store fault: the
        service may have refused it without being able to record the refusal."""
        if not self.store_fault or not self.fault.started_at:
            return False
        over = self.fault.up_at or float("inf")
        return started_at <= over + 1.0 and time.time() >= self.fault.started_at

    def refusal_codes(self, *codes: str) -> tuple[str, ...]:
        """The error codes a behaviour may meet: its own, and those a store fault brings."""
        if not self.store_fault:
            return codes
        extra = (STORE_UNAVAILABLE, TURN_IN_PROGRESS)
        if self.options.fault_allow_state_loss:  # the history may be gone
            extra += (NOTHING_TO_REGENERATE,)
        return (*codes, *extra)


RUN = RunState()
OpenAIUser.state = RUN


def _admin() -> dict[str, str]:
    """The admin bearer header for /outcomes, /outcomes/ledger and /load, if a token is set."""
    token = os.environ.get("CHATSTREAM_ADMIN_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", f"http_{response.status_code}"))
    except ValueError:
        return f"http_{response.status_code}"


def _prompt(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


# --------------------------------------------------------------------------- users
class ChatStreamUser(HttpUser):
    abstract = True
    behaviour = "?"

    def post_chat(self, body: Any, request_id: str, name: str) -> Any:
        """POST /chat_stream, streamed, with Locust's catch_response context manager."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            "/chat_stream",
            data=data,
            headers={REQUEST_ID_HEADER: request_id, "Content-Type": "application/json"},
            stream=True,
            catch_response=True,
            name=name,
            timeout=(5.0, RUN.options.request_timeout),
        )

    def refused(self, response: Any, request_id: str, *allowed: str) -> None:
        """Record a non-200 answer; `allowed` are the error codes this behaviour expects."""
        allowed = RUN.refusal_codes(*allowed)
        started_at = response.request_meta.get("start_time", time.time())
        # A refusal while the store was down may not have been recorded by the server.
        unrecorded = (ABSENT,) if RUN.overlaps_store_fault(started_at) else ()
        if response.status_code == 0:  # no HTTP answer: refused, cut, or we timed out waiting
            RUN.record(
                request_id,
                self.behaviour,
                ABSENT,
                UNKNOWN_ERROR,
                BEFORE_STREAMING,
                violation="" if RUN.errors_expected else f"no answer: {response.error}",
            )
            response.failure(f"no answer: {response.error}")
            return
        code = _error_code(response)
        if response.status_code == 503 and code == STORE_UNAVAILABLE:
            # Refused before admission: no slot, no callback. The server records the refusal
            # only if the store came back in time to take it.
            violation = "" if code in allowed else "503 store_unavailable"
            RUN.record(request_id, self.behaviour, rejected(code), ABSENT, violation=violation)
            response.failure("503 store_unavailable (expected while the store is down)")
            return
        if response.status_code == 500 and code == UNKNOWN_ERROR:
            # admitted, failed before its first chunk
            ok = RUN.errors_expected or UNKNOWN_ERROR in allowed
            RUN.record(
                request_id, self.behaviour, UNKNOWN_ERROR, violation="" if ok else "HTTP 500"
            )
            response.failure("500 unknown_error_occurred")
            return
        if response.status_code >= 500:  # not ours: a proxy error; the ingress never saw it
            RUN.record(
                request_id,
                self.behaviour,
                ABSENT,
                violation="" if RUN.errors_expected else f"HTTP {response.status_code}",
            )
            response.failure(f"HTTP {response.status_code}")
            return
        violation = "" if code in allowed else f"unexpected HTTP {response.status_code} {code}"
        RUN.record(request_id, self.behaviour, rejected(code), *unrecorded, violation=violation)
        if code == "too_many_requests":
            response.failure("429 too_many_requests (expected while saturated)")
        elif violation:
            response.failure(violation)
        else:
            response.success()

    def read_to_end(self, response: Any, request_id: str, expect_error: bool = False) -> bool:
        """Read a 200 stream to its end and record success, or an engine error if it was cut
        (then nothing was saved: returns False)."""
        chunks = size = 0
        started = time.perf_counter()
        try:
            for chunk in response.iter_content(chunk_size=None):
                chunks += 1
                size += len(chunk)
        except requests.RequestException as exc:
            ok = expect_error or RUN.errors_expected
            RUN.record(
                request_id,
                self.behaviour,
                UNKNOWN_ERROR,
                violation="" if ok else f"stream cut after {chunks} chunks",
            )
            if expect_error:
                response.success()
            else:
                response.failure(f"stream cut after {chunks} chunks: {type(exc).__name__}")
            return False
        finally:
            response.request_meta["response_time"] += (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = size
        if expect_error:
            RUN.record(
                request_id, self.behaviour, SUCCESS, violation="expected an engine error, got 200"
            )
            response.failure("expected an engine error")
        else:
            RUN.record(request_id, self.behaviour, SUCCESS)
            response.success()
        return True


class ChatUser(ChatStreamUser):
    """Holds multi-turn conversations and reads every answer to the end."""

    behaviour = "chatter"
    weight = 6
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.turns = 0
        self.has_answer = False

    def turn(self, body: dict[str, Any], name: str) -> None:
        request_id = RUN.new_id("chat")
        with self.post_chat(body, request_id, name) as response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests")
                return
            if self.read_to_end(response, request_id):  # a cut answer is not in the history
                self.turns += 1
                self.has_answer = True

    @task(6)
    def chat(self) -> None:
        if self.turns >= RUN.options.turns:
            self.client.post("/clear_context", name="/clear_context")
            self.turns, self.has_answer = 0, False
        body = {
            "user_input": _prompt(random.randint(3, 12)),
            "max_new_tokens": RUN.options.answer_tokens,
        }
        self.turn(body, "chat turn")

    @task(1)
    def regenerate(self) -> None:
        if not self.has_answer:
            return self.chat()
        self.turn({"regenerate": True, "max_new_tokens": RUN.options.answer_tokens}, "regenerate")


class EarlyQuitterUser(ChatStreamUser):
    """Sends a turn and closes the connection before the first chunk can exist."""

    behaviour = "early quitter"
    weight = 3
    wait_time = between(0.2, 1.0)

    @task
    def quit_before_first_chunk(self) -> None:
        if RUN.quiet:
            return
        request_id = RUN.new_id("early")
        body = {"user_input": _prompt(5), "max_new_tokens": RUN.options.answer_tokens}
        # A new session each time: the server releases a session's turn once it has seen the
        # client leave, which on a loaded machine can come after this client's next request
        # (then rightly a 409 turn_in_progress, which would make this user's tally ambiguous).
        self.client.cookies.clear()
        deadline = gevent.Timeout(RUN.options.early_quit_sec)
        RUN.quitters_in_flight += 1
        started = time.perf_counter()
        deadline.start()
        try:
            response = self.post_chat(body, request_id, "early quit")
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            # urllib3 closes the connection when a request is interrupted: the service sees
            # the client leave while its request waits for a slot (or its first token). Two
            # other endings are consistent with what this client saw (nothing): the proxy
            # dropped the request before the ingress got it (no entry), or the service refused
            # it with a 429 that was still on its way (busy machine).
            RUN.record(
                request_id,
                self.behaviour,
                BEFORE_STREAMING,
                ABSENT,
                *(rejected(code) for code in RUN.refusal_codes("too_many_requests")),
            )
            self.environment.events.request.fire(
                request_type="POST",
                name="early quit",
                response_time=(time.perf_counter() - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
            return
        finally:
            deadline.close()
            RUN.quitters_in_flight -= 1
        with response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests")
                return
            # The first chunk came before our deadline: the scenario is not saturating enough
            # or --early-quit-sec is above the service's time to first token. Still close now.
            response.close()
            RUN.record(request_id, self.behaviour, WHILE_STREAMING, SUCCESS, BEFORE_STREAMING)
            RUN.warnings.append(f"{request_id}: first chunk arrived before --early-quit-sec")
            response.success()


class MidStreamQuitterUser(ChatStreamUser):
    """Asks for a long answer, reads 1-3 chunks, closes the connection."""

    behaviour = "mid-stream quitter"
    weight = 3
    wait_time = between(0.5, 1.5)

    @task
    def quit_while_streaming(self) -> None:
        if RUN.quiet:
            return
        request_id = RUN.new_id("mid")
        tokens = RUN.options.long_answer_tokens
        body = {"user_input": _prompt(min(tokens, 300)), "max_new_tokens": tokens}
        # A new session each time: a growing history would shrink the room left for the answer
        # in the context (the service clamps max_new_tokens), and a short answer is ambiguous.
        self.client.cookies.clear()
        want = random.randint(1, 3)
        RUN.quitters_in_flight += 1
        try:
            with self.post_chat(body, request_id, "quit mid-stream") as response:
                if response.status_code != 200:
                    self.refused(response, request_id, "too_many_requests")
                    return
                got = 0
                try:
                    for chunk in response.iter_content(chunk_size=None):
                        got += 1 if chunk else 0
                        if got >= want:
                            break
                    else:  # the whole answer was shorter than `want` chunks
                        RUN.record(request_id, self.behaviour, SUCCESS)
                        response.success()
                        return
                except requests.RequestException:
                    ok = RUN.errors_expected
                    RUN.record(
                        request_id,
                        self.behaviour,
                        UNKNOWN_ERROR,
                        violation="" if ok else f"stream cut after {got} chunks",
                    )
                    response.failure(f"stream cut after {got} chunks")
                    return
                response.close()  # closes the socket: the service sees the client leave
                RUN.record(request_id, self.behaviour, WHILE_STREAMING)
                response.success()
        finally:
            RUN.quitters_in_flight -= 1


def bad_inputs(options: Options) -> list[tuple[str, Any, str]]:
    """(case, body, expected error code). Each is refused before admission."""
    return [
        ("malformed json", b'{"user_input": "hello"', "invalid_json"),
        ("not an object", b'["hello"]', "invalid_json"),
        ("missing user_input", {"max_new_tokens": 4}, "invalid_request"),
        ("empty user_input", {"user_input": "   "}, "invalid_request"),
        ("user_input not a string", {"user_input": 42}, "invalid_request"),
        ("oversized user_input", {"user_input": "x" * 40_000}, "invalid_request"),
        ("temperature out of range", {"user_input": "hi", "temperature": 5.0}, "invalid_request"),
        ("max_new_tokens 0", {"user_input": "hi", "max_new_tokens": 0}, "invalid_request"),
        ("top_p 0", {"user_input": "hi", "top_p": 0.0}, "invalid_request"),
        ("top_k not an int", {"user_input": "hi", "top_k": "many"}, "invalid_request"),
        ("regenerate without history", {"regenerate": True}, "nothing_to_regenerate"),
        ("tiny temperature", {"user_input": "hi", "temperature": 1e-300}, "invalid_request"),
        ("deeply nested json", b"[" * 5_000 + b"]" * 5_000, "invalid_json"),
        ("body over the limit", b'{"user_input": "' + b"x" * 1_100_000 + b'"}', "body_too_large"),
        (
            "prompt over the context",
            {"user_input": " ".join(["word"] * options.too_long_words)},
            "prompt_too_long",
        ),
    ]


class BadInputUser(ChatStreamUser):
    """Sends requests the service must refuse with a 4xx before admission (it never chats, so
    its session has nothing to regenerate)."""

    behaviour = "bad input"
    weight = 2
    wait_time = between(0.5, 1.5)

    @task
    def send_bad_input(self) -> None:
        case, body, code = random.choice(bad_inputs(RUN.options))
        request_id = RUN.new_id("bad")
        with self.post_chat(body, request_id, f"bad input: {case}") as response:
            if response.status_code == 200:
                response.close()
                RUN.record(
                    request_id,
                    self.behaviour,
                    SUCCESS,
                    WHILE_STREAMING,
                    violation=f"{case}: answered 200 instead of {code}",
                )
                response.failure("bad input was admitted")
                return
            self.refused(response, request_id, code)


class FailingPromptUser(ChatStreamUser):
    """Sends a prompt containing the mock engine's fail marker: the engine raises after its
    first token, so the stream is cut and the outcome is unknown_error_occurred."""

    behaviour = "failing prompt"
    weight = 1  # set from --failing-prompt-weight at init (0 unless --fail-marker is given)
    wait_time = between(1.0, 3.0)

    @task
    def provoke_engine_error(self) -> None:
        request_id = RUN.new_id("fail")
        body = {"user_input": f"please {RUN.options.fail_marker} now", "max_new_tokens": 8}
        with self.post_chat(body, request_id, "engine failure") as response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests", UNKNOWN_ERROR)
                return
            self.read_to_end(response, request_id, expect_error=True)


# --------------------------------------------------------------------------- fault injection
def fault_command(options: Options) -> list[str]:
    """The `python -m loadtest.fault` command line of the configured fault."""
    command = [sys.executable, "-m", "loadtest.fault", "--kind", options.fault_kind]
    if options.fault_kind.startswith("redis-"):
        return command + [
            "--redis-dir",
            options.fault_redis_dir,
            "--down-sec",
            str(options.fault_down_sec),
        ]
    command += ["--address", options.fault_ray_address, "--app", options.fault_app]
    if options.fault_kind == "replica":
        command += ["--deployment", options.fault_deployment]
    if options.fault_kind == "scale":
        command += ["--deployment", options.fault_deployment]
        command += ["--replicas", options.fault_scale_replicas]
        command += ["--hold-sec", str(options.fault_scale_hold_sec)]
    return command


def inject_fault(environment: Environment) -> None:
    """Inject the fault once, `--fault-at` seconds into the run, from a separate process.

    For a replica kill, quitters pause first (and their in-flight requests finish), so that no
    quit races the kill: a stream the kill cuts ends as unknown_error_occurred on both sides,
    unambiguously. Store faults need no pause: a quit is recorded once the store is back.
    """
    options = RUN.options
    gevent.sleep(options.fault_at)
    RUN.fault.attempted = True
    RUN.fault.kind = options.fault_kind
    try:
        if options.fault_kind == "replica":
            RUN.quiet = True
            deadline = time.monotonic() + 30
            while RUN.quitters_in_flight and time.monotonic() < deadline:
                gevent.sleep(0.05)
        command = fault_command(options)
        logger.info("fault injection: %s", " ".join(command))
        RUN.fault.started_at = time.time()
        done = subprocess.run(
            command, cwd=_ROOT, capture_output=True, text=True, timeout=150, check=False
        )
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
        RUN.fault.up_at = float(result.get("up_at") or time.time())
        RUN.fault.first_id_after = RUN.next_number
        RUN.fault.killed = result.get("killed", "")
        RUN.fault.recovered = bool(result.get("recovered"))
        RUN.fault.state_lost = bool(result.get("state_lost"))
        RUN.fault.detail = result.get("detail", "") or done.stderr.strip()[-2000:]
        logger.info("fault injection result: %s", result or done.stderr[-2000:])
    except Exception as exc:  # reported as a failed check at the end
        RUN.fault.detail = f"{type(exc).__name__}: {exc}"
        RUN.fault.up_at = RUN.fault.up_at or time.time()
        logger.exception("fault injection failed")
    finally:
        RUN.quiet = False


# --------------------------------------------------------------------------- event hooks
@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    options = Options.from_environment(environment)
    RUN.options = options
    weights = {
        ChatUser: options.chatter_weight,
        EarlyQuitterUser: options.early_quitter_weight,
        MidStreamQuitterUser: options.mid_stream_quitter_weight,
        BadInputUser: options.bad_input_weight,
        OpenAIUser: options.openai_weight,
        FailingPromptUser: options.failing_prompt_weight if options.fail_marker else 0,
    }
    for user_class, weight in weights.items():
        user_class.weight = weight
    environment.user_classes = [c for c in environment.user_classes if c.weight > 0]
    if not environment.stop_timeout:
        # Users must finish the request they are in: a user killed mid-request would close its
        # connection without recording what it saw, and the accounting could not match.
        environment.stop_timeout = options.request_timeout


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    options = RUN.options
    RUN.reset(options)
    if isinstance(environment.runner, MasterRunner | WorkerRunner):
        RUN.unsupported = "distributed Locust is not supported: client records are per process"
    try:
        RUN.totals_before = requests.get(
            f"{environment.host}/outcomes", headers=_admin(), timeout=10
        ).json()
    except (requests.RequestException, ValueError) as exc:
        RUN.warnings.append(f"could not read /outcomes at the start: {exc}")
    if options.fault_at > 0:
        if options.fault_kind.startswith("redis-") and not options.fault_redis_dir:
            RUN.unsupported = f"--fault-kind {options.fault_kind} needs --fault-redis-dir"
        elif not options.fault_kind.startswith("redis-") and not options.fault_ray_address:
            RUN.unsupported = "--fault-at needs --fault-ray-address (the service's Ray cluster)"
        else:
            RUN.fault_greenlet = gevent.spawn(inject_fault, environment)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    RUN.report = final_check(environment.host or "")
    print(format_report(RUN.report), flush=True)
    print(run_summary(), flush=True)
    if RUN.options.accounting_report:
        path = Path(RUN.options.accounting_report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**report_as_dict(RUN.report), "run": run_facts()}, indent=2))


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    if RUN.report is None:  # no test ran (e.g. the web UI was closed before starting one)
        return
    # Decided by the accounting alone: the expected 429s, quits and cut streams are marked as
    # failures of their requests in Locust's statistics but are not failures of the run.
    environment.process_exit_code = 0 if RUN.report.ok else 1


# --------------------------------------------------------------------------- the final check
def wait_until_quiet(host: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until no request is queued or ongoing and the totals stopped changing; return the
    last /load and /outcomes answers (empty dicts if the service did not answer)."""
    deadline = time.monotonic() + timeout
    load: dict[str, Any] = {}
    previous: dict[str, Any] | None = None
    while True:
        try:
            load = requests.get(f"{host}/load", headers=_admin(), timeout=5).json()
            totals = requests.get(f"{host}/outcomes", headers=_admin(), timeout=5).json()
        except (requests.RequestException, ValueError):
            load, totals = {}, {}
        idle = load.get("ongoing") == 0 and load.get("queued") == 0
        if idle and totals and totals == previous:
            return load, totals
        if time.monotonic() > deadline:
            return load, totals
        previous = totals if idle else None
        time.sleep(0.5)


def fresh_request(host: str, prefix: str, max_ttfb: float) -> tuple[str, str]:
    """One new request must stream at once and be recorded as success. Returns (id, failure)."""
    request_id = f"{prefix}-fresh"
    started = time.monotonic()
    try:
        with requests.post(
            f"{host}/chat_stream",
            json={"user_input": "are you still there", "max_new_tokens": 4},
            headers={REQUEST_ID_HEADER: request_id},
            stream=True,
            timeout=(5, max_ttfb + 30),
        ) as response:
            if response.status_code != 200:
                return request_id, f"fresh request answered {response.status_code}"
            chunks = response.iter_content(chunk_size=None)
            next(chunks)
            ttfb = time.monotonic() - started
            for _ in chunks:
                pass
    except (requests.RequestException, StopIteration) as exc:
        return request_id, f"fresh request failed: {exc!r}"
    if ttfb > max_ttfb:
        return request_id, f"fresh request's first chunk took {ttfb:.2f}s (> {max_ttfb}s)"
    return request_id, ""


def request_number(request_id: str) -> int:
    return int(request_id.rpartition("-")[2])


def records_to_compare() -> list[ClientRecord]:
    """The client records; after the state holder lost its state, a request sent before the
    fault was over may have no entry (its entry was lost, or written before the loss)."""
    if not (RUN.fault.state_lost and RUN.options.fault_allow_state_loss):
        return RUN.records
    return [
        dataclasses.replace(record, accepts=(*record.accepts, ABSENT))
        if request_number(record.request_id) < RUN.fault.first_id_after
        and ABSENT not in record.accepts
        else record
        for record in RUN.records
    ]


def server_view(host: str, totals_after: dict[str, Any]) -> ServerView:
    try:
        ledger = requests.get(f"{host}/outcomes/ledger", headers=_admin(), timeout=30).json()
    except (requests.RequestException, ValueError) as exc:
        ledger = {}
        RUN.warnings.append(f"could not read the ledger: {exc}")
    # A state holder that restarted empty counts from zero again.
    before = {} if RUN.fault.state_lost else RUN.totals_before
    return server_view_from_json(ledger, before, totals_after, RUN.prefix)


def final_check(host: str) -> AccountingReport:
    options = RUN.options
    if RUN.fault_greenlet is not None:
        RUN.fault_greenlet.join(timeout=180)  # the injector waits for the recovery itself
    load, totals_after = wait_until_quiet(host, options.quiesce_timeout)
    records = records_to_compare()
    report = compare(records, server_view(host, totals_after))
    # After a store fault, bookkeeping writes that met it are retried in the background (with
    # a growing delay): give them until --quiesce-timeout to land.
    deadline = time.monotonic() + options.quiesce_timeout
    while RUN.store_fault and not report.ok and time.monotonic() < deadline:
        time.sleep(1.0)
        load, totals_after = wait_until_quiet(host, options.quiesce_timeout)
        report = compare(records, server_view(host, totals_after))
    failures = [RUN.unsupported]
    if not totals_after:
        failures.append("the service did not answer /outcomes at the end")
    if load.get("ongoing") != 0 or load.get("queued") != 0:
        failures.append(f"slots still occupied after {options.quiesce_timeout}s: /load = {load}")
    if RUN.fault.attempted and not (RUN.fault.killed and RUN.fault.recovered):
        failures.append(f"fault injection did not kill and recover: {RUN.fault.detail}")
    if options.fault_at > 0 and not RUN.fault.attempted:
        failures.append("the run ended before the fault injection (raise -t or lower --fault-at)")
    if RUN.fault.state_lost and not options.fault_allow_state_loss:
        failures.append(f"the state holder lost its state: {RUN.fault.detail}")
    # One fresh request must stream at once, be recorded, and leave the service idle again.
    fresh_id, fresh_failure = fresh_request(host, RUN.prefix, options.fresh_ttfb_max)
    failures.append(fresh_failure)
    if not fresh_failure:
        fresh_load, _ = wait_until_quiet(host, options.quiesce_timeout)
        try:
            fresh = requests.get(
                f"{host}/outcomes/ledger",
                params={"request_id": fresh_id},
                headers=_admin(),
                timeout=10,
            ).json()
        except (requests.RequestException, ValueError):
            fresh = {}
        if fresh.get("outcomes", {}).get(fresh_id) != SUCCESS:
            failures.append(f"fresh request {fresh_id} not recorded as success: {fresh}")
        if fresh_load.get("ongoing") != 0 or fresh_load.get("queued") != 0:
            failures.append(f"slot still occupied after the fresh request: {fresh_load}")
    return report.with_failures(*failures)


def run_facts() -> dict[str, Any]:
    by_behaviour: dict[str, int] = {}
    for record in RUN.records:
        by_behaviour[record.behaviour] = by_behaviour.get(record.behaviour, 0) + 1
    disconnects = sum(1 for r in RUN.records if r.accepts[0] in (BEFORE_STREAMING, WHILE_STREAMING))
    unavailable = sum(1 for r in RUN.records if r.accepts[0] == rejected(STORE_UNAVAILABLE))
    return {
        "request_id_prefix": RUN.prefix,
        "requests_by_behaviour": by_behaviour,
        "disconnect_fraction": round(disconnects / len(RUN.records), 3) if RUN.records else 0.0,
        "store_unavailable_refusals": unavailable,
        "fault": RUN.fault.__dict__,
        "warnings": RUN.warnings[:20],
    }


def run_summary() -> str:
    facts = run_facts()
    lines = [
        f"run {facts['request_id_prefix']}: requests by behaviour {facts['requests_by_behaviour']}",
        f"disconnects: {facts['disconnect_fraction']:.0%} of requests",
    ]
    if RUN.fault.attempted:
        lines.append(
            f"fault ({RUN.fault.kind}): killed {RUN.fault.killed or '-'}; recovered: "
            f"{RUN.fault.recovered}; {RUN.fault.detail[:300]}"
        )
        if RUN.fault.up_at and RUN.fault.started_at:
            lines.append(
                f"fault lasted {RUN.fault.up_at - RUN.fault.started_at:.1f}s; "
                f"{facts['store_unavailable_refusals']} requests refused 503 store_unavailable"
            )
    lines.extend(f"warning: {w}" for w in RUN.warnings[:20])
    return "\n".join(lines)
