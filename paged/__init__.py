"""prefixkv.paged: framework-free (numpy) specs, validation, the reference of every op and the
host-side prefix-cache machinery. Public names are loaded lazily from their modules."""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "hash_blocks": ".hashing",
    "hash_blocks_words": ".hashing",
    "digests_to_words": ".hashing",
    "words_to_digests": ".hashing",
    "HASH_ALGOS": ".hashing",
    "BlockPool": ".pool",
    "NoFreeBlocksError": ".pool",
    "NULL_BLOCK": ".pool",
    "namespace_of": ".pool",
    "PrefixCache": ".prefix_cache",
    "KVEvent": ".events",
    "EventBus": ".events",
    "EventLog": ".events",
    "Router": ".router",
    "VllmEventEncoder": ".vllm_events",
    "VllmEventDecoder": ".vllm_events",
    "VllmEventPublisher": ".vllm_zmq",
    "VllmEventSubscriber": ".vllm_zmq",
    "RouteDecision": ".router",
    "BatchPlan": ".planner",
    "SharedPrefixPlan": ".planner",
    "plan_batch": ".planner",
    "find_shared_prefixes": ".planner",
    "block_tables_from_csr": ".csr",
    "csr_from_block_tables": ".csr",
    "Namespace": ".tiers",
    "BlockKey": ".tiers",
    "Tier": ".tiers",
    "HostTier": ".tiers",
    "DiskTier": ".tiers",
    "RedisTier": ".tiers",
    "NixlTier": ".tiers",
    "NixlPeer": ".tiers",
    "MooncakeTier": ".tiers",
    "TieredStore": ".tiers",
    "BlockOffloader": ".tiers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixkv.paged' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
