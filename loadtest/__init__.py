"""Locust load test of ChatStream and the check that proves its outcome accounting exact."""
