"""The final check of a run: wait until the service is quiet, compare every request id's
tally with the server's ledger and totals, check that no slot is left occupied and that one
fresh request streams at once; then the summary of the run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import requests

from loadtest.accounting import (
    ABSENT,
    BEFORE_STREAMING,
    SUCCESS,
    WHILE_STREAMING,
    AccountingReport,
    ClientRecord,
    ServerView,
    compare,
    rejected,
    report_as_dict,
    server_view_from_json,
)
from loadtest.client import REQUEST_ID_HEADER
from loadtest.openai_user import API_KEY_ENV
from loadtest.run_state import RUN, STORE_UNAVAILABLE


def admin() -> dict[str, str]:
    """The admin bearer header for /outcomes, /outcomes/ledger and /load, if a token is set."""
    token = os.environ.get("CHATSTREAM_ADMIN_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def read_totals_before(host: str) -> None:
    """The server's totals at the start of the run (the check compares their growth)."""
    try:
        RUN.totals_before = requests.get(f"{host}/outcomes", headers=admin(), timeout=10).json()
    except (requests.RequestException, ValueError) as exc:
        RUN.warnings.append(f"could not read /outcomes at the start: {exc}")


def wait_until_quiet(host: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until no request is queued or ongoing and the totals stopped changing; return the
    last /load and /outcomes answers (empty dicts if the service did not answer)."""
    deadline = time.monotonic() + timeout
    load: dict[str, Any] = {}
    previous: dict[str, Any] | None = None
    while True:
        try:
            load = requests.get(f"{host}/load", headers=admin(), timeout=5).json()
            totals = requests.get(f"{host}/outcomes", headers=admin(), timeout=5).json()
        except (requests.RequestException, ValueError):
            load, totals = {}, {}
        idle = load.get("ongoing") == 0 and load.get("queued") == 0
        if idle and totals and totals == previous:
            return load, totals
        if time.monotonic() > deadline:
            return load, totals
        previous = totals if idle else None
        time.sleep(0.5)


def api_key() -> dict[str, str]:
    """The bearer key of the load test's own checks, when the service has keys."""
    key = os.environ.get(API_KEY_ENV, "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def fresh_request(host: str, prefix: str, max_ttfb: float) -> tuple[str, str]:
    """One new request must stream at once and be recorded as success. Returns (id, failure)."""
    request_id = f"{prefix}-fresh"
    started = time.monotonic()
    try:
        with requests.post(
            f"{host}/chat_stream",
            json={"user_input": "are you still there", "max_new_tokens": 4},
            headers={REQUEST_ID_HEADER: request_id, **api_key()},
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
        ledger = requests.get(f"{host}/outcomes/ledger", headers=admin(), timeout=30).json()
    except (requests.RequestException, ValueError) as exc:
        ledger = {}
        RUN.warnings.append(f"could not read the ledger: {exc}")
    # A state holder that restarted empty counts from zero again.
    before = {} if RUN.fault.state_lost else RUN.totals_before
    return server_view_from_json(ledger, before, totals_after, RUN.prefix)


def fresh_request_failures(host: str) -> list[str]:
    """One fresh request must stream at once, be recorded, and leave the service idle again."""
    options = RUN.options
    fresh_id, fresh_failure = fresh_request(host, RUN.prefix, options.fresh_ttfb_max)
    if fresh_failure:
        return [fresh_failure]
    failures = []
    fresh_load, _ = wait_until_quiet(host, options.quiesce_timeout)
    try:
        fresh = requests.get(
            f"{host}/outcomes/ledger", params={"request_id": fresh_id}, headers=admin(), timeout=10
        ).json()
    except (requests.RequestException, ValueError):
        fresh = {}
    if fresh.get("outcomes", {}).get(fresh_id) != SUCCESS:
        failures.append(f"fresh request {fresh_id} not recorded as success: {fresh}")
    if fresh_load.get("ongoing") != 0 or fresh_load.get("queued") != 0:
        failures.append(f"slot still occupied after the fresh request: {fresh_load}")
    return failures


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
    return report.with_failures(*failures, *fresh_request_failures(host))


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


def write_report(path: str) -> None:
    """The accounting report and the run's facts as JSON."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**report_as_dict(RUN.report), "run": run_facts()}, indent=2))
