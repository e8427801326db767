"""Attention sinks (gpt-oss; vLLM's ``sinks``): one logit per q head in the softmax's
denominator with no value; and shared-prefix attention with a sliding window (gpt-oss
alternates windowed layers), counted over prefix then own tokens. The reference against a
dense softmax written out here, and every frontend and CPU backend (the Triton kernels':
tests/_triton_interp_cases.py) against the reference: paged and shared-prefix attention,
decode and ragged batches, out/lse, input checks."""

from __future__ import annotations

import numpy as np
import pytest
from prefixkv.paged import reference as ref
from prefixkv.paged import testing
from prefixkv.paged.reference import attention as ref_attention
from prefixkv.paged.spec import ATTENTION_TOLERANCE


def _sinks(rng, num_q_heads: int) -> np.ndarray:
    """Sinks from far below to far above the logits, so each one shifts the rows it touches."""
    return np.linspace(-4.0, 6.0, num_q_heads).astype(np.float32)[rng.permutation(num_q_heads)]


def _dense(b: testing.RaggedBatch, sinks, *, causal=True, sliding_window=None,
           logits_soft_cap=None):
    """out, lse from a float64 softmax over [the sequence's logits, the head's sink]."""
    q = b.q.astype(np.float64)
    hq, d = q.shape[1:]
    hkv = b.k_cache.shape[2]
    scale = d ** -0.5
    cu = b.cu_q_lens if b.cu_q_lens is not None else np.arange(len(b.seqs) + 1)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    for s, kv_len in enumerate(b.kv_lens):
        rows = range(int(cu[s]), int(cu[s + 1]))
        t = np.arange(kv_len)
        blocks = b.block_tables[s, t // b.block_size]
        k = b.k_cache[blocks, t % b.block_size].astype(np.float64)
        v = b.v_cache[blocks, t % b.block_size].astype(np.float64)
        for j, row in enumerate(rows):
            pos = kv_len - len(rows) + j
            see = (t <= pos) if causal else np.ones(kv_len, bool)
            if sliding_window is not None:
                see &= t > pos - sliding_window
            for h in range(hq):
                kh = h // (hq // hkv)
                x = k[see, kh] @ q[row, h] * scale
                if logits_soft_cap is not None:
                    x = logits_soft_cap * np.tanh(x / logits_soft_cap)
                x = np.append(x, float(sinks[h]))
                m = x.max()
                p = np.exp(x - m)
                out[row, h] = p[:-1] @ v[see, kh] / p.sum()
                lse[row, h] = m + np.log(p.sum())
    return out, lse


OPTIONS = [{}, {"sliding_window": 5}, {"logits_soft_cap": 3.0}, {"causal": False}]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("grid", ["decode", "mixed", "contexts"])
def test_reference_matches_a_dense_softmax_with_a_sink_column(grid, opts):
    rng = np.random.default_rng(len(grid) + len(opts))
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 4), num_q_heads=6, num_kv_heads=2,
                                  head_dim=8, block_size=4, q_scale=2.0,
                                  sliding_window=opts.get("sliding_window"))
    sinks = _sinks(rng, 6)
    out, lse = ref.paged_attention_reference(*b.args(), return_lse=True, sinks=sinks, **opts)
    want, want_lse = _dense(b, sinks, **opts)
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-6)  # empty rows: the sink
    # a sink of -inf is no sink; the rows that see keys move, the empty ones stay 0
    plain, plain_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    off = np.full(6, -np.inf, np.float32)
    none, none_lse = ref.paged_attention_reference(*b.args(), return_lse=True, sinks=off, **opts)
    np.testing.assert_array_equal(none, plain)
    np.testing.assert_array_equal(none_lse, plain_lse)
    seen = np.isfinite(plain_lse)
    assert (np.abs(out - plain).max(axis=-1)[seen] > 0).all()


