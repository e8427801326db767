"""KV cache writes and block copy/gather/scatter as Pallas Mosaic TPU kernels.

Every kernel is a sequence of DMAs between HBM buffers (``memory_space=pl.ANY``) addressed by
indices that are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``): no data goes
through vector registers. A grid step serves up to ``per_step`` rows or blocks, their DMAs all
in flight before it waits (a step per row would pay a grid step's fixed cost per 2-4 KiB
token row). Cache-updating kernels alias each cache input to its output
(``input_output_aliases``), so a caller that donates the caches updates them in place.

``jax.vmap``: Pallas's own batching rule cannot batch these kernels (an ANY-space operand has
no block to add the batch axis to), so each kernel is a ``jax.custom_batching.custom_vmap``
whose rule folds the batch axis into the kernel's own: caches [B, num_blocks, ...] are one
cache [B * num_blocks, ...] (a reshape: donated caches stay in place) and element b's slots or
block ids are offset by b * num_blocks (* block_size), so a vmap over layers is still one
kernel launch. An unbatched cache that a batched operand writes is broadcast first (vmap's
meaning: every element returns its own updated copy); one only read, or written by unbatched
operands, is not.

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
from ._mosaic import ref_index

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


# ------------------------------------------------------------------------------ vmap folding


def _batched(x, batched: bool, size: int):
    """``x`` with the batch axis in front: as it is when batched, else broadcast."""
    return x if batched else jnp.broadcast_to(x, (size, *x.shape))


def _fold(x):
    """[B, d0, ...] as [B * d0, ...] (a reshape: no copy, a donated buffer stays aliased)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _offset_ids(ids, batched: bool, size: int, upper: int, *, clamp: bool, op: str):
    """Element b's ids (or slots) in [0, upper) as ids into the folded axis, b * upper + id,
    flattened: i32[size * n]. Ids out of range become -1 (skipped by a write) with
    ``clamp`` False, else are clamped into [0, upper) first (as the read kernels clamp), so no
    element ever reaches another's blocks."""
    if size * upper > 2**31 - 1:
        raise ValueError(
            f"{op} under jax.vmap: {size} batch elements x {upper} slots or blocks each do "
            f"not fit the kernel's int32 indices; vmap over fewer elements (or call the op "
            f"per element)")
    ids = _batched(ids, batched, size)
    base = jnp.arange(size, dtype=jnp.int32)[:, None] * jnp.int32(upper)
    if clamp:
        folded = jnp.clip(ids, 0, upper - 1).astype(jnp.int32) + base
    else:
        live = (ids >= 0) & (ids < upper)
        folded = jnp.where(live, ids.astype(jnp.int32) + base, jnp.int32(-1))
    return folded.reshape(-1)


def _element_shape(x, batched: bool) -> tuple[int, ...]:
    """One batch element's shape of ``x`` (batch axis in front when batched)."""
    return tuple(x.shape[1:]) if batched else tuple(x.shape)


def _cache_groups(cache_batched) -> tuple[list[int], list[int]]:
    """(indices of the batched caches, indices of the unbatched ones)."""
    return ([c for c, b in enumerate(cache_batched) if b],
            [c for c, b in enumerate(cache_batched) if not b])


# ----------------------------------------------------------------------------- gather_blocks


def _gather_blocks_kernel(ids_ref, *refs, num_caches: int, num_blocks: int, n: int,
                          per_step: int):
    caches, buf, sem = refs[:num_caches], refs[num_caches], refs[num_caches + 1]

    def copies_of(i):
        b = jnp.clip(ids_ref[i], 0, num_blocks - 1)
        return [pltpu.make_async_copy(caches[c].at[b], buf.at[i, ref_index(c)],
                                      sem.at[ref_index(c)])
                for c in range(num_caches)], True

    _dma_step(per_step, n, copies_of)


def _gather_blocks_call(caches, block_ids, *, interpret, per_step):
    n, num_caches = block_ids.shape[0], len(caches)
    num_blocks, *block_shape = caches[0].shape
    per_step = min(per_step, n)
    kernel = functools.partial(_gather_blocks_kernel, num_caches=num_caches,
                               num_blocks=num_blocks, n=n, per_step=per_step)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((n, num_caches, *block_shape), caches[0].dtype, caches, block_ids),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_grid(n, per_step), in_specs=[_any_spec()] * num_caches,
            out_specs=_any_spec(), scratch_shapes=[pltpu.SemaphoreType.DMA((num_caches,))]),
        interpret=interpret,
    )(block_ids.astype(jnp.int32), *caches)


