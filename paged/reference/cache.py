"""numpy reference of the cache ops: KV writes and block copy/gather/scatter.

Functional: each op returns new arrays and leaves its inputs untouched (the JAX frontend
returns updated caches the same way; the torch frontend mutates in place). All are exact.
"""

from __future__ import annotations

import numpy as np

from .. import validate


def write_kv_reference(key, value, k_cache, v_cache, slot_mapping):
    """Write this step's keys and values into the paged cache.

    key, value: [num_tokens, num_kv_heads, head_dim], the caches' dtype.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    slot_mapping: i32[n], n <= num_tokens; slot = block * block_size + offset, negative = skip.
    Rows of key/value past len(slot_mapping) are ignored (padding). Returns (k_cache, v_cache).
    """
    n = validate.check_write_kv(key, value, k_cache, v_cache, slot_mapping)
    slots = validate.check_write_kv_values(k_cache, slot_mapping)
    k_new, v_new = np.array(k_cache, copy=True), np.array(v_cache, copy=True)
    block_size = k_new.shape[1]
    live = np.flatnonzero(slots >= 0)
    blocks, offsets = slots[live] // block_size, slots[live] % block_size
    k_new[blocks, offsets] = np.asarray(key)[:n][live]
    v_new[blocks, offsets] = np.asarray(value)[:n][live]
    return k_new, v_new


def copy_blocks_reference(caches, src, dst):
    """Copy block src[i] to dst[i] in every cache (all reads happen before any write).

    caches: sequence of arrays with the block axis first (e.g. every layer's K and V).
    src, dst: i32[n] block ids; dst distinct. Returns a list of new caches.
    """
    num_blocks = validate.check_copy_blocks(caches, src, dst)
    s, d = validate.check_copy_blocks_values(num_blocks, src, dst)
    out = []
    for c in caches:
        c = np.asarray(c)
        new = c.copy()
        new[d] = c[s]  # c[s] is read from the untouched input: reads before writes
        out.append(new)
    return out


def gather_blocks_reference(caches, block_ids):
    """Gather blocks into one contiguous buffer [n, len(caches), *block_shape].

    buffer[i, c] is block block_ids[i] of caches[c]: one block's data for every cache together
    (the layout tiers store and transfer). caches share block shape and dtype.
    """
    validate.check_gather_blocks(caches, block_ids)
    ids = validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=False)
    return np.stack([np.asarray(c)[ids] for c in caches], axis=1)


def scatter_blocks_reference(caches, buffer, block_ids):
    """Inverse of gather_blocks: caches[c][block_ids[i]] = buffer[i, c] (block_ids distinct).

    Returns a list of new caches; blocks not named come back bit-identical.
    """
    validate.check_scatter_blocks(caches, buffer, block_ids)
    ids = validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=True)
    buf = np.asarray(buffer)
    out = []
    for i, c in enumerate(caches):
        new = np.array(c, copy=True)
        new[ids] = buf[:, i]
        out.append(new)
    return out
