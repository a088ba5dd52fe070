"""The pure session changes (serve_app.session_state): what every store applies atomically."""

from __future__ import annotations

import copy

import pytest

from serve_app.session_state import (
    SessionChange,
    SessionLimits,
    TurnInProgress,
    UnknownMessage,
    add_feedback,
    apply_change,
    begin_turn,
    clear,
    finish_turn,
    is_established,
    new_record,
    set_params,
    trim_history,
)

LIMITS = SessionLimits(max_turns=50, max_feedback=200)
NOW = 1_000_000.0
LEASE = 60.0


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def answer(text: str, message_id: str) -> dict:
    return {"role": "assistant", "content": text, "message_id": message_id}


def apply(record, *changes: SessionChange, limits: SessionLimits = LIMITS):
    for change in changes:
        record = apply_change(record, change, limits)
    return record


def turn(record, turn_id: str, text: str, message_id: str, now: float = NOW):
    """A whole turn: take the lock, record the answer."""
    record = apply(record, begin_turn(turn_id, now, LEASE))
    return apply(
        record,
        finish_turn(
            turn_id, record["epoch"], user_message=user(text), answer=answer(text, message_id)
        ),
    )


# --------------------------------------------------------------------------- the turn lock
def test_begin_turn_creates_the_record_and_takes_the_lock():
    record = apply(None, begin_turn("t1", NOW, LEASE))
    assert record["turn"] == {"id": "t1", "until": NOW + LEASE}
    assert record["messages"] == [] and record["epoch"] == 0
    assert is_established(record)  # a turn under way: a flood of new clients cannot evict it


def test_a_second_turn_is_refused_until_the_first_finishes():
    record = apply(None, begin_turn("t1", NOW, LEASE))
    with pytest.raises(TurnInProgress):
        apply(record, begin_turn("t2", NOW + 1, LEASE))
    record = apply(record, finish_turn("t1", 0))  # released without an answer (e.g. a 429)
    assert record["turn"] is None and record["messages"] == []
    assert apply(record, begin_turn("t2", NOW + 1, LEASE))["turn"]["id"] == "t2"


def test_the_lease_lets_the_lock_go_when_its_holder_died():
    record = apply(None, begin_turn("t1", NOW, LEASE))
    with pytest.raises(TurnInProgress):
        apply(record, begin_turn("t2", NOW + LEASE - 0.001, LEASE))
    taken = apply(record, begin_turn("t2", NOW + LEASE, LEASE))
    assert taken["turn"] == {"id": "t2", "until": NOW + 2 * LEASE}
    # The dead holder's late answer neither lands nor releases the new holder's lock.
    late = apply(taken, finish_turn("t1", 0, user_message=user("q"), answer=answer("a", "m1")))
    assert late == taken


def test_a_refused_change_leaves_the_record_untouched():
    record = apply(None, begin_turn("t1", NOW, LEASE))
    before = copy.deepcopy(record)
    with pytest.raises(TurnInProgress):
        apply_change(record, begin_turn("t2", NOW, LEASE), LIMITS)
    with pytest.raises(UnknownMessage):
        apply_change(record, add_feedback("nope", {"rating": "good"}), LIMITS)
    assert record == before


def test_apply_change_never_mutates_its_argument():
    record = turn(None, "t1", "hello", "m1")
    before = copy.deepcopy(record)
    for change in (
        begin_turn("t2", NOW + 1, LEASE),
        clear(),
        set_params({"top_k": 3}),
        add_feedback("m1", {"rating": "good", "comment": ""}),
    ):
        apply_change(record, change, LIMITS)
    assert record == before


# --------------------------------------------------------------------------- finishing a turn
def test_finish_turn_records_the_user_message_and_the_answer():
    record = turn(None, "t1", "hello", "m1")
    assert record["messages"] == [user("hello"), answer("hello", "m1")]
    assert record["turn"] is None
    assert is_established(record)


def test_a_retried_finish_turn_is_a_no_op():
    record = apply(None, begin_turn("t1", NOW, LEASE))
    finish = finish_turn("t1", 0, user_message=user("q"), answer=answer("a", "m1"))
    once = apply(record, finish)
    assert apply(once, finish) == once
    assert len(once["messages"]) == 2
    # ... also after the next turn began: the retry must not release that one.
    next_turn = apply(once, begin_turn("t2", NOW + 1, LEASE))
    assert apply(next_turn, finish) == next_turn


def test_an_answer_that_lands_after_a_clear_is_not_saved():
    record = turn(None, "t1", "old", "m1")
    record = apply(record, begin_turn("t2", NOW + 1, LEASE))
    epoch = record["epoch"]
    record = apply(record, clear())  # the user cleared while t2 streamed
    assert record["epoch"] == epoch + 1
    assert record["turn"]["id"] == "t2"  # clear does not release someone else's turn
    record = apply(
        record, finish_turn("t2", epoch, user_message=user("new"), answer=answer("a", "m2"))
    )
    assert record["messages"] == []
    assert record["turn"] is None  # but the lock is released
    assert record["feedback"] == {}


