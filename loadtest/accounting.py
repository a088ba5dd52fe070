"""The accounting check: what the load test's clients saw against what the server recorded.

Pure functions and frozen data, no I/O, so that the check itself is unit-tested (it must fail
when the server's ledger drops, doubles or mislabels an outcome, and pass when they agree).

Vocabulary. For one request id the server holds an *entry*: one of the four outcome names, or
``rejected:<error code>`` for a request refused before admission (429, 4xx). A client record
lists the entries its observation is consistent with (``accepts``); almost always exactly one.
``ABSENT`` among them means "the server may have no entry": an early quitter that closed
before it got any answer needs it, because a request the Serve proxy had not yet handed to the
ingress is dropped there and never admitted (documented Ray Serve behaviour); so does a request
refused while the state store was down (`503 store_unavailable`: the refusal could not be
written), and, after the shared-state actor lost its state, any request from before. In the
totals a record counts under the entry the server holds when it is acceptable, else under its
first; records without an entry are tallied apart, under their first entry (`unrecorded`).

A record that accepts more than one outcome is *ambiguous*: the client could not know which
the server would record (its close raced the answer, see loadtest/quits.py). The ledger entry
decides, and must be one of them; the table counts these requests in a row of their own, with
what the server recorded for them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

SUCCESS = "success"
WHILE_STREAMING = "client_disconnected_while_streaming"
BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"
OUTCOMES: tuple[str, ...] = (SUCCESS, WHILE_STREAMING, BEFORE_STREAMING, UNKNOWN_ERROR)

ABSENT = "absent"
AMBIGUOUS_ROW = "ambiguous (either accepted)"
NO_ENTRY = "no entry"
REJECTED_PREFIX = "rejected:"


def rejected(error_code: str) -> str:
    """The entry of a request refused before admission with `error_code`."""
    return f"{REJECTED_PREFIX}{error_code}"


@dataclass(frozen=True)
class ClientRecord:
    """What one client request observed.

    `accepts`: the server entries consistent with the observation, the likeliest first.
    `violation`: non-empty when the service broke the behaviour's contract as the client saw it
    (bad input answered 200, an error where none was provoked, ...); it fails the run by itself.
    """

    request_id: str
    behaviour: str
    accepts: tuple[str, ...]
    violation: str = ""

    def __post_init__(self) -> None:
        if not self.accepts:
            raise ValueError(f"{self.request_id}: a client record must accept at least one entry")

    @property
    def ambiguous(self) -> bool:
        """The client's observation is consistent with more than one outcome."""
        return sum(1 for entry in self.accepts if entry in OUTCOMES) > 1


@dataclass(frozen=True)
class ServerView:
    """The server's view of the run.

    `entries`: request id -> every entry the ledger holds for it (outcome and/or rejection).
    `outcome_totals` / `rejection_totals`: how much the server's totals grew during the run.
    """

    entries: Mapping[str, tuple[str, ...]]
    outcome_totals: Mapping[str, int]
    rejection_totals: Mapping[str, int]


@dataclass(frozen=True)
class Difference:
    request_id: str  # "" for a difference in totals
    behaviour: str
    client: str
    server: str
    problem: str


@dataclass(frozen=True)
class Row:
    """One line of the table: an outcome or a rejection code, counted three ways."""

    key: str
    client: int
    server_ledger: int
    server_totals: int

    @property
    def ok(self) -> bool:
        return self.client == self.server_ledger == self.server_totals


@dataclass(frozen=True)
class AccountingReport:
    rows: tuple[Row, ...]
    differences: tuple[Difference, ...]
    requests: int
    not_admitted: int  # requests without a server entry, as their client allows (ABSENT)
    extra_failures: tuple[str, ...] = field(default=())
    unrecorded: tuple[tuple[str, int], ...] = field(default=())  # those, by first entry
    # ambiguous records by what the server holds for them (or NO_ENTRY), and how many of
    # them the server holds something the client did not accept for
    ambiguous: tuple[tuple[str, int], ...] = field(default=())
    ambiguous_mismatched: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences and not self.extra_failures and all(r.ok for r in self.rows)

    def with_failures(self, *failures: str) -> AccountingReport:
        """The same report with further failed checks (slot leak, fresh request, ...)."""
        extra = self.extra_failures + tuple(f for f in failures if f)
        return replace(self, extra_failures=extra)

    def seen_by_clients(self, key: str) -> int:
        """How many requests the clients saw end as `key`: with a server entry or without."""
        recorded = sum(r.client for r in self.rows if r.key == key)
        return recorded + dict(self.unrecorded).get(key, 0)


