"""vLLM's KV event structs as msgspec declares them in ``vllm/distributed/kv_events.py`` (field
names, order, defaults and struct options), for the wire-format tests and benchmarks (not a test
module)."""


def vllm_schema(array_like: bool):
    """vLLM's event structs (field names, order, defaults and struct options of its
    kv_events.py), as a consumer decodes them."""
    import msgspec

    opts = dict(omit_defaults=True, gc=False, array_like=array_like)

    class EventBatch(msgspec.Struct, **opts):
        ts: float
        events: list
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, tag=True, **opts):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return KVEventBatch, BlockStored, BlockRemoved, AllBlocksCleared
