"""The accounting check fails when the server's ledger is wrong, and only then."""

from __future__ import annotations

import pytest

from loadtest.accounting import (
    ABSENT,
    BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    WHILE_STREAMING,
    ClientRecord,
    ServerView,
    compare,
    counter_delta,
    format_report,
    rejected,
    report_as_dict,
    server_view_from_json,
)

CLIENT = [
    ClientRecord("lt-1", "chatter", (SUCCESS,)),
    ClientRecord("lt-2", "chatter", (SUCCESS,)),
    ClientRecord("lt-3", "mid-stream quitter", (WHILE_STREAMING,)),
    ClientRecord("lt-4", "early quitter", (BEFORE_STREAMING, ABSENT)),
    ClientRecord("lt-5", "failer", (UNKNOWN_ERROR,)),
    ClientRecord("lt-6", "chatter", (rejected("too_many_requests"),)),
    ClientRecord("lt-7", "bad input", (rejected("invalid_json"),)),
]
LEDGER = {
    "lt-1": SUCCESS,
    "lt-2": SUCCESS,
    "lt-3": WHILE_STREAMING,
    "lt-4": BEFORE_STREAMING,
    "lt-5": UNKNOWN_ERROR,
}
REJECTIONS = {"lt-6": "too_many_requests", "lt-7": "invalid_json"}


def server_view(
    outcomes: dict[str, str], rejections: dict[str, str], extra_totals: dict[str, int] | None = None
) -> ServerView:
    """A server whose totals are consistent with its ledger (plus `extra_totals`), built from the
    same JSON shapes the service answers, with totals that did not start at zero."""
    before = {"outcomes": {SUCCESS: 7, UNKNOWN_ERROR: 1}, "rejections": {"invalid_json": 2}}
    after_outcomes = dict(before["outcomes"])
    for outcome in outcomes.values():
        after_outcomes[outcome] = after_outcomes.get(outcome, 0) + 1
    for outcome, n in (extra_totals or {}).items():
        after_outcomes[outcome] = after_outcomes.get(outcome, 0) + n
    after_rejections = dict(before["rejections"])
    for code in rejections.values():
        after_rejections[code] = after_rejections.get(code, 0) + 1
    ledger = {
        "outcomes": {**outcomes, "other-run-1": SUCCESS},  # not this run's: ignored
        "rejections": rejections,
    }
    after = {"outcomes": after_outcomes, "rejections": after_rejections}
    return server_view_from_json(ledger, before, after, request_id_prefix="lt-")


def test_equal_views_pass() -> None:
    report = compare(CLIENT, server_view(LEDGER, REJECTIONS))
    assert report.ok, format_report(report)
    assert report.differences == ()
    counts = {row.key: row.client for row in report.rows}
    assert counts[SUCCESS] == 2
    assert counts[rejected("too_many_requests")] == 1
    assert "ACCOUNTING OK" in format_report(report)


def test_early_quit_the_service_never_saw_is_allowed() -> None:
    outcomes = {k: v for k, v in LEDGER.items() if k != "lt-4"}
    report = compare(CLIENT, server_view(outcomes, REJECTIONS))
    assert report.ok, format_report(report)
    assert report.not_admitted == 1


def test_dropped_outcome_fails() -> None:
    outcomes = {k: v for k, v in LEDGER.items() if k != "lt-3"}
    report = compare(CLIENT, server_view(outcomes, REJECTIONS))
    assert not report.ok
    problems = {(d.request_id, d.problem) for d in report.differences}
    assert ("lt-3", "missing on the server") in problems
    assert "ACCOUNTING FAILED" in format_report(report)


def test_dropped_outcome_kept_in_totals_only_still_fails() -> None:
    outcomes = {k: v for k, v in LEDGER.items() if k != "lt-1"}
    report = compare(CLIENT, server_view(outcomes, REJECTIONS, extra_totals={SUCCESS: 1}))
    assert not report.ok
    assert any(d.request_id == "lt-1" for d in report.differences)


def test_doubled_outcome_fails() -> None:
    # The ledger keeps one entry per id; a second callback for lt-1 shows in the totals.
    report = compare(CLIENT, server_view(LEDGER, REJECTIONS, extra_totals={SUCCESS: 1}))
    assert not report.ok
    row = next(r for r in report.rows if r.key == SUCCESS)
    assert (row.client, row.server_ledger, row.server_totals) == (2, 2, 3)