def server_view_from_json(
    ledger: Mapping[str, Mapping[str, str]],
    totals_before: Mapping[str, object],
    totals_after: Mapping[str, object],
    request_id_prefix: str = "",
) -> ServerView:
    """Build a ServerView from `GET /outcomes/ledger` and two `GET /outcomes` answers.

    Only ledger ids starting with `request_id_prefix` are kept (the run's own requests).
    """
    entries: dict[str, list[str]] = {}
    for request_id, outcome in ledger.get("outcomes", {}).items():
        if request_id.startswith(request_id_prefix):
            entries.setdefault(request_id, []).append(outcome)
    for request_id, code in ledger.get("rejections", {}).items():
        if request_id.startswith(request_id_prefix):
            entries.setdefault(request_id, []).append(rejected(code))
    return ServerView(
        entries={k: tuple(v) for k, v in entries.items()},
        outcome_totals=counter_delta(
            _as_counts(totals_before.get("outcomes")), _as_counts(totals_after.get("outcomes"))
        ),
        rejection_totals=counter_delta(
            _as_counts(totals_before.get("rejections")),
            _as_counts(totals_after.get("rejections")),
        ),
    )


def _as_counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): int(v) for k, v in value.items()}


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """after - before per key (keys of both; a key missing on one side counts 0)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}


def compare(records: Iterable[ClientRecord], server: ServerView) -> AccountingReport:
    """Compare request id by request id, then per-outcome and per-rejection totals."""
    differences: list[Difference] = []
    client_counts: Counter[str] = Counter()
    unrecorded: Counter[str] = Counter()
    ambiguous: Counter[str] = Counter()
    ambiguous_mismatched = 0
    seen: set[str] = set()
    requests = not_admitted = 0

    for record in records:
        requests += 1
        if record.request_id in seen:
            differences.append(
                Difference(
                    record.request_id, record.behaviour, "", "", "the client used this id twice"
                )
            )
            continue
        seen.add(record.request_id)
        got = server.entries.get(record.request_id, ())
        expected = " | ".join(record.accepts)
        if record.violation:
            differences.append(
                Difference(
                    record.request_id, record.behaviour, expected, _show(got), record.violation
                )
            )
        resolved, problem = _resolve(record, got)
        if problem:
            shown = _show(got)
            differences.append(
                Difference(record.request_id, record.behaviour, expected, shown, problem)
            )
        if record.ambiguous:
            ambiguous[_show(got) if got else NO_ENTRY] += 1
            ambiguous_mismatched += bool(problem)
        if resolved == ABSENT:
            not_admitted += 1
            unrecorded[record.accepts[0]] += 1
        else:
            client_counts[resolved] += 1

    for request_id in sorted(set(server.entries) - seen):
        differences.append(
            Difference(
                request_id, "?", "-", _show(server.entries[request_id]), "no client sent this id"
            )
        )

    ledger_counts: Counter[str] = Counter(e for entries in server.entries.values() for e in entries)
    totals: Counter[str] = Counter(dict(server.outcome_totals))
    totals.update({rejected(code): n for code, n in server.rejection_totals.items()})

    rejection_keys = sorted(
        {k for k in (*client_counts, *ledger_counts, *totals) if k.startswith(REJECTED_PREFIX)}
    )
    other_keys = sorted(
        {k for k in (*client_counts, *ledger_counts, *totals)} - set(OUTCOMES) - set(rejection_keys)
    )
    rows = tuple(
        Row(key, client_counts[key], ledger_counts[key], totals[key])
        for key in (*OUTCOMES, *rejection_keys, *other_keys)
    )
    for row in rows:
        if not row.ok:
            differences.append(
                Difference(
                    "",
                    "totals",
                    str(row.client),
                    f"ledger {row.server_ledger}, totals {row.server_totals}",
                    f"{row.key}: counts differ",
                )
            )
    return AccountingReport(
        rows,
        tuple(differences),
        requests,
        not_admitted,
        unrecorded=tuple(sorted(unrecorded.items())),
        ambiguous=tuple(sorted(ambiguous.items())),
        ambiguous_mismatched=ambiguous_mismatched,
    )


def _resolve(record: ClientRecord, got: tuple[str, ...]) -> tuple[str, str]:
    """The entry a record counts under, and what is wrong with the server's entries ("")."""
    if len(got) > 1:
        return record.accepts[0], f"recorded {len(got)} times"
    if not got:
        if ABSENT in record.accepts:
            return ABSENT, ""
        return record.accepts[0], "missing on the server"
    if got[0] in record.accepts:
        return got[0], ""
    return record.accepts[0], "mislabelled"


