"""KV cache writes and block copy/gather/scatter as Pallas Mosaic TPU kernels.

Every kernel is a sequence of DMAs between HBM buffers (``memory_space=pl.ANY``) addressed by
indices that are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``): no data goes
through vector registers. Cache-updating kernels alias each cache input to its output
(``input_output_aliases``), so a caller that donates the caches updates them in place.

``interpret``: False for the TPU, or ``pltpu.InterpretParams(...)`` to run the kernel in
Pallas's TPU interpret mode on any platform (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._vma import out_struct

# Operands left where they are (HBM on a TPU); spelled pl.ANY in jax 0.10, with fallbacks for
# releases that move it.
_ANY = getattr(pl, "ANY", None) or getattr(pltpu, "ANY", None) or pltpu.HBM


def _any_spec():
    return pl.BlockSpec(memory_space=_ANY)


# ----------------------------------------------------------------------------- gather_blocks


def _dma_all(pairs, sem) -> None:
    """Copy every (src ref, dst ref) pair by DMA, all in flight at once (semaphore k for pair
    k), and wait for them."""
    copies = [pltpu.make_async_copy(src, dst, sem.at[k]) for k, (src, dst) in enumerate(pairs)]
    for cp in copies:
        cp.start()
    for cp in copies:
        cp.wait()


def _gather_blocks_kernel(ids_ref, *refs, num_caches: int, num_blocks: int):
    caches, buf, sem = refs[:num_caches], refs[num_caches], refs[num_caches + 1]
    i = pl.program_id(0)
    b = jnp.clip(ids_ref[i], 0, num_blocks - 1)
    _dma_all([(caches[c].at[b], buf.at[i, c]) for c in range(num_caches)], sem)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_blocks_tpu(caches, block_ids, *, interpret=False):
    """buffer[i, c] = caches[c][block_ids[i]]; caches share block shape and dtype.

    caches: list of [num_blocks, *block_shape]; block_ids: i32[n]. Returns
    [n, len(caches), *block_shape]. One DMA per (block, cache), all of a block's in flight.
    """
    caches = list(caches)
    n, num_caches = block_ids.shape[0], len(caches)
    num_blocks, *block_shape = caches[0].shape
    out_shape = out_struct((n, num_caches, *block_shape), caches[0].dtype, caches, block_ids)
    if n == 0:
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    kernel = functools.partial(_gather_blocks_kernel, num_caches=num_caches,
                               num_blocks=num_blocks)
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(n,), in_specs=[_any_spec()] * num_caches,
            out_specs=_any_spec(), scratch_shapes=[pltpu.SemaphoreType.DMA((num_caches,))]),
        interpret=interpret,
    )(block_ids.astype(jnp.int32), *caches)


# ---------------------------------------------------------------------------- scatter_blocks


def _scatter_blocks_kernel(ids_ref, buf, *refs, num_caches: int, num_blocks: int):
    outs, sem = refs[num_caches:2 * num_caches], refs[2 * num_caches]
    i = pl.program_id(0)
    b = ids_ref[i]

    @pl.when((b >= 0) & (b < num_blocks))
    def _():
        _dma_all([(buf.at[i, c], outs[c].at[b]) for c in range(num_caches)], sem)


@functools.partial(jax.jit, static_argnames=("interpret",))
def scatter_blocks_tpu(caches, buffer, block_ids, *, interpret=False):
    """caches[c][block_ids[i]] = buffer[i, c] (ids out of range skipped); returns the caches,
    each aliased to its input."""
    caches = list(caches)
    n, num_caches = block_ids.shape[0], len(caches)
    if n == 0:
        return caches
    num_blocks = caches[0].shape[0]
    kernel = functools.partial(_scatter_blocks_kernel, num_caches=num_caches,
                               num_blocks=num_blocks)
    # operands: ids (prefetch) 0, buffer 1, caches 2.. -> outputs 0..
    return list(pl.pallas_call(
        kernel, out_shape=[out_struct(c.shape, c.dtype, caches, buffer, block_ids)
                           for c in caches],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(n,), in_specs=[_any_spec()] * (1 + num_caches),
            out_specs=[_any_spec()] * num_caches,
            scratch_shapes=[pltpu.SemaphoreType.DMA((num_caches,))]),
        input_output_aliases={2 + c: c for c in range(num_caches)},
        interpret=interpret,
    )(block_ids.astype(jnp.int32), buffer, *caches))


# ------------------------------------------------------------------------------- copy_blocks


@functools.partial(jax.jit, static_argnames=("interpret",))
def copy_blocks_tpu(caches, src, dst, *, interpret=False):
    """cache[dst[i]] = cache[src[i]] in every cache, all reads before any write: the src
    blocks are DMA'd to a staging buffer first, then from it to dst (in place on the cache)."""
    out = []
    for c in caches:  # caches may differ in block shape; each gets its own pair of kernels
        staged = gather_blocks_tpu([c], src, interpret=interpret)
        out.extend(scatter_blocks_tpu([c], staged, dst, interpret=interpret))
    return out


# ---------------------------------------------------------------------------------- write_kv


def _write_kv_kernel(slots_ref, key, value, k_in, v_in, k_out, v_out, sem, *, num_slots: int,
                     block_size: int):
    del k_in, v_in  # aliased to k_out, v_out
    i = pl.program_id(0)
    slot = slots_ref[i]

    @pl.when((slot >= 0) & (slot < num_slots))
    def _():
        # slot >= 0 here: truncating div/rem (floor division needs a sign op Mosaic lowers
        # per TPU generation)
        blk, off = jax.lax.div(slot, block_size), jax.lax.rem(slot, block_size)
        _dma_all([(key.at[i], k_out.at[blk, off]), (value.at[i], v_out.at[blk, off])], sem)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_tpu(key, value, k_cache, v_cache, slot_mapping, *, interpret=False):
    """Write key/value rows i < len(slot_mapping) to their slots (negative slots skipped);
    returns (k_cache, v_cache) aliased to the inputs. One DMA per row and cache."""
    n = slot_mapping.shape[0]
    if n == 0:
        return k_cache, v_cache
    num_blocks, block_size = k_cache.shape[:2]
    kernel = functools.partial(_write_kv_kernel, num_slots=num_blocks * block_size,
                               block_size=block_size)
    k, v = pl.pallas_call(
        kernel, out_shape=[out_struct(c.shape, c.dtype, key, value, k_cache, v_cache,
                                      slot_mapping) for c in (k_cache, v_cache)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(n,), in_specs=[_any_spec()] * 4,
            out_specs=[_any_spec()] * 2, scratch_shapes=[pltpu.SemaphoreType.DMA((2,))]),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
    )(slot_mapping.astype(jnp.int32), key, value, k_cache, v_cache)
    return k, v
