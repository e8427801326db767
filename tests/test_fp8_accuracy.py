"""fp8 (float8_e4m3fn) attention accuracy of the paths that dequantize: 16-bit q over fp8 caches
with vLLM-like scales (k_scale 0.05, v_scale 0.02: e4m3 values of a few hundred) and keys of
std 3 (logits up to ~30) stay within ATTENTION_TOLERANCE[q's dtype] of the numpy reference
(within HEADROOM of it), out and lse, with sinks, over several seeds. These paths read the
blocks as their exact e4m3 values in q's dtype, fold k_scale into the logits' scale and
multiply the float32 output by v_scale, as the Triton kernel does; dequantizing into q's
dtype with the scales applied rounded every scaled key, and a bfloat16 q fell outside the
tolerance (logits ~30 moved by ~0.06).

Covered: the torch backend on the CPU (a long prefill's fused-kernel tiles and its padded
tiles, the padded batch of a group, a mixed batch, the cascade's own and prefix passes, the
dissolved cascade), JAX's XLA path under jit (reads the fp8 bytes in float32; a guard) and
JAX's dequantizing fallback for the TPU kernel's shapes that read no fp8 (concrete scales);
float32 q; scales None (or 1.0) giving what they gave before, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from prefixkv.paged import reference as ref
from prefixkv.paged import testing
from prefixkv.paged.spec import ATTENTION_TOLERANCE

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
K_SCALE, V_SCALE = 0.05, 0.02
KEY_STD = 3.0
SEEDS = range(4)
#: lse tolerances per q dtype (tests/test_fp8.py's)
LSE_TOLERANCE = {"float32": dict(atol=1e-4, rtol=1e-5), "float16": dict(atol=5e-3, rtol=2e-3),
                 "bfloat16": dict(atol=3e-2, rtol=1e-2)}
HQ, HKV, D, BS = 8, 2, 64, 16
#: Fraction of the tolerances the checks allow: these paths are exact up to float32 arithmetic
#: and q's dtype's rounding of the output (measured here: at most ~0.3 of ATTENTION_TOLERANCE);
#: the rounded scaled keys they replaced reached 0.6-1.4 of it on these batches, past it on
#: some seeds only, so a check at the full tolerance would need many more seeds to tell them
#: apart.
HEADROOM = 0.5

#: (name, seqs (q_len, kv_len), options): the torch CPU routes a 16-bit q takes
TORCH_CASES = [
    # a long prefill next to decodes: the decodes by the compiled kernel (reads fp8 itself),
    # the prefill in tiles of torch's fused CPU kernel (_flash_prefill_tile)
    ("mixed", [(1, 45), (40, 60), (1, 30), (48, 96), (1, 70)], {}),
    ("prefill", [(96, 160)], {}),
    # a window: the prefill group as a padded batch (_attend_padded), the decodes as a group
    ("mixed_window", [(1, 45), (40, 60), (1, 30), (48, 96)], {"sliding_window": 40}),
    # a soft cap: no fused kernel, groups padded
    ("mixed_soft_cap", [(1, 45), (40, 60), (20, 30)], {"logits_soft_cap": 30.0}),
    # past PREFILL_Q_TILE with a window: the padded tiles of _tiled_prefill
    ("prefill_window_tiles", [(300, 330)], {"sliding_window": 100}),
    ("mixed_non_causal", [(1, 45), (40, 60), (20, 30)], {"causal": False}),
]
TORCH_IDS = [c[0] for c in TORCH_CASES]


def _batch(seed: int, seqs, dtype: str, window=None):
    """(batch, fp8 k cache, fp8 v cache): keys of std KEY_STD, NaN (0x7f) in every slot no query
    may read, quantized with K_SCALE / V_SCALE."""
    rng = np.random.default_rng(1000 + seed)
    b = testing.make_ragged_batch(rng, seqs, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                  block_size=BS, dtype=dtype, sliding_window=window)
    kq = ref.quantize_fp8_reference(b.k_cache.astype(np.float32) * KEY_STD, K_SCALE)
    vq = ref.quantize_fp8_reference(b.v_cache.astype(np.float32), V_SCALE)
    return b, kq, vq


def _sinks():
    return np.linspace(-1.0, 4.0, HQ).astype(np.float32)


def _check(out, lse, want, want_lse, dtype: str, failures: list, what: str) -> None:
    """Collects (rather than raises) outputs past HEADROOM of ATTENTION_TOLERANCE[dtype] (and
    lse past HEADROOM of LSE_TOLERANCE[dtype]), so that a failure reports every seed."""
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    out = np.asarray(out, np.float64)
    want = np.asarray(want, np.float64)
    assert not np.isnan(out).any(), f"{what}: NaN in the output"
    worst = float((np.abs(out - want) / (atol + rtol * np.abs(want))).max(initial=0.0))
    if worst > HEADROOM:
        failures.append(f"{what}: out error {worst:.2f} x ATTENTION_TOLERANCE (max |err| "
                        f"{np.abs(out - want).max():.4g})")
    if lse is not None:
        lt = LSE_TOLERANCE[dtype]
        lse, want_lse = np.asarray(lse, np.float64), np.asarray(want_lse, np.float64)
        assert (np.isneginf(lse) == np.isneginf(want_lse)).all(), what
        fin = np.isfinite(want_lse)
        err = np.abs(lse[fin] - want_lse[fin]) / (lt["atol"] + lt["rtol"] * np.abs(want_lse[fin]))
        if err.max(initial=0.0) > HEADROOM:
            failures.append(f"{what}: lse error {err.max():.2f} x {lt}")


# ------------------------------------------------------------------------------------- torch


def _t8(x):
    import torch

    return torch.from_numpy(np.asarray(x).view(np.uint8).copy()).view(torch.float8_e4m3fn)


def _torch_scale(i: int, value: float):
    """The scales' three forms, one per seed: a float, a 0-d and a 1-element float32 tensor."""
    import torch

    return [value, torch.tensor(value), torch.tensor([value])][i % 3]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name,seqs,opts", TORCH_CASES, ids=TORCH_IDS)
