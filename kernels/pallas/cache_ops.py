"""KV cache writes and block copy/gather/scatter as Pallas Mosaic TPU kernels.

Every kernel is a sequence of DMAs between HBM buffers (``memory_space=pl.ANY``) addressed by
indices that are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``): no data goes
through vector registers. A grid step serves up to ``per_step`` rows or blocks, their DMAs all
in flight before it waits (a step per row would pay a grid step's fixed cost per 2-4 KiB
token row). Cache-updating kernels alias each cache input to its output
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


#: Rows (write_kv) and blocks (gather/scatter) per grid step: the DMAs one step has in flight.
ROWS_PER_STEP = 32
BLOCKS_PER_STEP = 8


def _dma_step(count: int, total: int, copies_of) -> None:
    """Items ``step * count + r`` (r < count, item < total) of this grid step: start their
    DMAs, all in flight, then wait for each. ``copies_of(item)`` (item clamped into range)
    returns the item's copy descriptors and whether to run them."""
    step = pl.program_id(0)

    def for_each(action: str) -> None:
        for r in range(count):
            item = step * count + r
            real = item < total
            copies, live = copies_of(jnp.minimum(item, total - 1))
            for cp in copies:
                pl.when(real & live)(getattr(cp, action))

    for_each("start")
    for_each("wait")


def _grid(total: int, count: int) -> tuple[int]:
    return (-(-total // count),)


# ----------------------------------------------------------------------------- gather_blocks


def _gather_blocks_kernel(ids_ref, *refs, num_caches: int, num_blocks: int, n: int,
                          per_step: int):
    caches, buf, sem = refs[:num_caches], refs[num_caches], refs[num_caches + 1]

    def copies_of(i):
        b = jnp.clip(ids_ref[i], 0, num_blocks - 1)
        return [pltpu.make_async_copy(caches[c].at[b], buf.at[i, c], sem.at[c])
                for c in range(num_caches)], True

    _dma_step(per_step, n, copies_of)


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def gather_blocks_tpu(caches, block_ids, *, interpret=False, per_step=BLOCKS_PER_STEP):
    """buffer[i, c] = caches[c][block_ids[i]]; caches share block shape and dtype.

    caches: list of [num_blocks, *block_shape]; block_ids: i32[n]. Returns
    [n, len(caches), *block_shape]. One DMA per (block, cache); ``per_step`` blocks' in flight
    per grid step.
    """
    caches = list(caches)
    n, num_caches = block_ids.shape[0], len(caches)
    num_blocks, *block_shape = caches[0].shape
    out_shape = out_struct((n, num_caches, *block_shape), caches[0].dtype, caches, block_ids)
    if n == 0:
        return jnp.zeros(out_shape.shape, out_shape.dtype)
    per_step = min(per_step, n)
    kernel = functools.partial(_gather_blocks_kernel, num_caches=num_caches,
                               num_blocks=num_blocks, n=n, per_step=per_step)
    return pl.pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_grid(n, per_step), in_specs=[_any_spec()] * num_caches,
            out_specs=_any_spec(), scratch_shapes=[pltpu.SemaphoreType.DMA((num_caches,))]),
        interpret=interpret,
    )(block_ids.astype(jnp.int32), *caches)


# ---------------------------------------------------------------------------- scatter_blocks