def test_outcome_and_rejection_for_one_id_fails() -> None:
    report = compare(CLIENT, server_view(LEDGER, {**REJECTIONS, "lt-2": "too_many_requests"}))
    assert not report.ok
    assert any(d.request_id == "lt-2" and "2 times" in d.problem for d in report.differences)


@pytest.mark.parametrize(
    ("request_id", "wrong"),
    [
        ("lt-1", WHILE_STREAMING),
        ("lt-3", SUCCESS),
        ("lt-4", WHILE_STREAMING),
        ("lt-5", SUCCESS),
        ("lt-3", UNKNOWN_ERROR),
    ],
)
def test_mislabelled_outcome_fails(request_id: str, wrong: str) -> None:
    report = compare(CLIENT, server_view({**LEDGER, request_id: wrong}, REJECTIONS))
    assert not report.ok
    assert any(
        d.request_id == request_id and d.problem == "mislabelled" for d in report.differences
    )


def test_mislabelled_rejection_fails() -> None:
    report = compare(CLIENT, server_view(LEDGER, {**REJECTIONS, "lt-7": "invalid_request"}))
    assert not report.ok


def test_outcome_for_an_id_no_client_sent_fails() -> None:
    report = compare(CLIENT, server_view({**LEDGER, "lt-99": SUCCESS}, REJECTIONS))
    assert not report.ok
    assert any(d.problem == "no client sent this id" for d in report.differences)


def test_client_side_violation_fails_even_when_counts_agree() -> None:
    records = [*CLIENT[:-1], ClientRecord("lt-7", "bad input", (SUCCESS,), "bad input got 200")]
    outcomes = {**LEDGER, "lt-7": SUCCESS}
    rejections = {k: v for k, v in REJECTIONS.items() if k != "lt-7"}
    report = compare(records, server_view(outcomes, rejections))
    assert not report.ok
    assert [d.problem for d in report.differences] == ["bad input got 200"]


def test_extra_failures_fail_the_report() -> None:
    report = compare(CLIENT, server_view(LEDGER, REJECTIONS)).with_failures("1 slot still busy")
    assert not report.ok
    assert "FAILED CHECK: 1 slot still busy" in format_report(report)


def test_counter_delta() -> None:
    assert counter_delta({"a": 1, "b": 2}, {"b": 5, "c": 1}) == {"a": -1, "b": 3, "c": 1}


def test_refusals_while_the_store_was_down_are_counted_by_the_clients() -> None:
    """A 503 store_unavailable may have been recorded (the store came back in time) or not;
    both are consistent, and the clients' count of 503s includes both."""
    unavailable = rejected("store_unavailable")
    records = [
        *CLIENT,
        ClientRecord("lt-8", "chatter", (unavailable, ABSENT)),
        ClientRecord("lt-9", "chatter", (unavailable, ABSENT)),
        ClientRecord("lt-10", "bad input", (rejected("invalid_json"), ABSENT)),
    ]
    rejections = {**REJECTIONS, "lt-9": "store_unavailable"}
    report = compare(records, server_view(LEDGER, rejections))
    assert report.ok, format_report(report)
    assert dict(report.unrecorded) == {unavailable: 1, rejected("invalid_json"): 1}
    assert report.seen_by_clients(unavailable) == 2
    text = format_report(report)
    assert "503 store_unavailable seen by clients: 2 (1 refused while the store" in text
    assert report_as_dict(report)["store_unavailable_seen_by_clients"] == 2


def test_a_503_the_client_did_not_allow_for_fails() -> None:
    records = [*CLIENT, ClientRecord("lt-8", "chatter", (rejected("too_many_requests"),))]
    report = compare(records, server_view(LEDGER, {**REJECTIONS, "lt-8": "store_unavailable"}))
    assert not report.ok
    assert any(d.request_id == "lt-8" and d.problem == "mislabelled" for d in report.differences)


