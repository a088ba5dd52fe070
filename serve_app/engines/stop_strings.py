"""Stop strings, matched on the model side: the answer ends where one first completes.

`StopMatcher` works on text; `StopChunks` applies it to an engine's `AnswerChunk`s and keeps
each chunk's tokens with its text.
"""

from __future__ import annotations

from collections.abc import Iterable

from serve_app.model_contract import AnswerChunk


class StopMatcher:
    """Cuts streamed text at the first stop string to complete.

    `feed(text)` returns what may be sent now; a tail that could still grow into a stop string
    is held back. Once a stop string completes, `stopped` is True, the text before it is
    returned, and everything after is dropped (the caller should then cancel the generation).
    `flush()` returns the held-back tail when the answer ends without a stop. The result does
    not depend on how the text is chunked: the stop string that completes first (at the
    earliest character) wins, as if the text arrived one character at a time.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        best: tuple[int, int] | None = None  # (end, start) of the earliest completed stop
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            self.stopped, self._held = True, ""
            return buffer[: best[1]]
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def _partial_stop_length(self, buffer: str) -> int:
        """The longest tail of `buffer` that is a proper prefix of some stop string. Only
        tails starting with a stop string's first character are compared."""
        best = 0
        for stop in self.stops:
            start = max(0, len(buffer) - len(stop) + 1)
            while (start := buffer.find(stop[0], start)) >= 0 and len(buffer) - start > best:
                if stop.startswith(buffer[start:]):
                    best = len(buffer) - start
                    break
                start += 1
        return best

    def flush(self) -> str:
        """The held-back tail, at the end of an answer that met no stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @property
    def held(self) -> str:
        return self._held


class StopChunks:
    """An engine's chunks, cut at the first stop string.

    `feed(chunk)` returns the chunk to send now, or None while all of its text is held back.
    A chunk's tokens (and their log probabilities) go out with the last of its text: tokens
    never run ahead of the text.
    On a stop string the returned chunk has `finish_reason` "stop" and the answer is over
    (the caller closes the engine's stream); the tokens of the chunk in which the stop string
    begins, and of any later one, are dropped with the text, so the count is the tokens of the
    text sent, as if the engine had stopped before them. When the engine's own last chunk
    arrives, the held-back text goes out with its finish reason.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.matcher = StopMatcher(stops)
        self._received = 0  # characters of text received
        self._sent = 0  # characters of text sent (returned)
        self._waiting: list[tuple[int, AnswerChunk]] = []  # (end of its text, chunk), not sent

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, chunk: AnswerChunk) -> AnswerChunk | None:
        text = self.matcher.feed(chunk.text)
        self._received += len(chunk.text)
        self._waiting.append((self._received, chunk))
        reason = chunk.finish_reason
        if self.matcher.stopped:
            reason = "stop"
        elif reason is not None:
            text += self.matcher.flush()
        elif not text:
            return None
        self._sent += len(text)
        done = [c for end, c in self._waiting if end <= self._sent]
        self._waiting = [] if reason is not None else self._waiting[len(done) :]
        return AnswerChunk(
            text=text,
            num_tokens=sum(c.num_tokens for c in done),
            token_ids=tuple(t for c in done for t in c.token_ids),
            finish_reason=reason,
            logprobs=tuple(lp for c in done for lp in c.logprobs),
        )