def test_regenerate_replaces_the_last_answer():
    record = turn(None, "t1", "q", "m1")
    record = apply(record, begin_turn("t2", NOW + 1, LEASE))
    record = apply(record, finish_turn("t2", 0, regenerate=True, answer=answer("again", "m2")))
    assert record["messages"] == [user("q"), answer("again", "m2")]


def test_keep_messages_keeps_only_what_fitted_the_prompt():
    record = None
    for index in range(3):
        record = turn(record, f"t{index}", f"q{index}", f"m{index}")
    assert len(record["messages"]) == 6
    record = apply(record, begin_turn("t9", NOW + 9, LEASE))
    # The prompt held the last turn and the new user message: 3 messages.
    record = apply(
        record,
        finish_turn("t9", 0, user_message=user("q9"), answer=answer("a9", "m9"), keep_messages=3),
    )
    assert record["messages"] == [user("q2"), answer("q2", "m2"), user("q9"), answer("a9", "m9")]


def test_history_is_bounded_by_max_turns():
    limits = SessionLimits(max_turns=2, max_feedback=10)
    record = None
    for index in range(5):
        record = apply(record, begin_turn(f"t{index}", NOW + index, LEASE), limits=limits)
        record = apply(
            record,
            finish_turn(
                f"t{index}", 0, user_message=user(f"q{index}"), answer=answer("a", f"m{index}")
            ),
            limits=limits,
        )
    assert [m["content"] for m in record["messages"] if m["role"] == "user"] == ["q3", "q4"]


def test_trim_history_keeps_the_newest_user_turns():
    messages = [user("a"), answer("1", "m1"), user("b"), answer("2", "m2"), user("c")]
    assert trim_history(messages, 5) == messages
    assert trim_history(messages, 2) == messages[2:]
    assert trim_history(messages, 1) == [user("c")]


# --------------------------------------------------------------------------- feedback and params
def test_feedback_on_an_answer_is_kept_and_replaced_by_a_later_one():
    record = turn(None, "t1", "q", "m1")
    record = apply(record, add_feedback("m1", {"rating": "good", "comment": ""}))
    record = apply(record, add_feedback("m1", {"rating": "bad", "comment": "changed my mind"}))
    assert record["feedback"] == {"m1": {"rating": "bad", "comment": "changed my mind"}}


def test_feedback_for_an_unknown_message_id_is_refused():
    record = turn(None, "t1", "q", "m1")
    with pytest.raises(UnknownMessage):
        apply(record, add_feedback("m-other", {"rating": "good"}))
    with pytest.raises(UnknownMessage):
        apply(record, add_feedback("t1", {"rating": "good"}))  # a turn id is no message id
    with pytest.raises(UnknownMessage):
        apply(None, add_feedback("m1", {"rating": "good"}))


def test_feedback_is_bounded_and_the_oldest_go_first():
    limits = SessionLimits(max_turns=50, max_feedback=3)
    record = None
    for index in range(5):
        record = turn(record, f"t{index}", f"q{index}", f"m{index}")
    for index in range(5):
        record = apply(record, add_feedback(f"m{index}", {"rating": "good"}), limits=limits)
    assert list(record["feedback"]) == ["m2", "m3", "m4"]
    # Rating an old answer again makes it the newest entry.
    record = apply(record, add_feedback("m2", {"rating": "bad"}), limits=limits)
    assert list(record["feedback"]) == ["m3", "m4", "m2"]


def test_clear_drops_history_and_feedback_but_keeps_params():
    record = turn(None, "t1", "q", "m1")
    record = apply(record, set_params({"top_k": 5}), add_feedback("m1", {"rating": "good"}))
    record = apply(record, clear())
    assert record["messages"] == [] and record["feedback"] == {}
    assert record["params"] == {"top_k": 5}


def test_set_params_merges_into_the_stored_params():
    record = apply(None, set_params({"temperature": 0.1, "top_k": 5}))
    record = apply(record, set_params({"top_k": 7, "max_new_tokens": 3}))
    assert record["params"] == {"temperature": 0.1, "top_k": 7, "max_new_tokens": 3}
    assert not is_established(record)  # params alone do not make a conversation


def test_touch_changes_nothing_and_unknown_changes_are_refused():
    record = turn(None, "t1", "q", "m1")
    assert apply(record, SessionChange("touch")) == record
    with pytest.raises(ValueError, match="unknown session change"):
        apply(record, SessionChange("rewrite_everything"))


def test_a_record_from_before_epochs_and_turns_is_upgraded():
    old = {"messages": [user("q"), answer("a", "m1")], "params": {}, "feedback": {}}
    record = apply(old, begin_turn("t1", NOW, LEASE))
    assert record["epoch"] == 0 and record["turn"]["id"] == "t1"
    assert new_record()["turn"] is None
