"""Shared test set-up: a hypothesis profile sized for the 2-core CI machines, the
pallas_races fixture (a race Pallas' TPU interpret mode detects fails the test) and the
full_tiles fixture (the Triton attention kernel's key loop both ways)."""

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


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, the longest first (``seconds``: about what one takes on
    one core of the CI machine): under ``pytest -n 2`` xdist hands them out alternately, so
    the two workers start on them and the short tests fill in around them. Collected in file
    order, the longest (~130 s alone, ~200 s beside the other worker) had started late and
    kept one worker busy after the other had finished."""
    def key(item):
        mark = item.get_closest_marker("slow")
        return (0, -mark.kwargs.get("seconds", 0)) if mark else (1, 0)
    items.sort(key=key)


@pytest.fixture
def pallas_races(monkeypatch):
    """Fail the test when Pallas' TPU interpret mode detects a race in any kernel it ran
    (pallas_races.record: the interpreter itself only prints "RACE DETECTED")."""
    from pallas_races import record

    found = record(monkeypatch)
    yield
    assert not found, ("Pallas TPU interpret mode detected a race (its RACE DETECTED report is "
                       "in the captured output)")


@pytest.fixture(params=[False, True], ids=["masked", "full_tiles"])
def full_tiles(request, monkeypatch):
    """The Triton attention kernel's key loop as shipped (every step masked), and with
    FULL_TILES (the whole steps of keys every query row sees unmasked, then the masked rest)
    over steps of 16 keys, so that short test contexts hold several whole steps."""
    from prefixkv.kernels.triton import attention as tattn

    monkeypatch.setattr(tattn, "FULL_TILES", request.param)
    if request.param:
        config = tattn.attention_config
        monkeypatch.setattr(tattn, "attention_config",
                            lambda *a, **k: dict(config(*a, **k), BLOCK_N=16))
    return request.param