def test_torch_cpu_fp8_attention_within_tolerance(name, seqs, opts, dtype):
    pytest.importorskip("torch")
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    failures = []
    for seed in SEEDS:
        b, kq, vq = _batch(seed, seqs, dtype, opts.get("sliding_window"))
        sinks = _sinks() if seed % 2 else None
        want, want_lse = ref.paged_attention_reference(
            b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens, k_scale=K_SCALE,
            v_scale=V_SCALE, return_lse=True, sinks=sinks, **opts)
        out, lse = tf.paged_attention(
            T(b.q), _t8(kq), _t8(vq), T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens),
            k_scale=_torch_scale(seed, K_SCALE), v_scale=_torch_scale(seed + 1, V_SCALE),
            return_lse=True, sinks=T(sinks), **opts)
        _check(out.float().numpy(), lse.numpy(), want, want_lse, dtype, failures,
               f"seed {seed}")
    assert not failures, failures


def _torch_shared_prefix_case(seed: int, dtype: str, decode: bool):
    rng = np.random.default_rng(2000 + seed)
    own = [(0, 1 if decode else 3, 5), (1, 1 if decode else 9, 20), (-1, 1 if decode else 2, 7),
           (0, 1 if decode else 17, 33), (0, 1, 4)]
    b = testing.make_shared_prefix_batch(rng, [4, 3], own, num_q_heads=HQ, num_kv_heads=HKV,
                                         head_dim=D, block_size=BS, dtype=dtype, decode=decode)
    kq = ref.quantize_fp8_reference(b.k_cache.astype(np.float32) * KEY_STD, K_SCALE)
    vq = ref.quantize_fp8_reference(b.v_cache.astype(np.float32), V_SCALE)
    return b, kq, vq


@pytest.mark.parametrize("route", ["cascade", "dissolved", "soft_cap"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cpu_fp8_shared_prefix_within_tolerance(route, decode, dtype, monkeypatch):
    """The cascade with its prefix pass (thresholds lowered so every group keeps one), the
    dissolved one (one paged pass over the joined tables), and a soft cap (the padded path)."""
    pytest.importorskip("torch")
    from prefixkv.torch_frontend import _native
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    if route == "cascade":
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 1)
    else:
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 1 << 30)
    cap = 30.0 if route == "soft_cap" else None
    failures = []
    for seed in SEEDS:
        b, kq, vq = _torch_shared_prefix_case(seed, dtype, decode)
        sinks = _sinks() if seed % 2 else None
        a = b.args()
        want, want_lse = ref.shared_prefix_attention_reference(
            a[0], kq, vq, *a[3:], k_scale=K_SCALE, v_scale=V_SCALE, return_lse=True,
            sinks=sinks, logits_soft_cap=cap)
        args = [None if x is None else T(x) for x in a]
        out, lse = tf.shared_prefix_attention(
            args[0], _t8(kq), _t8(vq), *args[3:], k_scale=_torch_scale(seed, K_SCALE),
            v_scale=_torch_scale(seed + 1, V_SCALE), return_lse=True, sinks=T(sinks),
            logits_soft_cap=cap)
        _check(out.float().numpy(), lse.numpy(), want, want_lse, dtype, failures,
               f"seed {seed}")
    assert not failures, failures