@functools.cache
def _gather_blocks(interpret, per_step: int):
    """The gather kernel for these static settings as a custom_vmap (module doc)."""

    @jax.custom_batching.custom_vmap
    def gather(caches, block_ids):
        return _gather_blocks_call(caches, block_ids, interpret=interpret, per_step=per_step)

    @gather.def_vmap
    def gather_vmap(size, in_batched, caches, block_ids):
        cache_batched, ids_batched = in_batched
        n = block_ids.shape[-1]
        batched, unbatched = _cache_groups(cache_batched)
        parts = []  # (cache indices, [size, n, len(indices), *block_shape])
        if unbatched:  # read where they are: no copy per element of a shared cache
            ids = block_ids.reshape(-1) if ids_batched else block_ids
            buf = gather([caches[c] for c in unbatched], ids)
            buf = (buf.reshape(size, n, *buf.shape[1:]) if ids_batched
                   else _batched(buf, False, size))
            parts.append((unbatched, buf))
        if batched:
            ids = _offset_ids(block_ids, ids_batched, size, caches[batched[0]].shape[1],
                              clamp=True, op="gather_blocks")
            buf = gather([_fold(caches[c]) for c in batched], ids)
            parts.append((batched, buf.reshape(size, n, *buf.shape[1:])))
        if len(parts) == 1:
            return parts[0][1], True
        order = [c for idx, _ in parts for c in idx]  # the caches as concatenated
        buf = jnp.concatenate([b for _, b in parts], axis=2)
        return jnp.take(buf, jnp.asarray([order.index(c) for c in range(len(order))]),
                        axis=2), True

    return gather


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def gather_blocks_tpu(caches, block_ids, *, interpret=False, per_step=BLOCKS_PER_STEP):
    """buffer[i, c] = caches[c][block_ids[i]]; caches share block shape and dtype.

    caches: list of [num_blocks, *block_shape]; block_ids: i32[n]. Returns
    [n, len(caches), *block_shape]. One DMA per (block, cache); ``per_step`` blocks' in flight
    per grid step.
    """
    caches = list(caches)
    n, num_caches = block_ids.shape[0], len(caches)
    if n == 0:
        return jnp.zeros((0, num_caches, *caches[0].shape[1:]), caches[0].dtype)
    return _gather_blocks(interpret, per_step)(caches, block_ids)


# ---------------------------------------------------------------------------- scatter_blocks


def _scatter_blocks_kernel(ids_ref, buf, *refs, num_caches: int, num_blocks: int, n: int,
                           per_step: int):
    outs, sem = refs[num_caches:2 * num_caches], refs[2 * num_caches]

    def copies_of(i):
        b = ids_ref[i]
        live = (b >= 0) & (b < num_blocks)
        b = jnp.clip(b, 0, num_blocks - 1)
        return [pltpu.make_async_copy(buf.at[i, ref_index(c)], outs[c].at[b],
                                      sem.at[ref_index(c)])
                for c in range(num_caches)], live

    _dma_step(per_step, n, copies_of)


def _scatter_blocks_call(caches, buffer, block_ids, *, interpret, per_step):
    n, num_caches = block_ids.shape[0], len(caches)
    per_step = min(per_step, n)
    kernel = functools.partial(_scatter_blocks_kernel, num_caches=num_caches,
                               num_blocks=caches[0].shape[0], n=n, per_step=per_step)
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


