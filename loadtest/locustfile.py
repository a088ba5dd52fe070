"""ChatStream load test: client behaviours whose outcomes are known, and a final check that the
server's outcome accounting matches what the clients saw, request id by request id.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 14 -r 7 -t 45s

Where things are (each file named for its job):
- loadtest/chat_stream_users.py: the users of /chat_stream, one class per behaviour
  (ChatUser, EarlyQuitterUser, MidStreamQuitterUser, BadInputUser, FailingPromptUser);
- loadtest/openai_user.py: OpenAIUser, /v1/chat/completions streamed and not;
- loadtest/tenant_users.py: FloodUser and PoliteUser, API keys under saturation;
- loadtest/responses_user.py: ResponsesUser, /v1/responses chains kept on the server;
- loadtest/quits.py: closing early, and what a close may end as on the server;
- loadtest/options.py: the options, defined once (`python -m loadtest.options` lists them);
- loadtest/run_state.py: the run's tallies; loadtest/final_check.py: the check at test stop;
- loadtest/injection.py: the fault injection (`--fault-at S --fault-kind K`);
- loadtest/accounting.py: the comparison itself (pure).

This file holds the event hooks: options, user weights, the start of a run, the final check
at test stop (the table; any difference makes the exit code 1). The service must serve no
other traffic during the run (totals are compared as deltas). The operator endpoints are read
with `Authorization: Bearer $CHATSTREAM_ADMIN_TOKEN` when that variable is set. Single-process
Locust only (the client records live in this process).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `locust -f` puts only loadtest/ on the path
    sys.path.insert(0, str(_ROOT))

from loadtest import injection, options  # noqa: E402
from loadtest.accounting import format_report  # noqa: E402
from loadtest.chat_stream_users import (  # noqa: E402
    BadInputUser,
    ChatUser,
    EarlyQuitterUser,
    FailingPromptUser,
    MidStreamQuitterUser,
)
from loadtest.final_check import (  # noqa: E402
    final_check,
    read_totals_before,
    run_summary,
    write_report,
)
from loadtest.openai_user import OpenAIUser  # noqa: E402
from loadtest.responses_user import ResponsesUser  # noqa: E402
from loadtest.run_state import RUN  # noqa: E402
from loadtest.tenant_tally import tenant_report  # noqa: E402
from loadtest.tenant_users import FloodUser, PoliteUser  # noqa: E402

__all__ = [
    "BadInputUser",
    "ChatUser",
    "EarlyQuitterUser",
    "FailingPromptUser",
    "FloodUser",
    "MidStreamQuitterUser",
    "OpenAIUser",
    "PoliteUser",
    "ResponsesUser",
]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    options.add_arguments(parser)


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    chosen = options.Options.from_namespace(environment.parsed_options)
    RUN.options = chosen
    weights = {
        ChatUser: chosen.chatter_weight,
        EarlyQuitterUser: chosen.early_quitter_weight,
        MidStreamQuitterUser: chosen.mid_stream_quitter_weight,
        BadInputUser: chosen.bad_input_weight,
        OpenAIUser: chosen.openai_weight,
        ResponsesUser: chosen.responses_weight,
        FailingPromptUser: chosen.failing_prompt_weight if chosen.fail_marker else 0,
        FloodUser: chosen.flood_weight,
        PoliteUser: chosen.polite_weight,
    }
    for user_class, weight in weights.items():
        user_class.weight = weight
    environment.user_classes = [c for c in environment.user_classes if c.weight > 0]
    if not environment.stop_timeout:
        # Users must finish the request they are in: a user killed mid-request would close its
        # connection without recording what it saw, and the accounting could not match.
        environment.stop_timeout = chosen.request_timeout


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    RUN.reset(RUN.options)
    if isinstance(environment.runner, MasterRunner | WorkerRunner):
        RUN.unsupported = "distributed Locust is not supported: client records are per process"
    read_totals_before(environment.host or "")
    injection.schedule()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    RUN.report = final_check(environment.host or "")
    print(format_report(RUN.report), flush=True)
    print(run_summary(), flush=True)
    tenants, _ = tenant_report()
    if tenants:
        print(tenants, flush=True)
    if RUN.options.accounting_report:
        write_report(RUN.options.accounting_report)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    if RUN.report is None:  # no test ran (e.g. the web UI was closed before starting one)
        return
    # Decided by the accounting alone: the expected 429s, quits and cut streams are marked as
    # failures of their requests in Locust's statistics but are not failures of the run.
    # A polite tenant locked out fails the run too (loadtest/tenant_users.py).
    _, tenants_ok = tenant_report()
    environment.process_exit_code = 0 if RUN.report.ok and tenants_ok else 1