@pytest.mark.parametrize("name,seqs,opts", [c for c in TORCH_CASES if "window" not in c[0]]
                         + [("decode", [(1, 45), (1, 30)], {})],
                         ids=[c[0] for c in TORCH_CASES if "window" not in c[0]] + ["decode"])
def test_torch_cpu_fp8_without_scales_unchanged(name, seqs, opts):
    """Scales None read the e4m3 values as before: the same output, bit for bit, as scales
    1.0, and (every route but the compiled decode kernel's) as a bfloat16 cache holding those
    values (what the fp8 paths dequantize into)."""
    torch = pytest.importorskip("torch")
    from torch_convert import T

    from prefixkv import torch_frontend as tf

    b, kq, vq = _batch(0, seqs, "bfloat16")
    kq = ref.quantize_fp8_reference(kq.astype(np.float32) * 20)  # e4m3 values of up to ~200
    vq = ref.quantize_fp8_reference(vq.astype(np.float32) * 20)
    meta = [T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens)]
    none = tf.paged_attention(T(b.q), _t8(kq), _t8(vq), *meta, return_lse=True, **opts)
    ones = tf.paged_attention(T(b.q), _t8(kq), _t8(vq), *meta, k_scale=1.0,
                              v_scale=torch.tensor(1.0), return_lse=True, **opts)
    assert torch.equal(none[0], ones[0]) and torch.equal(none[1], ones[1])
    if name != "decode":
        kb, vb = (_t8(c).to(torch.bfloat16) for c in (kq, vq))
        as_bf16 = tf.paged_attention(T(b.q), kb, vb, *meta, return_lse=True, **opts)
        assert torch.equal(none[0], as_bf16[0]) and torch.equal(none[1], as_bf16[1])
    want = ref.paged_attention_reference(b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens,
                                         **opts)
    testing.assert_attention_close(none[0].float().numpy(), want, "bfloat16")


# --------------------------------------------------------------------------------------- JAX


#: on a CPU the sequences of up to _xla.CPU_RAGGED_DECODE_16BIT_MAX_Q tokens run in the
#: compiled decode kernel (reads the fp8 bytes), longer ones in the XLA loop
JAX_CASES = [c for c in TORCH_CASES if c[0] in ("mixed", "prefill", "mixed_window",
                                                  "mixed_soft_cap")] + [
    ("mixed_long", [(1, 45), (64, 96), (1, 30), (3, 20)], {})]


@pytest.mark.parametrize("dtype,traced", [("bfloat16", True), ("float16", False)],
                         ids=["bfloat16-traced_scales", "float16-float_scales"])