@functools.cache
def _scatter_blocks(interpret, per_step: int):
    """The scatter kernel for these static settings as a custom_vmap (module doc)."""

    @jax.custom_batching.custom_vmap
    def scatter(caches, buffer, block_ids):
        return _scatter_blocks_call(caches, buffer, block_ids, interpret=interpret,
                                    per_step=per_step)

    @scatter.def_vmap
    def scatter_vmap(size, in_batched, caches, buffer, block_ids):
        cache_batched, buf_batched, ids_batched = in_batched
        out, out_batched = list(caches), list(cache_batched)
        if buf_batched or ids_batched:  # every element writes its own copy of every cache
            batched, unbatched = list(range(len(caches))), []
        else:  # the same write on every element: a shared cache's result stays shared
            batched, unbatched = _cache_groups(cache_batched)
        if unbatched:
            picked = jnp.take(buffer, jnp.asarray(unbatched), axis=1)
            for c, o in zip(unbatched, scatter([caches[c] for c in unbatched], picked,
                                               block_ids), strict=True):
                out[c] = o
        if batched:
            if unbatched:
                buffer = jnp.take(buffer, jnp.asarray(batched), axis=1 + buf_batched)
            shapes = [_element_shape(caches[c], cache_batched[c]) for c in batched]
            ids = _offset_ids(block_ids, ids_batched, size, shapes[0][0], clamp=False,
                              op="scatter_blocks")
            folded = [_fold(_batched(caches[c], cache_batched[c], size)) for c in batched]
            new = scatter(folded, _fold(_batched(buffer, buf_batched, size)), ids)
            for c, shape, o in zip(batched, shapes, new, strict=True):
                out[c], out_batched[c] = o.reshape(size, *shape), True
        return out, out_batched

    return scatter


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def scatter_blocks_tpu(caches, buffer, block_ids, *, interpret=False,
                       per_step=BLOCKS_PER_STEP):
    """caches[c][block_ids[i]] = buffer[i, c] (ids out of range skipped); returns the caches,
    each aliased to its input. block_ids must be distinct (the frontends check): two DMAs in
    flight to one block land in an undefined order on a TPU."""
    caches = list(caches)
    if block_ids.shape[0] == 0:
        return caches
    return list(_scatter_blocks(interpret, per_step)(caches, buffer, block_ids))


# ------------------------------------------------------------------------------- copy_blocks


@functools.partial(jax.jit, static_argnames=("interpret",))
def copy_blocks_tpu(caches, src, dst, *, interpret=False):
    """cache[dst[i]] = cache[src[i]] in every cache, all reads before any write: the src
    blocks are DMA'd to a staging buffer first, then from it to dst (in place on the cache).
    dst must be distinct (the frontends check). Under vmap the gather and the scatter fold the
    batch axis each (no rule of its own)."""
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
        return [pltpu.make_async_copy(key.at[i], k_out.at[blk, off], sem.at[ref_index(0)]),
                pltpu.make_async_copy(value.at[i], v_out.at[blk, off], sem.at[ref_index(1)])
                ], live

    _dma_step(per_step, n, copies_of)


def _write_kv_call(key, value, k_cache, v_cache, slot_mapping, *, interpret, per_step):
    n = slot_mapping.shape[0]
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


@functools.cache
def _write_kv(interpret, per_step: int):
    """The write_kv kernel for these static settings as a custom_vmap (module doc)."""

    @jax.custom_batching.custom_vmap
    def write(key, value, k_cache, v_cache, slot_mapping):
        return _write_kv_call(key, value, k_cache, v_cache, slot_mapping, interpret=interpret,
                              per_step=per_step)

    @write.def_vmap
    def write_vmap(size, in_batched, key, value, k_cache, v_cache, slot_mapping):
        key_b, value_b, k_b, v_b, slots_b = in_batched
        n = slot_mapping.shape[-1]
        # element b's rows i < n become rows b * n + i (rows past n are padding)
        rows = [_fold(_batched(x[:, :n] if b else x[:n], b, size))
                for x, b in ((key, key_b), (value, value_b))]
        shape = _element_shape(k_cache, k_b)
        slots = _offset_ids(slot_mapping, slots_b, size, shape[0] * shape[1], clamp=False,
                            op="write_kv")
        k, v = write(*rows, _fold(_batched(k_cache, k_b, size)),
                     _fold(_batched(v_cache, v_b, size)), slots)
        return ((k.reshape(size, *shape), v.reshape(size, *_element_shape(v_cache, v_b))),
                (True, True))

    return write


@functools.partial(jax.jit, static_argnames=("interpret", "per_step"))
def write_kv_tpu(key, value, k_cache, v_cache, slot_mapping, *, interpret=False,
                 per_step=ROWS_PER_STEP):
    """Write key/value rows i < len(slot_mapping) to their slots (negative slots skipped);
    returns (k_cache, v_cache) aliased to the inputs. One DMA per row and cache, ``per_step``
    rows' in flight per grid step. Live slots must be distinct (the frontends check): two DMAs
    in flight to one row land in an undefined order on a TPU."""
    if slot_mapping.shape[0] == 0:
        return k_cache, v_cache
    return _write_kv(interpret, per_step)(key, value, k_cache, v_cache, slot_mapping)