@pytest.mark.parametrize("window", [None, 5])
def test_shared_prefix_reference_counts_each_rows_sink_once(window):
    rng = np.random.default_rng(3)
    b = testing.make_shared_prefix_batch(rng, [2, 1], [(0, 1, 3), (1, 2, 5), (-1, 1, 2),
                                                      (0, 3, 4)],
                                         num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4)
    sinks = _sinks(rng, 4)
    tables, lens = ref_attention.shared_prefix_block_tables(*b.args()[3:8], 4)
    flat = testing.RaggedBatch(b.q, b.k_cache, b.v_cache, tables, lens, b.cu_q_lens,
                               seqs=[(0, int(n)) for n in lens])
    want, want_lse = _dense(flat, sinks, sliding_window=window)
    out, lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True, sinks=sinks,
                                                     sliding_window=window)
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-6)


# --------------------------------------------------------------------------------------- JAX


def _jax_cases():
    return [("xla", "decode", "float32"), ("xla", "mixed", "float32"),
            ("xla", "mixed", "bfloat16"), ("xla", "decode", "float16"),
            ("pallas_interpret", "mixed", "float32"),
            ("pallas_gpu_interpret", "decode", "float32")]


@pytest.mark.parametrize("backend,grid,dtype", _jax_cases())
def test_jax_paged_attention_sinks(backend, grid, dtype):
    jax = pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    rng = np.random.default_rng(11)
    d = 128 if backend == "pallas_interpret" else 32
    bs = 16 if backend == "pallas_gpu_interpret" else 8
    seqs = testing.seq_grid(grid, bs)[:4] if backend != "xla" else testing.seq_grid(grid, bs)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=d,
                                  block_size=bs, dtype=dtype, sliding_window=9)
    sinks = _sinks(rng, 8)
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=9, return_lse=True,
                                                   sinks=sinks)

    @jax.jit
    def step(q, kc, vc, bt, kv, cu, sk):  # the sinks traced, as a model's parameter
        return jf.paged_attention(q, kc, vc, bt, kv, cu, sliding_window=9, return_lse=True,
                                  sinks=sk, backend=backend)

    out, lse = step(*b.args(), sinks.astype(np.float32))
    testing.assert_attention_close(out, want, dtype)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)
    if backend == "xla":  # eager, sinks in bf16 as checkpoints keep them, out only
        got = jf.paged_attention(*b.args(), sliding_window=9,
                                 sinks=jax.numpy.asarray(sinks, jax.numpy.bfloat16))
        want16 = ref.paged_attention_reference(
            *b.args(), sliding_window=9,
            sinks=np.asarray(jax.numpy.asarray(sinks, jax.numpy.bfloat16), np.float32))
        testing.assert_attention_close(got, want16, dtype)


def _shared_prefix_case(decode: bool, window: int | None = None):
    """A cascade batch (two prefixes, a sequence with none), its sinks and the reference (a
    window of 11 starts inside the 24- and 16-token prefixes)."""
    rng = np.random.default_rng(5)
    b = testing.small_shared_prefix_batch(rng, decode)
    sinks = _sinks(rng, 4)
    return b, sinks, *ref.shared_prefix_attention_reference(*b.args(), return_lse=True,
                                                            sinks=sinks, sliding_window=window)


@pytest.mark.parametrize("window", [None, 11], ids=["no_window", "window"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_jax_shared_prefix_attention_sinks(decode, window):
    pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    b, sinks, want, want_lse = _shared_prefix_case(decode, window)
    out, lse = jf.shared_prefix_attention(*b.args(), return_lse=True, sinks=sinks,
                                          sliding_window=window)
    testing.assert_attention_close(out, want, "float32")
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)


def test_jax_sinks_bad_input_names_the_argument():
    pytest.importorskip("jax")
    from prefixkv import jax_frontend as jf

    b = testing.make_ragged_batch(np.random.default_rng(0), testing.seq_grid("decode", 4),
                                  num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4)
    with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\), one logit per q head"):
        jf.paged_attention(*b.args(), sinks=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="sinks: expected float32 or float16 or bfloat16, got "
                                        "int32"):
        jf.paged_attention(*b.args(), sinks=np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="sinks: expected an array, got list"):
        jf.paged_attention(*b.args(), sinks=[0.0] * 4)


# ------------------------------------------------------------------------------------- torch


@pytest.mark.parametrize("grid,dtype", [("decode", "float32"), ("decode", "bfloat16"),
                                        ("mixed", "float32"), ("mixed", "float16")])
