"""numpy reference of the cache ops: KV writes and block copy/gather/scatter.

Functional: each op returns new arrays and leaves its inputs untouched (the JAX frontend
returns updated caches the same way; the torch frontend mutates in place). All are exact.
"""

from __future__ import annotations

import numpy as np

from .. import validate
from ..spec import FP8_MAX, numpy_dtype


def kv_scale_value(scale) -> np.float32:
    """A k_scale / v_scale as the float32 every backend uses (None: 1.0)."""
    if scale is None:
        return np.float32(1.0)
    return np.float32(np.asarray(validate.to_host(scale) if hasattr(scale, "shape") else scale,
                                 dtype=np.float32).reshape(()))


def quantize_fp8_reference(x, scale=None) -> np.ndarray:
    """float8_e4m3fn(sat(x / scale)): what write_kv stores in a float8_e4m3fn cache.

    x: float32|float16|bfloat16 array; scale: None (1.0), a float or a one-element array, used
    as float32. In float32: x converted exactly, divided by the scale (IEEE division, rounded
    to nearest even: never a multiply by 1 / scale), clipped to [-448, 448] (CUDA's
    __NV_SATFINITE: out-of-range values and +-inf saturate), then rounded to the nearest
    float8_e4m3fn, ties to even (subnormals down to 2^-9 included). A NaN stays NaN with x's
    sign: 0x7f, or 0xff for a negative one (x's bit, not the quotient's: a GPU's division and
    torch's CPU float16 conversion give every NaN one sign).
    """
    x = np.asarray(x)
    y = x.astype(np.float32) / kv_scale_value(scale)
    q = np.clip(y, np.float32(-FP8_MAX), np.float32(FP8_MAX)).astype(
        numpy_dtype("float8_e4m3fn"))
    nan = np.isnan(y)
    if nan.any():
        negative = x.view(f"i{x.dtype.itemsize}") < 0
        q = np.where(nan, np.where(negative, 0xFF, 0x7F).astype(np.uint8),
                     q.view(np.uint8)).view(q.dtype)
    return q


def dequantize_fp8_reference(cache, scale=None) -> np.ndarray:
    """float64(cache) * scale: the values attention reads from a float8_e4m3fn cache."""
    return np.asarray(cache).astype(np.float64) * np.float64(kv_scale_value(scale))


def write_kv_reference(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None,
                       v_scale=None):
    """Write this step's keys and values into the paged cache.

    key, value: [num_tokens, num_kv_heads, head_dim], the caches' dtype, or for
    float8_e4m3fn caches any float dtype (both the same), stored as
    :func:`quantize_fp8_reference` (key, k_scale) / (value, v_scale).
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    slot_mapping: i32[n] or i64[n], n <= num_tokens; slot = block * block_size + offset,
    negative = skip.
    k_scale, v_scale: float8_e4m3fn caches only; None (1.0), a positive finite float or a
    float32 array of one element.
    Rows of key/value past len(slot_mapping) are ignored (padding). Returns (k_cache, v_cache).
    """
    n = validate.check_write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale,
                                v_scale=v_scale)
    validate.check_kv_scale_values(k_scale, v_scale)
    slots = validate.check_write_kv_values(k_cache, slot_mapping)
    k_new, v_new = np.array(k_cache, copy=True), np.array(v_cache, copy=True)
    block_size = k_new.shape[1]
    live = np.flatnonzero(slots >= 0)
    blocks, offsets = slots[live] // block_size, slots[live] % block_size
    key, value = np.asarray(key)[:n][live], np.asarray(value)[:n][live]
    if validate.is_fp8(k_cache):
        key, value = quantize_fp8_reference(key, k_scale), quantize_fp8_reference(value, v_scale)
    k_new[blocks, offsets] = key
    v_new[blocks, offsets] = value
    return k_new, v_new


def copy_blocks_reference(caches, src, dst):
    """Copy block src[i] to dst[i] in every cache (all reads happen before any write).

    caches: sequence of arrays with the block axis first (e.g. every layer's K and V).
    src, dst: i32[n] or i64[n] block ids; dst distinct. Returns a list of new caches.
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
