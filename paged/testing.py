"""Random ragged batches and the shared test grids, used by the reference tests and by every
backend's tests (numpy only, so the JAX and torch suites build identical inputs).

Caches come back with every slot that holds no token set to NaN, and unused block-table
entries point at a NaN block, so a kernel that reads a key past kv_len, a block outside the
table, or multiplies a masked probability into unmasked garbage fails the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .spec import ATTENTION_TOLERANCE, numpy_dtype

#: (q_len, kv_len) per sequence. kv_len counts the cached prefix plus this step's tokens.
#: Sizes in units of the block size B are filled in by :func:`seq_grid`.
GRID_NAMES = ("decode", "prefill", "prefill_with_prefix", "mixed", "contexts")


def seq_grid(name: str, block_size: int) -> list[tuple[int, int]]:
    """The named grid of (q_len, kv_len) for a block size B (contexts 0, 1, B-1, B, B+1, ...)."""
    b = block_size
    grids = {
        # one token per sequence over cached contexts of awkward lengths
        "decode": [(1, 1), (1, b - 1 if b > 1 else 1), (1, b), (1, b + 1), (1, 3 * b + 5)],
        # whole prompts, nothing cached
        "prefill": [(1, 1), (b - 1 if b > 1 else 1,) * 2, (b + 1,) * 2, (2 * b + 3,) * 2],
        # chunked prefill over a cached prefix
        "prefill_with_prefix": [(3, b + 3), (b, 3 * b), (b + 1, 2 * b + 2), (1, 2 * b)],
        # decode + prefill + padding (q_len 0, kv_len 0) in one call
        "mixed": [(1, 2 * b + 1), (b + 2, b + 2), (0, 0), (5, b + 7), (1, 1), (0, 3),
                  (2 * b, 4 * b - 1)],
        # contexts 0, 1, B-1, B, B+1 with a prefill of one token where possible
        "contexts": [(0, 0), (1, 1), (1, max(b - 1, 1)), (1, b), (2, b + 1)],
    }
    return grids[name]


@dataclass
class RaggedBatch:
    """Inputs of one paged-attention call, as numpy arrays."""

    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    block_tables: np.ndarray
    kv_lens: np.ndarray
    cu_q_lens: np.ndarray | None
    seqs: list[tuple[int, int]]

    @property
    def block_size(self) -> int:
        return int(self.k_cache.shape[1])

    def args(self) -> tuple:
        """(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens) as the ops take them."""
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.kv_lens,
                self.cu_q_lens)


def random_values(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(numpy_dtype(dtype))


def make_ragged_batch(rng: np.random.Generator, seqs: Sequence[tuple[int, int]], *,
                      num_q_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
                      block_size: int = 16, dtype: str = "float32", decode: bool | None = None,
                      shuffle: bool = True, extra_blocks: int = 3, nan_fill: bool = True,
                      max_blocks_per_seq: int | None = None, q_scale: float = 1.0,
                      nan_block_padding: bool = True,
                      sliding_window: int | None = None) -> RaggedBatch:
    """A random ragged batch: sequence s has seqs[s] = (q_len, kv_len).

    Blocks are drawn from a shuffled pool (so tables are not contiguous), each sequence gets
    ceil(kv_len / block_size) blocks, and ``extra_blocks`` more blocks exist unused.
    ``decode``: pass cu_q_lens=None (needs every q_len == 1); default: when all q_len are 1.
    ``nan_fill``: every slot no query sees is NaN: past kv_len, unused blocks, and with a
    ``sliding_window`` the keys before the window of a sequence's first query (what an engine
    that frees blocks leaving the window, or points them at a null block, leaves there).
    """
    seqs = [(int(a), int(b)) for a, b in seqs]
    for q_len, kv_len in seqs:
        if q_len > kv_len:
            raise ValueError(f"seqs: q_len {q_len} > kv_len {kv_len}")
    if decode is None:
        decode = len(seqs) > 0 and all(q == 1 for q, _ in seqs)
    need = [-(-kv // block_size) for _, kv in seqs]
    width = max_blocks_per_seq or max([1, *need])
    num_blocks = sum(need) + max(extra_blocks, 1)
    ids = rng.permutation(num_blocks) if shuffle else np.arange(num_blocks)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = random_values(rng, cache_shape, dtype)
    v_cache = random_values(rng, cache_shape, dtype)
    valid = np.zeros(num_blocks * block_size, dtype=bool)
    pad_block = int(ids[-1])  # never handed to a sequence: all NaN when nan_fill
    tables = np.full((len(seqs), width), pad_block if nan_block_padding else 0, dtype=np.int32)
    pos = 0
    for s, (q_len, kv_len) in enumerate(seqs):
        mine = ids[pos:pos + need[s]]
        pos += need[s]
        tables[s, :need[s]] = mine
        t = np.arange(kv_len)
        if sliding_window is not None:  # the first query, at kv_len - q_len, sees t > its - w
            t = t[t > kv_len - q_len - sliding_window]
        valid[mine[t // block_size] * block_size + t % block_size] = True
    if nan_fill:
        flat_k = k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
        flat_k[~valid] = np.nan
        flat_v[~valid] = np.nan
    q_lens = np.array([q for q, _ in seqs], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = random_values(rng, (int(cu[-1]), num_q_heads, head_dim), dtype, q_scale)
    return RaggedBatch(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                       kv_lens=np.array([kv for _, kv in seqs], dtype=np.int32),
                       cu_q_lens=None if decode else cu, seqs=seqs)


@dataclass
class SharedPrefixBatch:
    """Inputs of one shared_prefix_attention call, as numpy arrays."""

    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    prefix_block_tables: np.ndarray
    prefix_lens: np.ndarray
    prefix_ids: np.ndarray
    block_tables: np.ndarray
    kv_lens: np.ndarray
    cu_q_lens: np.ndarray | None

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.prefix_block_tables, self.prefix_lens,
                self.prefix_ids, self.block_tables, self.kv_lens, self.cu_q_lens)


def make_shared_prefix_batch(rng: np.random.Generator, prefix_blocks: Sequence[int],
                             seqs: Sequence[tuple[int, int, int]], *, num_q_heads: int = 4,
                             num_kv_heads: int = 2, head_dim: int = 64, block_size: int = 16,
                             dtype: str = "float32",
                             decode: bool | None = None) -> SharedPrefixBatch:
    """Prefixes of ``prefix_blocks[p]`` full blocks; seqs[s] = (prefix_id, q_len, own_kv_len).

    Built on :func:`make_ragged_batch`: the prefixes are extra "sequences" of the pool, so
    every slot not holding a token is NaN as there.
    """
    prefix_seqs = [(0, n * block_size) for n in prefix_blocks]
    own = [(q, kv) for _, q, kv in seqs]
    if decode is None:
        decode = len(own) > 0 and all(q == 1 for q, _ in own)
    rb = make_ragged_batch(rng, prefix_seqs + own, num_q_heads=num_q_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                           dtype=dtype, decode=False)
    n_p = len(prefix_seqs)
    ptab = rb.block_tables[:n_p, :max([1, *prefix_blocks])]
    q_lens = np.array([q for q, _ in own], dtype=np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return SharedPrefixBatch(
        q=rb.q, k_cache=rb.k_cache, v_cache=rb.v_cache,
        prefix_block_tables=np.ascontiguousarray(ptab),
        prefix_lens=(np.array(prefix_blocks, dtype=np.int32) * block_size).astype(np.int32),
        prefix_ids=np.array([p for p, _, _ in seqs], dtype=np.int32),
        block_tables=np.ascontiguousarray(rb.block_tables[n_p:]), kv_lens=rb.kv_lens[n_p:].copy(),
        cu_q_lens=None if decode else cu)


def small_shared_prefix_batch(rng: np.random.Generator, decode: bool) -> SharedPrefixBatch:
    """A small cascade batch for the frontends' tests: prefixes of 3 and 2 blocks of 8 tokens,
    four sequences (two on prefix 0, one on prefix 1, one with none) with 1 to 6 own tokens,
    one query token each (``decode``) or 1 to 3; 4 q / 2 kv heads x 32."""
    seqs = [(0, 1, 3), (1, 1, 6), (-1, 1, 2), (0, 1, 1)] if decode else \
        [(0, 2, 3), (1, 1, 6), (-1, 3, 4), (0, 1, 1)]
    return make_shared_prefix_batch(rng, [3, 2], seqs, num_q_heads=4, num_kv_heads=2,
                                    head_dim=32, block_size=8)


def logit_overflow_decode(sign: int) -> tuple[np.ndarray, ...]:
    """(q, k_cache, v_cache, block_tables, kv_lens) of one float32 decode over 16 keys whose
    logits pass float32's range: sign > 0, one key's logit is +inf; sign < 0, every key's is
    -inf. Outside the attention contract; the CPU kernels answer NaN (docs/ops.md)."""
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((8, 4, 1, 16)) * 0.1).astype(np.float32)
    v = rng.standard_normal((8, 4, 1, 16)).astype(np.float32)
    if sign > 0:
        k[0, 0] = 1e20
    else:
        k[:] = -1e20
    q = np.full((1, 1, 16), 1e20, np.float32)
    return q, k, v, np.arange(4, dtype=np.int32)[None], np.array([16], np.int32)


def nan_like(x: np.ndarray) -> np.ndarray:
    """An output buffer pre-filled with NaN, so an unwritten row fails a comparison."""
    return np.full_like(x, np.nan)


def assert_attention_close(got, want, dtype: str) -> None:
    """An attention output (any array type numpy converts, any float dtype) equals the
    reference within ATTENTION_TOLERANCE[dtype], with no NaN."""
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    got = np.asarray(got).astype(np.float32)
    assert not np.isnan(got).any(), "NaN in the output"
    np.testing.assert_allclose(got, np.asarray(want).astype(np.float32), atol=atol, rtol=rtol)


def assert_lse_close(got, want) -> None:
    """lse equals the reference: -inf in the same places, the finite values within 1e-4."""
    got, want = np.asarray(got), np.asarray(want)
    assert (np.isneginf(got) == np.isneginf(want)).all(), "rows with no key differ"
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=1e-4, rtol=1e-5)


def assert_nan_like_reference(out, lse, want, want_lse) -> None:
    """An attention result over a NaN the reference reads: out and lse NaN exactly where the
    reference's are (a case that reads no NaN fails), the rest within 1e-4."""
    out, lse = np.asarray(out, np.float32), np.asarray(lse, np.float32)
    assert np.isnan(want_lse).any() or np.isnan(want).any(), "the case reads no NaN"
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(want_lse))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(out[ok], np.asarray(want)[ok], atol=1e-4, rtol=1e-4)
    ok = ~np.isnan(want_lse)
    np.testing.assert_allclose(lse[ok], np.asarray(want_lse)[ok], atol=1e-4, rtol=1e-4)
