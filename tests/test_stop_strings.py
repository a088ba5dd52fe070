"""Stop strings on the model side (serve_app/engines/stop_strings.py): the text matcher and its
use on an engine's chunks, which keeps every chunk's tokens with its text."""

from __future__ import annotations

import random

from serve_app.engines.stop_strings import StopChunks, StopMatcher
from serve_app.model_contract import AnswerChunk


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """What the matcher must return: text cut where a stop string first completes."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def run_matcher(chunks: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    pieces = [matcher.feed(chunk) for chunk in chunks]
    pieces.append(matcher.flush())
    return "".join(pieces), matcher.stopped, pieces


def random_chunking(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def random_case(rng: random.Random) -> tuple[str, list[str]]:
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6)))
             for _ in range(rng.randint(1, 3))]  # fmt: skip
    return text, stops


# --------------------------------------------------------------------------------- the matcher
def test_stop_matcher_holds_back_a_possible_stop():
    matcher = StopMatcher(["world"])
    assert matcher.feed("Hello wor") == "Hello " and matcher.held == "wor"
    assert matcher.feed("ld! more") == "" and matcher.stopped
    assert matcher.feed("ignored") == "" and matcher.flush() == ""

    matcher = StopMatcher(["world"])
    assert matcher.feed("Hello wor") == "Hello "
    assert matcher.feed("m") == "worm" and not matcher.stopped
    assert matcher.feed("wo") == "" and matcher.flush() == "wo"  # the answer ended: send it
    assert StopMatcher().feed("anything") == "anything"
    assert StopMatcher([""]).feed("empty stops are ignored") == "empty stops are ignored"


def test_the_stop_that_completes_first_wins():
    assert run_matcher(["abcd"], ["bcd", "abc"])[:2] == ("", True)  # "abc" ends first
    assert run_matcher(["xabcd"], ["abcd", "bc"])[:2] == ("xa", True)
    # Two stops ending at the same character: the longer one cuts more.
    assert run_matcher(["xabc"], ["bc", "abc"])[:2] == ("x", True)


def test_stop_matcher_is_independent_of_chunking():
    rng = random.Random(12)
    for _ in range(3000):
        text, stops = random_case(rng)
        chunks = random_chunking(rng, text)
        out, stopped, pieces = run_matcher(chunks, stops)
        assert (out, stopped) == reference_cut(text, stops), (text, stops, chunks)
        # Nothing that was sent can turn out to be part of a stop string later.
        sent = ""
        for piece in pieces[:-1]:
            sent += piece
            assert reference_cut(text, stops)[0].startswith(sent)


# ------------------------------------------------------------------------- chunks and tokens
def words(text: str, finish: str = "length") -> list[AnswerChunk]:
    """`text` as an engine would stream it: a chunk per character, token id = its position."""
    chunks = [AnswerChunk(c, 1, (i,)) for i, c in enumerate(text)]
    last = chunks[-1]
    chunks[-1] = AnswerChunk(last.text, last.num_tokens, last.token_ids, finish)
    return chunks


def run_chunks(chunks: list[AnswerChunk], stops: list[str]) -> list[AnswerChunk]:
    cutter = StopChunks(stops)
    out = []
    for chunk in chunks:
        sent = cutter.feed(chunk)
        if sent is not None:
            out.append(sent)
        if cutter.stopped:
            break
    return out


def test_stop_chunks_cut_the_text_and_drop_the_tokens_of_the_stop():
    out = run_chunks([AnswerChunk("alpha", 1, (1,)), AnswerChunk(" beta", 1, (2,)),
                      AnswerChunk(" gamma", 1, (3,)), AnswerChunk(" delta", 1, (4,), "length")],
                     ["gamma", "zzz"])  # fmt: skip
    assert [c.text for c in out] == ["alpha", " beta", " "]
    assert [c.finish_reason for c in out] == [None, None, "stop"]
    # The chunk in which "gamma" begins is not counted: the tokens of the text sent.
    assert sum(c.num_tokens for c in out) == 2
    assert [t for c in out for t in c.token_ids] == [1, 2]


def test_stop_chunks_hold_tokens_back_with_their_text():
    cutter = StopChunks(["world"])
    first = cutter.feed(AnswerChunk("Hello wo", 2, (1, 2)))
    # "wo" may begin the stop: the text before it goes, the chunk's tokens wait for the rest.
    assert first == AnswerChunk("Hello ", 0, ())
    assert cutter.feed(AnswerChunk("r", 1, (3,))) is None  # nothing new to send
    second = cutter.feed(AnswerChunk("m!", 1, (4,)))
    assert second == AnswerChunk("worm!", 4, (1, 2, 3, 4))
    end = cutter.feed(AnswerChunk(" wor", 1, (5,), "length"))  # the engine's last chunk
    assert end == AnswerChunk(" wor", 1, (5,), "length")  # held text goes out at the end


def test_an_engine_finish_keeps_its_reason_and_a_stop_overrides_it():
    assert run_chunks(words("abc", "stop"), ["zz"])[-1].finish_reason == "stop"
    assert run_chunks(words("abc", "length"), ["zz"])[-1].finish_reason == "length"
    assert run_chunks(words("abc", "length"), ["c"])[-1] == AnswerChunk("", 0, (), "stop")
    # A stop string at the very start: one empty last chunk.
    assert run_chunks(words("abc"), ["ab"]) == [AnswerChunk("", 0, (), "stop")]


def test_stop_chunks_match_the_reference_however_the_text_is_chunked():
    rng = random.Random(7)
    for _ in range(2000):
        text, stops = random_case(rng)
        if not text:
            continue
        pieces = random_chunking(rng, text)
        pieces = [p for p in pieces if p] or [text]
        chunks, position = [], 0
        for piece in pieces:  # one token per character, id = its position
            ids = tuple(range(position, position + len(piece)))
            chunks.append(AnswerChunk(piece, len(ids), ids))
            position += len(piece)
        last = chunks[-1]
        chunks[-1] = AnswerChunk(last.text, last.num_tokens, last.token_ids, "length")
        out = run_chunks(chunks, stops)
        expected, stopped = reference_cut(text, stops)
        assert "".join(c.text for c in out) == expected, (text, stops, pieces)
        assert out[-1].finish_reason == ("stop" if stopped else "length")
        assert all(c.finish_reason is None for c in out[:-1])
        ids = [t for c in out for t in c.token_ids]
        assert sum(c.num_tokens for c in out) == len(ids)
        # Tokens never run ahead of the text, and without a stop every token is counted.
        assert ids == list(range(len(ids))) and len(ids) <= len(expected)
        if not stopped:
            assert len(ids) == len(text)


def test_stop_chunks_keep_the_log_probabilities_of_the_tokens_they_send():
    from serve_app.model_contract import TokenLogprob

    def chunk(text: str, token: int) -> AnswerChunk:
        return AnswerChunk(text, 1, (token,), logprobs=(TokenLogprob(token, text, -0.5),))

    stops = StopChunks(["END"])
    sent = [stops.feed(chunk("Hello", 1)), stops.feed(chunk(" wor", 2))]
    sent.append(stops.feed(chunk("ld END more", 3)))
    sent = [c for c in sent if c is not None]
    assert [lp.token_id for c in sent for lp in c.logprobs] == [1, 2]
    assert [t for c in sent for t in c.token_ids] == [1, 2]
    assert sent[-1].finish_reason == "stop"
