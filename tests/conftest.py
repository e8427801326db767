"""Shared test set-up: a hypothesis profile sized for the 2-core CI machines."""

import os

from hypothesis import HealthCheck, settings

# NIXL's bundled UCX would load its InfiniBand module, which pulls in the system libibverbs
# (installed for the Mooncake store) and with it a second libnl-route: the two clash in their
# exit-time destructors (SIGSEGV in rtnl_tc_unregister after the run). No test uses RDMA.
os.environ.setdefault("UCX_MODULES", "^ib")

settings.register_profile(
    "ci", deadline=None, max_examples=int(os.environ.get("PREFIXKV_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
