"""loadtest/tenant_users.py without a service: which keys flood, and when the run fails."""

from __future__ import annotations

from loadtest import tenant_tally
from loadtest.run_profile import PROFILES, TENANT_ENV
from loadtest.tenant_tally import CHECK_KEY_ENV as API_KEY_ENV
from loadtest.tenant_tally import KEYS_ENV, Tally, keys_from_environment, tenant_report


def test_flood_and_polite_keys_come_from_the_service_keys(monkeypatch):
    monkeypatch.setenv(KEYS_ENV, TENANT_ENV[KEYS_ENV])
    monkeypatch.setenv(API_KEY_ENV, TENANT_ENV[API_KEY_ENV])
    flood, polite = keys_from_environment()
    assert [k for k, _ in flood] == ["flood"]
    assert [k for k, _ in polite] == ["polite-1", "polite-2", "polite-3"]  # not the check's key
    assert PROFILES["tenants"].service_env == TENANT_ENV


def test_a_polite_key_with_nothing_admitted_fails_the_run(monkeypatch):
    tallies = {"flood": Tally(5, 40, [2.0]), "polite-1": Tally(3, 0, [0.4, 0.6, 0.5])}
    monkeypatch.setattr(tenant_tally, "TALLIES", tallies)
    report, ok = tenant_report()
    assert ok and "polite-1" in report and "0.50s" in report
    tallies["polite-2"] = Tally(0, 6, [])
    report, ok = tenant_report()
    assert not ok and "LOCKED OUT (no request admitted): polite-2" in report
