"""Keys, rows, a byte comparison and a local Redis server shared by the tier tests (not a
test module)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from prefixkv.paged.spec import numpy_dtype
from prefixkv.paged.tiers import BlockKey, Namespace

ROOT = Path(__file__).resolve().parents[1]
ROW = (4, 3, 2, 5)


def same(a, b) -> bool:
    """Same shape, dtype and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def ns(dtype="float32", salt=None):
    return Namespace("tiny-model", dtype=dtype, salt=salt)


def keys(n, namespace=None, start=0):
    namespace = namespace or ns()
    return [BlockKey(i.to_bytes(4, "big"), namespace) for i in range(start, start + n)]


def rows(n, dtype="float32", seed=0, shape=ROW):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(numpy_dtype(dtype)) for _ in range(n)]


def redis_server_or_skip():
    """A started LocalRedisServer; installs redis-server via scripts/services.sh if missing."""
    from prefixkv.paged.tiers import LocalRedisServer

    if shutil.which("redis-server") is None:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "install"],
                           capture_output=True, text=True, timeout=300)
        if shutil.which("redis-server") is None:
            pytest.skip(f"redis-server not installed and could not be installed: "
                        f"{r.stderr.strip()[-300:]}")
    return LocalRedisServer().start()
