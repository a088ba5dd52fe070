"""Session records and every change to them, as pure functions.

Each store (memory, Ray actor, Redis) applies these functions to the *current* stored record,
atomically on its side: under a lock, in the actor's single thread, or in a Redis WATCH/MULTI
transaction that is retried when the record changed meanwhile. No caller ever writes back a
record it computed from an older copy; it names a change (`SessionChange`) instead.

A record is a plain dict (it crosses Ray's object store and Redis as JSON):

    {"messages": [{"role", "content", "message_id"?}], "params": {...},
     "feedback": {message_id: {"rating", "comment"}}, "epoch": int,
     "turn": {"id": str, "until": float} | None, "owner"?: str}

`epoch` grows with every clear, so an answer that lands after a clear cannot bring the cleared
turns back. `turn` is the lock of the session's one active turn, with a lease that lets it go
if the ingress replica holding it dies. `owner`, on a Responses chain only, is the API key id
that made it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]


class TurnInProgress(Exception):
    """The session already has a turn whose answer is still streaming."""


class NotOwner(Exception):
    """The record belongs to another API key (a Responses chain: see serve_app/responses/)."""


class UnknownMessage(Exception):
    """Feedback for a message id that is not one of this session's answers."""


def new_record() -> Record:
    return {"messages": [], "params": {}, "feedback": {}, "epoch": 0, "turn": None}


def is_established(record: Record) -> bool:
    """A session with history or a turn under way: only admission to a generation makes one,
    so a flood of new clients cannot create them faster than the service admits them (see
    `SessionTable`)."""
    return bool(record["messages"]) or record.get("turn") is not None


def trim_history(messages: list[dict[str, Any]], max_turns: int) -> list[dict[str, Any]]:
    """Keep the newest `max_turns` user turns (each with the answer that follows it)."""
    user_positions = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(user_positions) <= max_turns:
        return messages
    return messages[user_positions[-max_turns] :]


@dataclass(frozen=True)
class SessionLimits:
    """Per-session growth bounds (oldest entries are dropped beyond them)."""

    max_turns: int = 50
    max_feedback: int = 200


@dataclass(frozen=True)
class SessionChange:
    """One atomic change to a session, applied by `apply_change` on the store's side."""

    kind: str  # "begin_turn" | "finish_turn" | "clear" | "set_params" | "feedback" | "touch"
    args: dict[str, Any] = field(default_factory=dict)


def begin_turn(
    turn_id: str, now: float, lease_sec: float, owner: str | None = None
) -> SessionChange:
    """Take the one active turn. With `owner` (a Responses chain's API key id), the record is
    that owner's: a new one becomes theirs, another's is refused (NotOwner)."""
    args = {"turn_id": turn_id, "until": now + lease_sec, "now": now}
    if owner is not None:
        args["owner"] = owner
    return SessionChange("begin_turn", args)


def finish_turn(
    turn_id: str,
    epoch: int,
    *,
    user_message: dict[str, Any] | list[dict[str, Any]] | None = None,
    regenerate: bool = False,
    answer: dict[str, Any] | None = None,
    keep_messages: int = 0,
) -> SessionChange:
    """Release the turn lock; with `answer`, also record the turn (unless cleared since).
    `keep_messages` > 0: keep only that many newest messages before the answer (the turns that
    fitted the model's context)."""
    return SessionChange(
        "finish_turn",
        {
            "turn_id": turn_id,
            "epoch": epoch,
            "user_message": user_message,
            "regenerate": regenerate,
            "answer": answer,
            "keep_messages": keep_messages,
        },
    )


def clear() -> SessionChange:
    return SessionChange("clear")


def set_params(params: dict[str, Any]) -> SessionChange:
    return SessionChange("set_params", {"params": params})


def add_feedback(message_id: str, entry: dict[str, str]) -> SessionChange:
    return SessionChange("feedback", {"message_id": message_id, "entry": entry})


def apply_change(record: Record | None, change: SessionChange, limits: SessionLimits) -> Record:
    """The record after `change`. Raises TurnInProgress / UnknownMessage to refuse it.

    Never mutates its argument: a refused change leaves the stored record as it was."""
    new = copy.deepcopy(record) if record is not None else new_record()
    new.setdefault("epoch", 0)
    new.setdefault("turn", None)
    args = change.args
    if change.kind == "begin_turn":
        owner = args.get("owner")
        if owner is not None and new.setdefault("owner", owner) != owner:
            raise NotOwner()
        turn = new["turn"]
        if turn is not None and turn["until"] > args["now"]:
            raise TurnInProgress()
        new["turn"] = {"id": args["turn_id"], "until": args["until"]}
    elif change.kind == "finish_turn":
        # Only the holder of the turn records it, once: a retried write changes nothing, and
        # an answer that lands after a clear (a new epoch) is not saved.
        if new["turn"] is not None and new["turn"]["id"] == args["turn_id"]:
            new["turn"] = None
            if args["answer"] is not None and new["epoch"] == args["epoch"]:
                new["messages"] = _with_answer(new["messages"], args, limits)
    elif change.kind == "clear":
        new["messages"] = []
        new["feedback"] = {}
        new["epoch"] += 1
    elif change.kind == "set_params":
        new["params"] = {**new["params"], **args["params"]}
    elif change.kind == "feedback":
        message_id = args["message_id"]
        if not any(m.get("message_id") == message_id for m in new["messages"]):
            raise UnknownMessage()
        feedback = {k: v for k, v in new["feedback"].items() if k != message_id}
        feedback[message_id] = args["entry"]
        new["feedback"] = dict(list(feedback.items())[-limits.max_feedback :])
    elif change.kind != "touch":
        raise ValueError(f"unknown session change {change.kind!r}")
    return new


def _with_answer(
    messages: list[dict[str, Any]], args: dict[str, Any], limits: SessionLimits
) -> list[dict[str, Any]]:
    """The history after a turn: the user's message (or messages: a Responses input; or, for
    regenerate, the history without its last answer), then the answer; trimmed to the newest
    `max_turns` turns."""
    added = args["user_message"]
    if args["regenerate"]:
        base = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    else:
        base = [*messages, *(added if isinstance(added, list) else [added])]
    if args.get("keep_messages"):
        base = base[-args["keep_messages"] :]
    return trim_history([*base, args["answer"]], limits.max_turns)
