"""Contracts of the JAX ops (prefixkv.jax_frontend, CPU) that the second part of a mutation
review of jax_frontend/_ops.py and jax_frontend/_xla.py found unpinned by the other tests:
write_kv quantizing the value rows by v_scale (not k_scale) into fp8 caches; the dequantizing
fallback of shared_prefix_attention over fp8 caches (a backend that does not read fp8 bytes,
the tables naming fewer entries than the cache has blocks: the prefix and own tables remapped
to disjoint parts of the gathered blocks); shared_prefix_attention's traced sliding_window
named as a static argument; a NaN key read by the cascade's one- and several-prefix fast paths
and by its short decode own part (run on CPU: the cascade rule's thresholds at 0, the CPU
decode kernel declined) giving NaN as the reference does (docs/ops.md, tests/
test_nan_in_read_kv.py); and the ragged loop's few-row (key-major) tiles run for the long
sequence of a mixed float32 batch, within float32's tolerance of the reference.

Each test names the behaviour it pins; the numpy reference (prefixkv.paged.reference) is the
oracle where there is one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

F8 = np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.fixture
def cascade_always(monkeypatch):
    """The XLA cascade's fast paths run on CPU for any batch (the CPU rule's thresholds at 0;
    else a small batch runs as paged attention over prefix then own blocks)."""
    from prefixkv.jax_frontend import _xla

    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)
    jax.clear_caches()
    yield
    jax.clear_caches()


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint8)


# ------------------------------------------------------------------------------ fp8 write_kv


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_write_kv_quantizes_keys_by_k_scale_and_values_by_v_scale(mode):
    """fp8 caches with k_scale != v_scale: the key rows are stored as fp8(sat(key / k_scale)),
    the value rows as fp8(sat(value / v_scale)), bit-exact with the reference (the scales
    traced under jit)."""
    rng = np.random.default_rng(11)
    key = rng.standard_normal((5, 2, 16)).astype(np.float32) * 8
    value = rng.standard_normal((5, 2, 16)).astype(np.float32) * 8
    kc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 16)))
    vc = ref.quantize_fp8_reference(rng.standard_normal((3, 4, 2, 16)))
    slots = np.array([6, 9, -1, 0, 11], np.int32)
    ks, vs = 0.25, 4.0
    want_k, want_v = ref.write_kv_reference(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
    if mode == "eager":
        k, v = jf.write_kv(key, value, kc, vc, slots, k_scale=ks, v_scale=vs)
    else:
        k, v = jax.jit(lambda *a, ks, vs: jf.write_kv(*a, k_scale=ks, v_scale=vs))(
            key, value, kc, vc, slots, ks=np.float32(ks), vs=np.float32(vs))
    assert not np.array_equal(_bits(want_k), _bits(ref.write_kv_reference(
        key, value, kc, vc, slots, k_scale=vs, v_scale=vs)[0]))  # the scales tell apart
    np.testing.assert_array_equal(_bits(k), _bits(want_k))
    np.testing.assert_array_equal(_bits(v), _bits(want_v))


# ---------------------------------------------------------------- fp8 dequantizing fallback


def test_shared_prefix_fp8_dequantizing_fallback_keeps_prefix_and_own_tables_apart():
    """A backend that does not read fp8 bytes (pallas_interpret with 8 x 2 rows a block: no
    whole 8-bit tile) gets the blocks the prefix and own tables name dequantized, both tables
    remapped into one gathered cache (the cache grown by NaN blocks no table names, so the
    tables name fewer entries than it has blocks): each table must point at its own part of
    it, the answer the reference's."""
    from prefixkv.kernels.pallas import paged_attention as pa

    assert not pa.tpu_reads_fp8(num_kv_heads=2, block_size=8, xla_layout=False)
    rng = np.random.default_rng(12)
    b = testing.make_shared_prefix_batch(rng, [2], [(0, 2, 3), (-1, 1, 6), (0, 1, 9)],
                                         num_q_heads=4, num_kv_heads=2, head_dim=128,
                                         block_size=8)
    kq, vq = (ref.quantize_fp8_reference(c, s) for c, s in ((b.k_cache, 0.5), (b.v_cache, 2.0)))
    nan = np.full((3 * kq.shape[0], *kq.shape[1:]), 0x7F, np.uint8).view(F8)
    kq, vq = np.concatenate([kq, nan]), np.concatenate([vq, nan])
    a = b.args()
    assert a[3].size + a[6].size < kq.shape[0]
    want, want_lse = ref.shared_prefix_attention_reference(
        a[0], kq, vq, *a[3:], k_scale=0.5, v_scale=2.0, return_lse=True)
    out, lse = jf.shared_prefix_attention(a[0], kq, vq, *a[3:], k_scale=0.5, v_scale=2.0,
                                          return_lse=True, backend="pallas_interpret")
    testing.assert_attention_close(out, want, "float32")
    testing.assert_lse_close(lse, want_lse)