@pytest.mark.parametrize("name,seqs,opts", JAX_CASES, ids=[c[0] for c in JAX_CASES])
def test_jax_xla_fp8_attention_within_tolerance(name, seqs, opts, dtype, traced):
    """The XLA path under jit (reads the fp8 bytes, converted to float32 and scaled there).
    The scales (traced arrays or Python floats) are float32 whatever q's dtype: each dtype
    runs with one kind of scale."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from prefixkv import jax_frontend as jf

    def run(q, k, v, tables, kv_lens, cu, sinks, ks, vs):
        return jf.paged_attention(q, k, v, tables, kv_lens, cu, return_lse=True, sinks=sinks,
                                  k_scale=ks if traced else K_SCALE,
                                  v_scale=vs if traced else V_SCALE, backend="xla", **opts)

    fn = jax.jit(run)
    failures = []
    for seed in SEEDS:
        b, kq, vq = _batch(seed, seqs, dtype, opts.get("sliding_window"))
        sinks = _sinks()
        want, want_lse = ref.paged_attention_reference(
            b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens, k_scale=K_SCALE,
            v_scale=V_SCALE, return_lse=True, sinks=sinks, **opts)
        out, lse = fn(b.q, kq, vq, b.block_tables, b.kv_lens, b.cu_q_lens, sinks,
                      jnp.float32(K_SCALE), jnp.float32(V_SCALE))
        _check(np.asarray(out.astype(jnp.float32)), lse, want, want_lse, dtype, failures,
               f"seed {seed}")
    assert not failures, failures


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
def test_jax_xla_fp8_shared_prefix_within_tolerance(decode):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from prefixkv import jax_frontend as jf

    failures = []
    for seed in SEEDS:
        b, kq, vq = _torch_shared_prefix_case(seed, "bfloat16", decode)
        a = b.args()
        want, want_lse = ref.shared_prefix_attention_reference(
            a[0], kq, vq, *a[3:], k_scale=K_SCALE, v_scale=V_SCALE, return_lse=True)
        fn = jax.jit(lambda q, k, v, ks, vs, a=a: jf.shared_prefix_attention(
            q, k, v, *a[3:], k_scale=ks, v_scale=vs, return_lse=True, backend="xla"))
        out, lse = fn(a[0], kq, vq, jnp.float32(K_SCALE), jnp.float32(V_SCALE))
        _check(np.asarray(out.astype(jnp.float32)), lse, want, want_lse, "bfloat16", failures,
               f"seed {seed}")
    assert not failures, failures


@pytest.mark.parametrize("traced", [False, True], ids=["host_scales", "traced_scales"])
@pytest.mark.parametrize("op", ["paged", "shared_prefix"])
def test_jax_dequantizing_fallback_within_tolerance(op, traced, monkeypatch):
    """The TPU kernel's shapes that read no fp8 (block_size * num_kv_heads not whole 32-row
    8-bit tiles: 16 x 1 here) get the named blocks dequantized by the frontend as their exact
    e4m3 values; the kernel applies k_scale and v_scale in float32 (SMEM scales), given as
    floats or traced (a jitted model's parameters). Run by the TPU interpreter (backend
    pallas_interpret)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("jax.experimental.pallas.tpu")
    import jax.numpy as jnp
    from prefixkv.jax_frontend import _ops
    from prefixkv.kernels.pallas import paged_attention as pa

    from prefixkv import jax_frontend as jf

    assert not pa.tpu_reads_fp8(num_kv_heads=1, block_size=16, xla_layout=False)
    calls = []
    real = _ops._dequantized_blocks
    monkeypatch.setattr(_ops, "_dequantized_blocks", lambda *a: calls.append(1) or real(*a))
    failures = []
    for seed in range(3):
        rng = np.random.default_rng(3000 + seed)
        if op == "paged":
            b = testing.make_ragged_batch(rng, [(40, 60), (1, 30), (5, 45)], num_q_heads=4,
                                          num_kv_heads=1, head_dim=128, block_size=16,
                                          dtype="bfloat16")
            tail = b.args()[3:]
        else:
            b = testing.make_shared_prefix_batch(rng, [3, 2], [(0, 9, 20), (1, 1, 7),
                                                               (0, 17, 17)],
                                                 num_q_heads=4, num_kv_heads=1, head_dim=128,
                                                 block_size=16, dtype="bfloat16")
            tail = b.args()[3:]
        kq = ref.quantize_fp8_reference(b.k_cache.astype(np.float32) * KEY_STD, K_SCALE)
        vq = ref.quantize_fp8_reference(b.v_cache.astype(np.float32), V_SCALE)
        fn = jf.paged_attention if op == "paged" else jf.shared_prefix_attention
        reference = (ref.paged_attention_reference if op == "paged"
                     else ref.shared_prefix_attention_reference)
        want, want_lse = reference(b.q, kq, vq, *tail, k_scale=K_SCALE, v_scale=V_SCALE,
                                   return_lse=True)
        scales = (np.float32(K_SCALE), np.float32(V_SCALE))
        if traced:
            run = jax.jit(lambda q, k, v, ks, vs, tail=tail, fn=fn: fn(
                q, k, v, *tail, k_scale=ks, v_scale=vs, return_lse=True,
                backend="pallas_interpret"))
        else:
            run = jax.jit(lambda q, k, v, ks, vs, tail=tail, fn=fn: fn(
                q, k, v, *tail, k_scale=K_SCALE, v_scale=V_SCALE, return_lse=True,
                backend="pallas_interpret"))
        out, lse = run(b.q, kq, vq, *scales)
        _check(np.asarray(out.astype(jnp.float32)), lse, want, want_lse, "bfloat16", failures,
               f"seed {seed}")
    assert calls, "expected the dequantizing path"
    assert not failures, failures