def test_torch_paged_attention_sinks(grid, dtype):
    torch = pytest.importorskip("torch")
    from torch_convert import TORCH_DTYPE, N, T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(17)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 8), num_q_heads=8, num_kv_heads=2,
                                  head_dim=32, block_size=8, dtype=dtype, sliding_window=9)
    sinks = _sinks(rng, 8)
    want, want_lse = ref.paged_attention_reference(*b.args(), sliding_window=9, return_lse=True,
                                                   sinks=sinks)
    args = [None if a is None else T(a) for a in b.args()]
    out, lse = tf.paged_attention(*args, sliding_window=9, return_lse=True, sinks=T(sinks))
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(N(out), want.astype(np.float64), atol=atol, rtol=rtol)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)
    # out= buffers written in place, lse= too (with the sink) even when not returned
    o = torch.full(args[0].shape, float("nan"), dtype=TORCH_DTYPE[dtype])
    lbuf = torch.full(args[0].shape[:2], float("nan"))
    got = tf.paged_attention(*args, sliding_window=9, sinks=T(sinks), out=o, lse=lbuf)
    assert got is o
    np.testing.assert_allclose(N(o), want.astype(np.float64), atol=atol, rtol=rtol)
    np.testing.assert_allclose(N(lbuf), want_lse, atol=1e-4, rtol=1e-5)
    o2 = torch.full(args[0].shape, float("nan"), dtype=TORCH_DTYPE[dtype])
    tf.paged_attention(*args, sliding_window=9, sinks=T(sinks), out=o2)
    np.testing.assert_array_equal(N(o2), N(o))


@pytest.mark.parametrize("window", [None, 11], ids=["no_window", "window"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_torch_shared_prefix_attention_sinks(decode, window):
    pytest.importorskip("torch")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    b, sinks, want, want_lse = _shared_prefix_case(decode, window)
    args = [None if a is None else T(a) for a in b.args()]
    out, lse = tf.shared_prefix_attention(*args, return_lse=True, sinks=T(sinks),
                                          sliding_window=window)
    np.testing.assert_allclose(N(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)


def test_torch_sinks_under_torch_compile():
    torch = pytest.importorskip("torch")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(8)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    sinks = _sinks(rng, 4)
    want = ref.paged_attention_reference(*b.args(), sinks=sinks)
    args = [T(a) for a in b.args()]

    def step(q, kc, vc, bt, kv, cu, sk):
        return tf.paged_attention(q, kc, vc, bt, kv, cu, sinks=sk)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args, T(sinks))
    np.testing.assert_allclose(N(got), want, atol=2e-5, rtol=2e-5)


def test_torch_sinks_bad_input_names_the_argument():
    pytest.importorskip("torch")
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    b = testing.make_ragged_batch(np.random.default_rng(0), testing.seq_grid("decode", 4),
                                  num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4)
    args = [T(a) for a in b.args()[:5]]
    with pytest.raises(TypeError, match="sinks: expected a torch.Tensor, got ndarray"):
        tf.paged_attention(*args, sinks=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\)"):
        tf.paged_attention(*args, sinks=T(np.zeros(8, np.float32)))
    with pytest.raises(TypeError, match="sinks: expected float32 or float16 or bfloat16"):
        tf.paged_attention(*args, sinks=T(np.zeros(4, np.int64)))


def test_torch_sinks_with_inference_buffers_and_parameter_sinks():
    """out=/lse= buffers made under torch.inference_mode and used outside it, and sinks held
    as an nn.Parameter (the ops are forward-only: the sinks are read detached)."""
    torch = pytest.importorskip("torch")
    from torch_convert import N, T

    from prefixkv import torch_frontend as tf

    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    sinks = _sinks(rng, 4)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, sinks=sinks)
    args = [T(a) for a in b.args()[:5]]
    with torch.inference_mode():
        out, lse = torch.empty_like(args[0]), torch.empty(args[0].shape[:2])
    tf.paged_attention(*args, sinks=T(sinks), out=out, lse=lse)
    np.testing.assert_allclose(N(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)
    param = torch.nn.Parameter(T(sinks))
    got = tf.paged_attention(*args, sinks=param)
    np.testing.assert_allclose(N(got), want, atol=2e-5, rtol=2e-5)
