"""The records of one admitted request: the exchange and the session turn it answers.

Plain data: the admission lifecycle (serve_app/admission.py) fills an exchange in as the
answer streams and decides its one outcome; the bookkeeping (serve_app/bookkeeping.py) reads
it once that outcome is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray.serve.handle import DeploymentResponseGenerator
from starlette.requests import Request

from serve_app.access import Caller
from serve_app.model_contract import FinishReason
from serve_app.sessions import SessionView

if TYPE_CHECKING:
    from serve_app.choices import ChoiceStreams

Callback = Callable[[Request, str], Any]


@dataclass(frozen=True)
class Turn:
    """The session turn an exchange answers (the session's lock is held under `turn_id`)."""

    turn_id: str
    epoch: int
    user_message: dict[str, Any] | list[dict[str, Any]] | None  # None for regenerate
    kept_messages: int = 0  # the newest messages that fitted the prompt (older ones go)
    # Saved with the answer under "meta", with the outcome, token counts and finish reason
    # (a Responses turn keeps what its response object needs: serve_app/responses/).
    answer_meta: dict[str, Any] | None = None


@dataclass(eq=False)
class Exchange:
    """One admitted request, from its admission to its outcome."""

    request: Request
    caller: Caller
    request_id: str  # the request's key in the ledger (unique)
    record_id: str  # the server's own id: counts the outcome once, even if the write is retried
    message_id: str
    # None while it waits in the fair queue; n streams as one for OpenAI's `n` choices.
    model_stream: DeploymentResponseGenerator | ChoiceStreams | None
    callback: Callback | None
    session: SessionView | None = None  # None on stateless routes (/v1)
    turn: Turn | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    holds_slot: bool = False
    ticket: Any = None  # its place in the fair queue (serve_app/fair_queue.py)
    # From the model's stream: the prompt's tokens, the answer's tokens, why it ended.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    sent: list[str] = field(default_factory=list)  # the answer's text as the client got it
    chunks_sent: int = 0  # pieces handed to the client (0: the outcome is "before streaming")
    completed: bool = False
    finished: bool = False
    # Set once the session's turn is released (and the answer saved): a client that got the
    # whole answer then finds it in /history, and may send its next turn at once.
    turn_released: asyncio.Event = field(default_factory=asyncio.Event)
