"""KV-cache tiers below the device pool: host memory ("G2"), local disk ("G3") and remote
stores ("G4": Redis, NIXL), the write-through :class:`TieredStore` chain and the
:class:`BlockOffloader` that moves blocks between caches and tiers with gather/scatter.

numpy only at import: the remote tiers import their client (``redis``, ``nixl``) when made.
"""

from __future__ import annotations

import importlib

from .base import FORMAT_VERSION as FORMAT_VERSION
from .base import BlockKey as BlockKey
from .base import Namespace as Namespace
from .base import RecordError as RecordError
from .base import Tier as Tier
from .base import TierStats as TierStats
from .base import decode_record as decode_record
from .base import encode_record as encode_record
from .base import make_keys as make_keys
from .disk import DiskTier as DiskTier
from .host import HostTier as HostTier
from .offload import BlockOffloader as BlockOffloader
from .offload import TieredStore as TieredStore

_LAZY = {"RedisTier": ".redis", "LocalRedisServer": ".redis", "NixlTier": ".nixl",
         "NixlPeer": ".nixl"}
_LAZY["MooncakeTier"] = ".mooncake"  # Mooncake store (G4), imported on first use


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixkv.paged.tiers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(["FORMAT_VERSION", "BlockKey", "Namespace", "RecordError", "Tier", "TierStats",
                  "decode_record", "encode_record", "make_keys", "DiskTier", "HostTier",
                  "BlockOffloader", "TieredStore", *_LAZY])
