"""The load test's options, defined once.

`Options` is the table: each field is one option of the locustfile (`chatter_weight` is
`--chatter-weight`), with its type, default and help. Locust's parser is built from it
(`add_arguments`), the run state reads it (`Options.from_environment`), `run_profile.py` writes
its profiles' command lines with it (`as_argv`), and the README's option table is printed by

    python -m loadtest.options
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

FAULT_KINDS = ("replica", "state-actor", "redis-restart", "redis-kill", "scale")
STORE_FAULTS = ("state-actor", "redis-restart", "redis-kill")


def option(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """One option: its default (whose type is the option's type) and its help."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Options:
    """The custom options of the locustfile with their defaults."""

    # -- users (weights: 0 leaves a user out)
    chatter_weight: int = option(6, "weight of ChatUser (multi-turn chats read to the end)")
    early_quitter_weight: int = option(3, "weight of EarlyQuitterUser")
    mid_stream_quitter_weight: int = option(3, "weight of MidStreamQuitterUser")
    bad_input_weight: int = option(2, "weight of BadInputUser")
    openai_weight: int = option(2, "weight of OpenAIUser (/v1/chat/completions)")
    responses_weight: int = option(2, "weight of ResponsesUser (/v1/responses chains)")
    failing_prompt_weight: int = option(
        0, "weight of FailingPromptUser (needs --fail-marker = the service's mock_fail_marker)"
    )
    fail_marker: str = option("", "the service's mock_fail_marker")
    flood_weight: int = option(
        0, "weight of FloodUser (sends again at once with the first `flood*` key of the keys)"
    )
    polite_weight: int = option(
        0, "weight of PoliteUser (one request at a time with the other keys; none admitted: fail)"
    )
    # -- what the users ask and how long they wait
    early_quit_sec: float = option(
        0.25, "early quitters close this long after sending (meant to be before the first chunk)"
    )
    answer_tokens: int = option(16, "chatters' max_new_tokens")
    openai_choices: int = option(
        2, "OpenAIUser's `n` in its choices task (at most the service's max_ongoing_requests)"
    )
    long_answer_tokens: int = option(
        2000, "mid-stream quitters' max_new_tokens (a long answer: they read 1-3 chunks of it)"
    )
    turns: int = option(4, "chat turns before POST /clear_context")
    too_long_words: int = option(3000, "words of the prompt_too_long probe")
    request_timeout: float = option(60.0, "client read timeout (seconds)")
    strict_quits: bool = option(
        False,
        "the service cannot end an answer before a quitter's close reaches it (first token "
        "later than --early-quit-sec, answers far longer than 1-3 chunks, as run_profile's "
        "services are): a close then counts as what the client saw, never as a later outcome",
    )
    # -- the final check
    quiesce_timeout: float = option(30.0, "wait at test stop for 0 ongoing, 0 queued (seconds)")
    fresh_ttfb_max: float = option(5.0, "the fresh request's first-chunk bound (seconds)")
    accounting_report: str = option("", "also write the accounting report as JSON here")
    # -- fault injection
    fault_at: float = option(0.0, "inject the fault this many seconds into the run (0: never)")
    fault_kind: str = option(
        "replica",
        "replica: kill a model replica; state-actor: kill the shared-state actor "
        "(session_store=ray); redis-restart / redis-kill: SIGTERM / SIGKILL the Redis of "
        "session_store=redis, start it again after --fault-down-sec; scale: change the model "
        "replica count through the Serve config (--fault-scale-replicas)",
        choices=FAULT_KINDS,
    )
    fault_scale_replicas: str = option("1,3", "scale: the model replica counts, in order")
    fault_scale_hold_sec: float = option(3.0, "scale: how long each count holds (seconds)")
    fault_ray_address: str = option("", "GCS address (ip:port) of the service's Ray cluster")
    fault_app: str = option("", "Serve application of the deployment (default: any)")
    fault_deployment: str = option("ChatModel", "the deployment to kill or scale")
    fault_redis_dir: str = option("", "redis-*: the Redis directory (redis.conf, redis.pid)")
    fault_down_sec: float = option(3.0, "redis-*: how long Redis stays down (seconds)")
    fault_allow_state_loss: bool = option(
        False,
        "state-actor: a restart that comes back empty is expected (requests sent before it "
        "may then lack their entry); by default it fails the run",
    )

    @classmethod
    def from_namespace(cls, parsed: Any) -> Options:
        """The options Locust parsed (defaults where it parsed none, e.g. without a parser)."""
        values = {f.name: getattr(parsed, f.name) for f in fields(cls) if hasattr(parsed, f.name)}
        return cls(**values)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fields() -> tuple[Field, ...]:
    return fields(Options)


def add_arguments(parser: Any) -> None:
    """Add the options to Locust's (or any argparse) parser."""
    group = parser.add_argument_group("ChatStream load test")
    for f in _fields():
        if isinstance(f.default, bool):
            group.add_argument(flag(f.name), action="store_true", help=f.metadata["help"])
            continue
        group.add_argument(
            flag(f.name),
            type=type(f.default),
            default=f.default,
            choices=f.metadata["choices"] or None,
            help=f.metadata["help"],
        )


def as_argv(values: Mapping[str, Any]) -> list[str]:
    """The command-line arguments for `values` (option name -> value; unknown names raise)."""
    Options(**values)  # a TypeError names an unknown option
    argv: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv += [flag(name)] if value else []
        else:
            argv += [flag(name), str(value)]
    return argv


def markdown_table() -> str:
    """The options as the README shows them."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in _fields():
        if isinstance(f.default, bool):
            default = "off"
        else:
            default = f"`{f.default}`" if f.default != "" else ""
        lines.append(f"| `{flag(f.name)}` | {default} | {f.metadata['help']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the load test's options as Markdown.")
    parser.parse_args()
    print(markdown_table())
