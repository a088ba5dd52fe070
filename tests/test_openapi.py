"""`/openapi.json` tells the truth: schemathesis (pinned in the test extra), with every check,
against `serve run serve_app:app engine=mock`. Bounded: a fixed seed and example count.
`schemathesis.toml` states the rules JSON Schema cannot (limits in tokens of the context)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.local_server import LocalServe

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def service():
    with LocalServe({"engine": "mock"}) as server:
        yield server


def test_every_operation_conforms_to_the_document(service):
    run = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(ROOT / "schemathesis.toml"), "run",
         f"{service.url}/openapi.json", "--max-examples", "30", "--seed", "20261204",
         "--workers", "1", "--request-timeout", "20"],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert " passed" in run.stdout