# A quitter's close may race the answer: the client cannot know which outcome the server
# records, so it accepts what it saw and every later one (loadtest/quits.py).
RACED = [
    ClientRecord("lt-11", "mid-stream quitter", (WHILE_STREAMING, SUCCESS)),
    ClientRecord("lt-12", "mid-stream quitter", (WHILE_STREAMING, SUCCESS)),
    ClientRecord(
        "lt-13",
        "early quitter",
        (BEFORE_STREAMING, ABSENT, rejected("too_many_requests"), WHILE_STREAMING, SUCCESS),
    ),
    ClientRecord("lt-14", "openai", (SUCCESS, WHILE_STREAMING)),  # finish_reason, no [DONE]
]


def test_an_ambiguous_close_accepts_either_outcome_and_has_its_own_row() -> None:
    """The whole answer was sent before the close arrived: the server recorded success for a
    client that closed. That is no mismatch, and the table says how many were ambiguous."""
    outcomes = {**LEDGER, "lt-11": SUCCESS, "lt-12": WHILE_STREAMING, "lt-13": SUCCESS}
    outcomes["lt-14"] = WHILE_STREAMING
    report = compare([*CLIENT, *RACED], server_view(outcomes, REJECTIONS))
    assert report.ok, format_report(report)
    counts = {row.key: (row.client, row.server_ledger, row.server_totals) for row in report.rows}
    assert counts[SUCCESS] == (4, 4, 4)  # lt-1, lt-2, lt-11, lt-13
    assert counts[WHILE_STREAMING] == (3, 3, 3)  # lt-3, lt-12, lt-14
    assert dict(report.ambiguous) == {SUCCESS: 2, WHILE_STREAMING: 2}
    assert report.ambiguous_mismatched == 0
    text = format_report(report)
    assert "ambiguous (either accepted)" in text
    assert "the server recorded: client_disconnected_while_streaming 2, success 2" in text
    assert report_as_dict(report)["ambiguous"] == {SUCCESS: 2, WHILE_STREAMING: 2}


def test_an_early_quit_that_never_reached_the_ingress_is_ambiguous_without_entry() -> None:
    report = compare([*CLIENT, RACED[2]], server_view(LEDGER, REJECTIONS))
    assert report.ok, format_report(report)
    assert dict(report.ambiguous) == {"no entry": 1}


@pytest.mark.parametrize(
    ("request_id", "wrong"),
    [
        ("lt-11", BEFORE_STREAMING),  # it read chunks: the server sent some
        ("lt-11", UNKNOWN_ERROR),  # no error was provoked
        ("lt-14", BEFORE_STREAMING),
        ("lt-13", UNKNOWN_ERROR),
    ],
)
def test_an_ambiguous_close_still_fails_on_an_outcome_it_cannot_be(
    request_id: str, wrong: str
) -> None:
    outcomes = {**LEDGER, "lt-11": SUCCESS, "lt-12": WHILE_STREAMING, "lt-13": SUCCESS}
    outcomes |= {"lt-14": SUCCESS, request_id: wrong}
    report = compare([*CLIENT, *RACED], server_view(outcomes, REJECTIONS))
    assert not report.ok
    problems = {(d.request_id, d.problem) for d in report.differences}
    assert (request_id, "mislabelled") in problems
    assert report.ambiguous_mismatched == 1
    assert "MISMATCH" in format_report(report)


def test_an_ambiguous_close_must_still_be_recorded_once() -> None:
    outcomes = {**LEDGER, "lt-12": WHILE_STREAMING, "lt-13": SUCCESS, "lt-14": SUCCESS}
    report = compare([*CLIENT, *RACED], server_view(outcomes, REJECTIONS))  # lt-11 missing
    assert any(d.request_id == "lt-11" and "missing" in d.problem for d in report.differences)
    doubled = compare(
        [*CLIENT, *RACED],
        server_view({**outcomes, "lt-11": SUCCESS}, REJECTIONS, extra_totals={SUCCESS: 1}),
    )
    assert not doubled.ok


def test_only_records_with_several_outcomes_are_ambiguous() -> None:
    assert not CLIENT[3].ambiguous  # early quit: before streaming, or no entry
    assert not ClientRecord("x", "b", (rejected("invalid_json"), ABSENT)).ambiguous
    assert all(record.ambiguous for record in RACED)
