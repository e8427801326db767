"""Every JAX op with 64-bit mode on (``jax_enable_x64``, common in stacks that need int64 ids
or float64 elsewhere): eager and under jit, the default backends and the Pallas kernels in
interpret mode, against the numpy reference. A subprocess: x64 is process-wide, fixed before
the first array is made. (A Python int in a kernel's ``lax.div`` is int64 there, and lax
ops take no mixed dtypes: write_kv failed to trace, even on a CPU, where
``platform_dependent`` traces the TPU branch too.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("jax")

_SCRIPT = r"""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from prefixkv import jax_frontend as jf
from prefixkv.paged import testing
from prefixkv.paged import reference as ref

rng = np.random.default_rng(0)
bs = 16
rb = testing.make_ragged_batch(rng, [(1, 40), (7, 7), (3, 20)], num_q_heads=4, num_kv_heads=2,
                               head_dim=128, block_size=bs, sliding_window=9)
args = [jnp.asarray(a) for a in rb.args()]
want = ref.paged_attention_reference(*rb.args(), sliding_window=9)
dec = testing.make_ragged_batch(rng, [(1, 40), (1, 3)], num_q_heads=4, num_kv_heads=2,
                                head_dim=128, block_size=bs)
dargs = [jnp.asarray(a) for a in dec.args()[:5]]
dwant = ref.paged_attention_reference(*dec.args())
kc = rng.standard_normal((6, bs, 2, 128)).astype(np.float32)
vc = rng.standard_normal((6, bs, 2, 128)).astype(np.float32)
key = rng.standard_normal((3, 2, 128)).astype(np.float32)
slots = np.array([5, -1, 3 * bs + 2], np.int32)
kw_want, vw_want = ref.write_kv_reference(key, key, kc, vc, slots)
ids = np.array([4, 1], np.int32)
g_want = ref.gather_blocks_reference([kc, vc], ids)
c_want = ref.copy_blocks_reference([kc, vc], np.array([1], np.int32), np.array([2], np.int32))
s_want = ref.scatter_blocks_reference([kc, vc], g_want[:, ::-1], ids)
tokens = np.arange(48, dtype=np.int32)
h_want = jf.hash_blocks(tokens, bs, salt="s", backend="host")


def close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-5, rtol=2e-5)


def same(got, want):
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(w))


J = lambda *a: [jnp.asarray(x) for x in a]  # noqa: E731
for backend in (None, "pallas_interpret"):
    b = {} if backend is None else {"backend": backend}
    for mode, f in (("eager", lambda g: g), ("jit", jax.jit)):
        same(f(lambda *a: jf.write_kv(*a, **b))(*J(key, key, kc, vc, slots)), (kw_want, vw_want))
        same(f(lambda c, s, d: jf.copy_blocks(c, s, d, **b))(
            J(kc, vc), *J(np.array([1], np.int32), np.array([2], np.int32))), c_want)
        same([f(lambda c, i: jf.gather_blocks(c, i, **b))(J(kc, vc), jnp.asarray(ids))],
             [g_want])
        same(f(lambda c, x, i: jf.scatter_blocks(c, x, i, **b))(
            J(kc, vc), *J(g_want[:, ::-1], ids)), s_want)
        print("cache ops", backend, mode)
for backend in (None, "pallas_interpret", "pallas_gpu_interpret"):
    b = {} if backend is None else {"backend": backend}
    for mode, f in (("eager", lambda g: g), ("jit", jax.jit)):
        close(f(lambda *a: jf.paged_attention(*a, sliding_window=9, **b))(*args), want)
        close(f(lambda *a: jf.paged_attention(*a, **b))(*dargs), dwant)
        print("attention", backend, mode)
# fp8 caches with a Python float scale passed to the jitted function: weakly typed float64
# under x64, taken as float32 (it was refused: "k_scale: expected float32, got float64")
k8 = ref.quantize_fp8_reference(kc, 0.5)
f8_want = ref.write_kv_reference(key, key, k8, k8, slots, k_scale=0.5, v_scale=0.5)
same(jax.jit(lambda *a, s: jf.write_kv(*a, k_scale=s, v_scale=s))(
    *J(key, key, k8, k8, slots), s=0.5), f8_want)
close(jax.jit(lambda *a, s: jf.paged_attention(*a, k_scale=s, v_scale=s))(
    *J(*dec.args()[:1]), *J(*(ref.quantize_fp8_reference(c, 0.5) for c in dec.args()[1:3])),
    *J(*dec.args()[3:5]), s=0.5),
    ref.paged_attention_reference(dec.args()[0],
                                  *(ref.quantize_fp8_reference(c, 0.5) for c in dec.args()[1:3]),
                                  *dec.args()[3:5], k_scale=0.5, v_scale=0.5))
print("fp8 scales")
# a prefill long enough for the CPU's per-(kv head, tile) loop, whose dynamic_slice had mixed
# int32 loop indices with Python 0s (int64 under x64) and failed to trace (found by a fuzzer)
pf = testing.make_ragged_batch(rng, [(64, 64)], num_q_heads=1, num_kv_heads=1, head_dim=8,
                               block_size=bs)
for mode, f in (("eager", lambda g: g), ("jit", jax.jit)):
    close(f(jf.paged_attention)(*J(*pf.args())), ref.paged_attention_reference(*pf.args()))
print("x64 prefill")
for mode, f in (("eager", lambda g: g), ("jit", jax.jit)):
    assert np.array_equal(np.asarray(f(lambda t: jf.hash_blocks(t, bs, salt="s"))(
        jnp.asarray(tokens))), np.asarray(h_want))
# the TPU kernels lowered for a TPU (jax.export, no TPU here): every Python int indexing a DMA
# buffer or semaphore was an int64 constant under x64, which Mosaic refuses (none lowered)
S = jax.ShapeDtypeStruct
q8 = S((4, 32, 128), jnp.bfloat16)
nhd, hnd = S((32, 16, 8, 128), jnp.bfloat16), S((32, 8, 16, 128), jnp.bfloat16)
i32, i64, tab = S((4,), jnp.int32), S((4,), jnp.int64), S((4, 8), jnp.int32)
fp8 = S((32, 16, 8, 128), jnp.float8_e4m3fn)
row = S((4, 8, 128), jnp.bfloat16)
tpu = {
    "attention NHD": (lambda *a: jf.paged_attention(*a), (q8, nhd, nhd, tab, i32)),
    "attention HND": (lambda *a: jf.paged_attention(*a, kv_layout="HND"),
                      (q8, hnd, hnd, tab, i32)),
    "attention fp8": (lambda *a: jf.paged_attention(*a, k_scale=0.5, v_scale=2.0),
                      (q8, fp8, fp8, tab, i32)),
    "write_kv int64 slots": (lambda *a: jf.write_kv(*a), (row, row, nhd, nhd, i64)),
    "gather_blocks": (lambda a, b, i: jf.gather_blocks([a, b], i), (nhd, nhd, i32)),
    "scatter_blocks": (lambda a, b, x, i: jf.scatter_blocks([a, b], x, i),
                       (nhd, nhd, S((4, 2, 16, 8, 128), jnp.bfloat16), i32)),
    "copy_blocks": (lambda a, b, i, j: jf.copy_blocks([a, b], i, j), (nhd, nhd, i32, i32)),
}
for name, (fn, shapes) in tpu.items():
    text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
    assert "tpu_custom_call" in text, name
print("tpu lowering")
print("OK")
"""


@pytest.mark.slow(seconds=40)
def test_every_op_with_x64_enabled():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