def _show(entries: tuple[str, ...]) -> str:
    return " + ".join(entries) if entries else "-"


def format_report(report: AccountingReport, max_differences: int = 50) -> str:
    """The table printed at the end of a run: per outcome, client vs server, then differences."""
    width = max([len(AMBIGUOUS_ROW), *(len(r.key) for r in report.rows)])
    header = f"{'outcome / rejection':<{width}}  {'client':>8}  {'ledger':>8}  {'totals':>8}  "
    lines = [header + "check", "-" * (len(header) + 5)]
    for row in report.rows:
        mark = "ok" if row.ok else "MISMATCH"
        lines.append(
            f"{row.key:<{width}}  {row.client:>8}  {row.server_ledger:>8}  "
            f"{row.server_totals:>8}  {mark}"
        )
    if report.ambiguous:
        total = sum(n for _, n in report.ambiguous)
        matched = total - report.ambiguous_mismatched
        mark = "MISMATCH" if report.ambiguous_mismatched else "ok"
        lines.append(f"{AMBIGUOUS_ROW:<{width}}  {total:>8}  {matched:>8}  {'-':>8}  {mark}")
        recorded = ", ".join(f"{k} {n}" for k, n in report.ambiguous)
        lines.append(f"  the client could not know; the server recorded: {recorded}")
    early = dict(report.unrecorded).get(BEFORE_STREAMING, 0)
    lines.append(
        f"{report.requests} requests; {early} early quits closed before the service "
        "admitted them (no entry expected)"
    )
    others = [(k, n) for k, n in report.unrecorded if k != BEFORE_STREAMING]
    if others:
        lines.append(
            "without a server entry, as the client's observation allows (the store was down "
            "or lost its state): " + ", ".join(f"{k} {n}" for k, n in others)
        )
    unavailable = rejected("store_unavailable")
    if seen := report.seen_by_clients(unavailable):
        lines.append(
            f"503 store_unavailable seen by clients: {seen} "
            f"({dict(report.unrecorded).get(unavailable, 0)} refused while the store could not "
            "record them)"
        )
    if report.differences:
        lines.append(f"{len(report.differences)} difference(s):")
        lines.append(
            f"  {'request id':<28} {'behaviour':<18} {'client':<40} {'server':<40} problem"
        )
        for diff in report.differences[:max_differences]:
            lines.append(
                f"  {diff.request_id or '(totals)':<28} {diff.behaviour:<18} {diff.client:<40} "
                f"{diff.server:<40} {diff.problem}"
            )
        if len(report.differences) > max_differences:
            lines.append(f"  ... and {len(report.differences) - max_differences} more")
    for failure in report.extra_failures:
        lines.append(f"FAILED CHECK: {failure}")
    lines.append("ACCOUNTING OK" if report.ok else "ACCOUNTING FAILED")
    return "\n".join(lines)


def report_as_dict(report: AccountingReport) -> dict[str, object]:
    """A JSON-friendly form of the report (written next to Locust's CSV/HTML reports)."""
    return {
        "ok": report.ok,
        "requests": report.requests,
        "not_admitted": report.not_admitted,
        "unrecorded": dict(report.unrecorded),
        "store_unavailable_seen_by_clients": report.seen_by_clients(rejected("store_unavailable")),
        "ambiguous": dict(report.ambiguous),
        "ambiguous_mismatched": report.ambiguous_mismatched,
        "rows": [
            {
                "key": r.key,
                "client": r.client,
                "server_ledger": r.server_ledger,
                "server_totals": r.server_totals,
                "ok": r.ok,
            }
            for r in report.rows
        ],
        "differences": [asdict(d) for d in report.differences],
        "extra_failures": list(report.extra_failures),
    }
