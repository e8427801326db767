"""Shared test set-up: a hypothesis profile sized for the 2-core CI machines, and the
pallas_races fixture (a race Pallas' TPU interpret mode detects fails the test)."""

import os

import pytest
from hypothesis import HealthCheck, settings

# NIXL's bundled UCX would load its InfiniBand module, which pulls in the system libibverbs
# (installed for the Mooncake store) and with it a second libnl-route: the two clash in their
# exit-time destructors (SIGSEGV in rtnl_tc_unregister after the run). No test uses RDMA.
os.environ.setdefault("UCX_MODULES", "^ib")

settings.register_profile(
    "ci", deadline=None, max_examples=int(os.environ.get("PREFIXKV_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))



@pytest.fixture
def pallas_races(monkeypatch):
    """Fail the test when Pallas' TPU interpret mode detects a race in any kernel it ran
    (pallas_races.record: the interpreter itself only prints "RACE DETECTED")."""
    from pallas_races import record

    found = record(monkeypatch)
    yield
    assert not found, ("Pallas TPU interpret mode detected a race (its RACE DETECTED report is "
                       "in the captured output)")