# ----------------------------------------------------------------------------- static args


def test_shared_prefix_traced_sliding_window_is_named_as_static():
    """jax.jit(shared_prefix_attention) traces a sliding_window keyword: a TypeError names it
    as a static argument and says how to make it one."""
    sp = testing.make_shared_prefix_batch(np.random.default_rng(3), [1], [(0, 1, 3)],
                                          block_size=4)
    with pytest.raises(TypeError, match=r"sliding_window: a static argument .*static_argnames"):
        jax.jit(jf.shared_prefix_attention)(*sp.args(), sliding_window=8)


# ------------------------------------------------------------------- NaN in a key, fast paths


@pytest.mark.parametrize("prefixes", [[2], [2, 1]], ids=["one_prefix", "two_prefixes"])
def test_cascade_fast_path_prefix_nan_key_gives_nan(prefixes, cascade_always):
    """A NaN in a prefix key (key 0 of prefix 0, kv head 1), the prefix part run by the
    one-prefix (or several-prefix) fast path: the tokens of that prefix get out and lse NaN in
    that head's q heads (a NaN softmax sum counts as seen), as in the reference; the merge keeps
    it; the other tokens stay finite."""
    rng = np.random.default_rng(13)
    seqs = [(0, 1, 3), (-1, 1, 2), (0, 1, 6)] + ([(1, 1, 4)] if len(prefixes) > 1 else [])
    b = testing.make_shared_prefix_batch(rng, prefixes, seqs, num_q_heads=4, num_kv_heads=2,
                                         head_dim=16, block_size=4, decode=True)
    b.k_cache[int(b.prefix_block_tables[0, 0]), 0, 1, 3] = np.nan
    want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
    out, lse = jf.shared_prefix_attention(*b.args(), return_lse=True)
    testing.assert_nan_like_reference(out, lse, want, want_lse)


def test_short_decode_own_nan_key_gives_nan(monkeypatch):
    """The cascade's decode own part read whole per sequence (short_decode_attention: on CPU
    when the decode kernel declines the inputs, else off CPU): a NaN in a sequence's own key 0
    (kv head 1) gives that sequence out and lse NaN in the head's q heads, as the reference."""
    from prefixkv.jax_frontend import _xla

    monkeypatch.setattr(_xla, "_cpu_kernel_takes", lambda *a: False)
    jax.clear_caches()
    try:
        rng = np.random.default_rng(14)
        b = testing.make_shared_prefix_batch(rng, [1], [(0, 1, 5), (-1, 1, 7), (0, 1, 2)],
                                             num_q_heads=4, num_kv_heads=2, head_dim=16,
                                             block_size=4, decode=True)
        assert b.block_tables.shape[1] * 4 <= _xla.SHORT_DECODE_MAX_TOKENS
        b.k_cache[int(b.block_tables[0, 0]), 0, 1, 3] = np.nan
        want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
        out, lse = jf.shared_prefix_attention(*b.args(), return_lse=True)
        testing.assert_nan_like_reference(out, lse, want, want_lse)
    finally:
        jax.clear_caches()


# ------------------------------------------------------------------ ragged loop, few rows


def test_mixed_batch_long_sequence_runs_few_row_tiles_exactly():
    """A float32 mixed batch of 8 decodes and one 40-token chunk: the chunk (past the decode
    kernel's 32 tokens) runs in the ragged loop with tiles of the batch's mean tokens (8 rows
    x 2 q heads: fewer than 32 rows, the key-major multiply-reduce form of P.V), within
    float32's tolerance of the reference."""
    from prefixkv.jax_frontend import _xla

    rng = np.random.default_rng(15)
    b = testing.make_ragged_batch(rng, [(1, 9)] * 8 + [(40, 70)], num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=8)
    q_tile = _xla.choose_tiling(48, 9, False, 8)[0]
    assert q_tile * 2 < 32 and _xla.CPU_RAGGED_DECODE_MAX_Q < 40
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True)
    out, lse = jf.paged_attention(*b.args(), return_lse=True)
    testing.assert_attention_close(out, want, "float32")
    testing.assert_lse_close(lse, want_lse)
