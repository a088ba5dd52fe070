"""One status, two writers, no lost update: the reconcile handler and the RayService follower
both write the ChatStream's status. Against kmock (with real resourceVersions and the API
server's precondition check, harness._ApiServer), the harness stages the race in which the
writer that read the older RayService writes last (harness.run_status_race_scenario)."""

from __future__ import annotations

import asyncio

import pytest
from harness import StatusRaceResult, run_status_race_scenario

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def race() -> StatusRaceResult:
    return asyncio.run(run_status_race_scenario())


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_the_race_was_staged(race):
    assert race.delayed_write
    assert race.rayservice_status["activeServiceStatus"]["applicationStatuses"]


def test_the_later_rayservice_report_is_not_lost(race):
    """KubeRay reported the application RUNNING on 3 ready workers while reconcile's status
    write (computed before that report) was on its way: the ChatStream ends up saying so."""
    assert race.status["observedGeneration"] == 2
    assert _condition(race.status, "Ready").get("status") == "True", race.status
    assert race.status["readyReplicas"] == 3
    assert _condition(race.status, "Ready").get("observedGeneration") == 2


def test_every_condition_write_carries_a_resource_version_precondition(race):
    """Each write of the conditions applies only onto the status it was computed from."""
    assert race.condition_writes and all(race.condition_writes), race.condition_writes