def _scatter_blocks_kernel(ids_ref, buf, *refs, num_caches: int, num_blocks: int, n: int,
                           per_step: int):
    outs, sem = refs[num_caches:2 * num_caches], refs[2 * num_caches]

    def copies_of(i):
        b = ids_ref[i]
        live = (b >= 0) & (b < num_blocks)
        b = jnp.clip(b, 0, num_blocks - 1)
        return [pltpu.make_async_copy(buf.at[i, c], outs[c].at[b], sem.at[c])
                for c in range(num_caches)], live

    _dma_step(per_step, n, copies_of)


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def scatter_blocks_tpu(caches, buffer, block_ids, *, interpret=False,
                       per_step=BLOCKS_PER_STEP):
    """caches[c][block_ids[i]] = buffer[i, c] (ids out of range skipped); returns the caches,
    each aliased to its input. block_ids must be distinct (the frontends check): two DMAs in
    flight to one block land in an undefined order on a TPU."""
    caches = list(caches)
    n, num_caches = block_ids.shape[0], len(caches)
    if n == 0:
        return caches
    num_blocks = caches[0].shape[0]
    per_step = min(per_step, n)
    kernel = functools.partial(_scatter_blocks_kernel, num_caches=num_caches,
                               num_blocks=num_blocks, n=n, per_step=per_step)
    # operands: ids (prefetch) 0, buffer 1, caches 2.. -> outputs 0..
    return list(pl.pallas_call(
        kernel, out_shape=[out_struct(c.shape, c.dtype, caches, buffer, block_ids)
                           for c in caches],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_grid(n, per_step),
            in_specs=[_any_spec()] * (1 + num_caches), out_specs=[_any_spec()] * num_caches,
            scratch_shapes=[pltpu.SemaphoreType.DMA((num_caches,))]),
        input_output_aliases={2 + c: c for c in range(num_caches)},
        interpret=interpret,
    )(block_ids.astype(jnp.int32), buffer, *caches))


# ------------------------------------------------------------------------------- copy_blocks


@functools.partial(jax.jit, static_argnames=("interpret",))
def copy_blocks_tpu(caches, src, dst, *, interpret=False):
    """cache[dst[i]] = cache[src[i]] in every cache, all reads before any write: the src
    blocks are DMA'd to a staging buffer first, then from it to dst (in place on the cache).
    dst must be distinct (the frontends check)."""
    out = []
    for c in caches:  # caches may differ in block shape; each gets its own pair of kernels
        staged = gather_blocks_tpu([c], src, interpret=interpret)
        out.extend(scatter_blocks_tpu([c], staged, dst, interpret=interpret))
    return out


# ---------------------------------------------------------------------------------- write_kv


def _write_kv_kernel(slots_ref, key, value, k_in, v_in, k_out, v_out, sem, *, num_slots: int,
                     block_size: int, n: int, per_step: int):
    del k_in, v_in  # aliased to k_out, v_out

    def copies_of(i):
        slot = slots_ref[i]
        live = (slot >= 0) & (slot < num_slots)
        # clamped to >= 0: truncating div/rem (floor division needs a sign op Mosaic lowers
        # per TPU generation)
        slot = jnp.clip(slot, 0, num_slots - 1)
        bs = jnp.asarray(block_size, slot.dtype)  # a Python int is int64 under x64
        blk, off = jax.lax.div(slot, bs), jax.lax.rem(slot, bs)
        return [pltpu.make_async_copy(key.at[i], k_out.at[blk, off], sem.at[0]),
                pltpu.make_async_copy(value.at[i], v_out.at[blk, off], sem.at[1])], live

    _dma_step(per_step, n, copies_of)


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def write_kv_tpu(key, value, k_cache, v_cache, slot_mapping, *, interpret=False,
                 per_step=ROWS_PER_STEP):
    """Write key/value rows i < len(slot_mapping) to their slots (negative slots skipped);
    returns (k_cache, v_cache) aliased to the inputs. One DMA per row and cache, ``per_step``
    rows' in flight per grid step. Live slots must be distinct (the frontends check): two DMAs
    in flight to one row land in an undefined order on a TPU."""
    n = slot_mapping.shape[0]
    if n == 0:
        return k_cache, v_cache
    num_blocks, block_size = k_cache.shape[:2]
    per_step = min(per_step, n)
    kernel = functools.partial(_write_kv_kernel, num_slots=num_blocks * block_size,
                               block_size=block_size, n=n, per_step=per_step)
    k, v = pl.pallas_call(
        kernel, out_shape=[out_struct(c.shape, c.dtype, key, value, k_cache, v_cache,
                                      slot_mapping) for c in (k_cache, v_cache)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_grid(n, per_step), in_specs=[_any_spec()] * 4,
            out_specs=[_any_spec()] * 2, scratch_shapes=[pltpu.SemaphoreType.DMA((2,))]),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
    )(slot_mapping.astype(jnp.int32), key, value, k_cache, v_cache)
    return k, v
