"""The Triton attention kernel reading float8_e4m3fn caches itself (FP8: bytes decoded by
integer ops, k_scale folded into the logits' scale, v_scale applied to the output) under
TRITON_INTERPRET=1, against prefixkv.paged.reference with k_scale/v_scale: decode, prefill,
mixed, split-KV, window, soft cap, non-causal, the cascade (unsplit and split prefix pass),
sinks and the torch frontend's routing (fp8 caches and scales straight to the kernel, no
dequantized copy), every byte value decoded exactly, and NaN bytes in every slot that must not
be read. Run in a subprocess by tests/test_fp8_triton_attention.py (skipped when collected
without the variable)."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (tests/test_fp8_triton_attention.py starts it)",
                allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import ml_dtypes  # noqa: E402
from prefixkv.kernels.triton import attention as tattn  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.spec import default_scale  # noqa: E402
from torch_convert import TORCH_DTYPE as TD  # noqa: E402
from torch_convert import N, T  # noqa: E402

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
#: lse tolerances per q dtype (as tests/test_fp8.py)
LSE_TOLERANCE = {"float32": dict(atol=1e-4, rtol=1e-5), "float16": dict(atol=5e-3, rtol=2e-3),
                 "bfloat16": dict(atol=3e-2, rtol=1e-2)}


def _t8(x):
    return torch.from_numpy(np.asarray(x).view(np.uint8).copy()).view(torch.float8_e4m3fn)


def _scale(kind, value):
    """None, a 0-d or a 1-element float32 tensor (what the frontend hands the kernel)."""
    if kind == "none":
        return None
    return torch.tensor(value if kind == "0d" else [value], dtype=torch.float32)


def _fp8_caches(b, k_scale, v_scale):
    """b's caches quantized (NaN slots -> NaN bytes 0x7f), three times as many blocks more,
    all 0xff (NaN), named by no table; table entries past each sequence's blocks name one of
    those NaN blocks: a read of any slot outside the keys shows as NaN."""
    kq = ref.quantize_fp8_reference(b.k_cache, k_scale)
    vq = ref.quantize_fp8_reference(b.v_cache, v_scale)
    num_blocks = kq.shape[0]
    nan = np.full((3 * num_blocks, *kq.shape[1:]), 0xFF, np.uint8).view(F8)
    kq, vq = np.concatenate([kq, nan]), np.concatenate([vq, nan])
    tables = b.block_tables.copy()
    used = -(-np.asarray(b.kv_lens) // b.block_size)
    tables[np.arange(tables.shape[1])[None, :] >= used[:, None]] = num_blocks + 1
    return kq, vq, tables


CASES = [  # grid, block_size, hq, hkv, head_dim, dtype, options, num_splits, scale kinds
    ("decode", 8, 4, 2, 16, "float32", {}, None, ("0d", "1elem")),
    ("decode", 4, 8, 2, 16, "bfloat16", {"logits_soft_cap": 2.0}, 2, ("0d", "0d")),
    ("decode", 7, 6, 2, 20, "float16", {"sliding_window": 5}, 3, ("none", "0d")),
    ("mixed", 4, 4, 1, 16, "float32", {"sliding_window": 3}, None, ("0d", "none")),
    ("prefill_with_prefix", 8, 2, 2, 16, "bfloat16", {}, None, ("1elem", "1elem")),
    ("prefill", 4, 4, 2, 16, "float32", {"causal": False}, None, ("0d", "0d")),
    ("mixed", 16, 4, 4, 32, "float16", {"scale": 0.2, "logits_soft_cap": 1.5}, None,
     ("none", "none")),
    ("mixed", 8, 66, 2, 16, "float32", {"logits_soft_cap": 2.0}, None, ("0d", "0d")),
    ("decode", 4, 40, 1, 16, "float32", {"sliding_window": 6}, 2, ("0d", "0d")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-bs{c[1]}-{c[5]}-s{c[7]}-"
                         f"{'-'.join(c[6]) or 'plain'}")
def test_paged_attention_kernel_reads_fp8(case, full_tiles):
    grid, bs, hq, hkv, d, dtype, opts, splits, (kk, vk) = case
    rng = np.random.default_rng(bs * hq + d)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    ks, vs = (None if kk == "none" else 0.03), (None if vk == "none" else 0.07)
    kq, vq, tables = _fp8_caches(b, ks, vs)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, tables, *b.args()[4:],
                                                   k_scale=ks, v_scale=vs, return_lse=True,
                                                   **opts)
    assert not np.isnan(want).any()
    q, bt, kv, cu = (None if a is None else T(a) for a in (b.q, tables, *b.args()[4:]))
    out = torch.full(q.shape, float("nan"), dtype=TD[dtype])
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, _t8(kq), _t8(vq), bt, kv, cu,
                          scale=opts.get("scale", default_scale(d)),
                          causal=opts.get("causal", True),
                          sliding_window=opts.get("sliding_window"),
                          logits_soft_cap=opts.get("logits_soft_cap"), num_splits=splits,
                          k_scale=_scale(kk, 0.03), v_scale=_scale(vk, 0.07))
    testing.assert_attention_close(N(out), want, dtype)
    np.testing.assert_allclose(N(lse), want_lse, **LSE_TOLERANCE[dtype])


def test_stacked_fp8_cache_views():
    """K and V halves of one stacked [num_blocks, 2, ...] fp8 buffer (strided views)."""
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    kq, vq, tables = _fp8_caches(b, 0.5, 2.0)
    want = ref.paged_attention_reference(b.q, kq, vq, tables, *b.args()[4:], k_scale=0.5,
                                         v_scale=2.0)
    stacked = torch.stack([_t8(kq), _t8(vq)], dim=1)
    out = torch.full(b.q.shape, float("nan"))
    tattn.paged_attention(out, None, T(b.q), stacked[:, 0], stacked[:, 1], T(tables),
                          *(T(a) for a in b.args()[4:]), scale=default_scale(16), causal=True,
                          sliding_window=None, logits_soft_cap=None,
                          k_scale=_scale("0d", 0.5), v_scale=_scale("0d", 2.0))
    testing.assert_attention_close(N(out), want, "float32")


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
def test_every_byte_decodes_exactly(q_dtype):
    """256 decode sequences of one key each. K: key s holds byte s at dim 0, byte 0 elsewhere;
    q = e_0, scale 1, k_scale 2^-4: the logit, and so lse, is decode(s) / 16 exactly (NaN for
    0x7f/0xff). V: every dim of value s holds byte s, K all zero: out = decode(s) / 8 exactly
    (v_scale 2^-3). Against ml_dtypes' float8_e4m3fn decode, bit for bit."""
    n, d = 256, 16
    byte = np.arange(n, dtype=np.uint8)
    want = byte.view(F8).astype(np.float32)
    kq = np.zeros((n, 1, 1, d), np.uint8)
    kq[:, 0, 0, 0] = byte
    vq = np.repeat(byte[:, None], d, 1).reshape(n, 1, 1, d)
    zero = np.zeros_like(vq)
    q = np.zeros((n, 1, d), np.float32)
    q[:, 0, 0] = 1.0
    tables = np.arange(n, dtype=np.int32)[:, None]
    lens = np.ones(n, np.int32)
    qt = T(q).to(TD[q_dtype])
    for k_bytes, v_bytes in ((kq, zero), (zero, vq)):
        out = torch.full(qt.shape, float("nan"), dtype=TD[q_dtype])
        lse = torch.full(qt.shape[:2], float("nan"))
        tattn.paged_attention(out, lse, qt, _t8(k_bytes.view(F8)), _t8(v_bytes.view(F8)),
                              T(tables), T(lens), None, scale=1.0, causal=True,
                              sliding_window=None, logits_soft_cap=None, num_splits=1,
                              k_scale=_scale("0d", 2.0 ** -4), v_scale=_scale("0d", 2.0 ** -3))
        if k_bytes is kq:  # (a NaN logit's row is unspecified: a NaN key is never cached)
            finite = ~np.isnan(want)
            np.testing.assert_array_equal(N(lse)[finite, 0], want[finite] / 16)
        else:
            np.testing.assert_array_equal(N(lse)[:, 0], 0.0)
            exact = np.repeat((want / 8)[:, None], d, 1)
            np.testing.assert_array_equal(N(out.float())[:, 0], exact.astype(
                np.float32 if q_dtype == "float32" else ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("decode,split", [(True, False), (False, False), (True, True)],
                         ids=["decode", "ragged", "decode-split-prefix"])
def test_cascade_reads_fp8(decode, split, monkeypatch):
    rng = np.random.default_rng(5)
    seqs = [(0, 1, 5), (2, 1, 3), (-1, 1, 4), (0, 1, 9), (1, 1, 1)] if decode else \
        [(0, 2, 3), (1, 1, 6), (-1, 3, 4), (0, 1, 1)]
    b = testing.make_shared_prefix_batch(rng, [2, 1, 3] if decode else [3, 2], seqs,
                                         num_q_heads=4, num_kv_heads=2, head_dim=16,
                                         block_size=4)
    kq, vq = (ref.quantize_fp8_reference(c, s) for c, s in ((b.k_cache, 0.25), (b.v_cache, 4.0)))
    nan = np.full((2 * kq.shape[0], *kq.shape[1:]), 0x7F, np.uint8).view(F8)
    kq, vq = np.concatenate([kq, nan]), np.concatenate([vq, nan])
    a = b.args()
    want, want_lse = ref.shared_prefix_attention_reference(a[0], kq, vq, *a[3:], k_scale=0.25,
                                                           v_scale=4.0, return_lse=True)
    if split:  # the prefix pass split over the keys (as many queries over a long prefix do)
        monkeypatch.setattr(tattn, "_prefix_splits", lambda *args: 2)
    args = [None if x is None else T(x) for x in a]
    out = torch.full(args[0].shape, float("nan"))
    lse = torch.full(args[0].shape[:2], float("nan"))
    tattn.shared_prefix_attention(out, lse, args[0], _t8(kq), _t8(vq), *args[3:],
                                  scale=default_scale(16), logits_soft_cap=None,
                                  k_scale=_scale("0d", 0.25), v_scale=_scale("1elem", 4.0))
    testing.assert_attention_close(N(out), want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, **LSE_TOLERANCE["float32"])


@pytest.fixture(scope="module")
def interp_backend():
    """The Triton kernels registered for CPU tensors as backend "triton-interp" (as in
    tests/_triton_interp_cases.py), so the torch frontend runs in front of them as on a GPU."""
    from prefixkv.paged.registry import Backend
    from prefixkv.torch_frontend import _registry

    for op, impl in _registry._TRITON_IMPL.items():
        reg = _registry.REGISTRIES[op]
        if "triton-interp" not in reg.names():
            reg.register(Backend("triton-interp", ("cpu",), impl, priority=-1))
    return "triton-interp"


@pytest.fixture
def no_dequantize(monkeypatch):
    """Fails any dequantized copy of an fp8 cache in the torch frontend."""
    from prefixkv.torch_frontend import _native, _ops

    def refuse(*args, **kwargs):
        raise AssertionError("the fp8 caches were dequantized, not read by the kernel")

    monkeypatch.setattr(_ops, "_dequantized_blocks", refuse)
    monkeypatch.setattr(_native, "_dequantized_blocks", refuse)
    monkeypatch.setattr(_native, "_dequantize", refuse)


@pytest.mark.parametrize("grid", ["decode", "mixed"])
def test_frontend_hands_fp8_caches_to_the_kernel(grid, interp_backend, no_dequantize):
    """paged_attention on the triton backend: fp8 caches and scales (float, 0-d, 1-element)
    straight to the kernel, with sinks, out=/lse= and a workspace of attention_workspace_size
    bytes (the same size as for a cache in q's dtype)."""
    import prefixkv.torch_frontend as tf

    be = interp_backend
    rng = np.random.default_rng(43)
    sinks_np = np.linspace(-3.0, 5.0, 4).astype(np.float32)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4, sliding_window=7)
    kq, vq, tables = _fp8_caches(b, 0.02, 0.05)
    want, want_lse = ref.paged_attention_reference(b.q, kq, vq, tables, *b.args()[4:],
                                                   k_scale=0.02, v_scale=0.05, sinks=sinks_np,
                                                   sliding_window=7, return_lse=True)
    q, bt, kv, cu = (None if a is None else T(a) for a in (b.q, tables, *b.args()[4:]))
    k8, v8 = _t8(kq), _t8(vq)
    got, lse = tf.paged_attention(q, k8, v8, bt, kv, cu, k_scale=0.02,
                                  v_scale=torch.tensor([0.05]), sinks=T(sinks_np),
                                  sliding_window=7, return_lse=True, backend=be)
    testing.assert_attention_close(N(got), want, "float32")
    np.testing.assert_allclose(N(lse), want_lse, **LSE_TOLERANCE["float32"])
    size = tf.attention_workspace_size(q, k8, bt, cu, backend=be)
    assert size == tf.attention_workspace_size(q, torch.empty(k8.shape), bt, cu, backend=be)
    ws = torch.full((size,), 0xAB, dtype=torch.uint8)
    out = torch.full(q.shape, float("nan"))
    tf.paged_attention(q, k8, v8, bt, kv, cu, k_scale=torch.tensor(0.02), v_scale=0.05,
                       sinks=T(sinks_np), sliding_window=7, out=out, workspace=ws, backend=be)
    testing.assert_attention_close(N(out), want, "float32")


@pytest.mark.parametrize("window", [None, 6], ids=["no_window", "window"])
def test_frontend_cascade_hands_fp8_caches_to_the_kernel(window, interp_backend,
                                                         no_dequantize):
    import prefixkv.torch_frontend as tf

    be = interp_backend
    rng = np.random.default_rng(44)
    b = testing.make_shared_prefix_batch(
        rng, [2, 1], [(0, 1, 5), (1, 2, 3), (-1, 1, 4), (0, 3, 9)],
        num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    kq, vq = (ref.quantize_fp8_reference(c, 0.5) for c in (b.k_cache, b.v_cache))
    sinks_np = np.linspace(-1.0, 2.0, 4).astype(np.float32)
    a = b.args()
    want = ref.shared_prefix_attention_reference(a[0], kq, vq, *a[3:], k_scale=0.5,
                                                 v_scale=0.5, sinks=sinks_np,
                                                 sliding_window=window)
    args = [None if x is None else T(x) for x in a]
    got = tf.shared_prefix_attention(args[0], _t8(kq), _t8(vq), *args[3:], k_scale=0.5,
                                     v_scale=torch.tensor(0.5), sinks=T(sinks_np),
                                     sliding_window=window, backend=be)
    testing.assert_attention_close(N(got), want, "float32")
    q = args[0]
    size = tf.attention_workspace_size(q, _t8(kq), args[6], args[8],
                                       prefix_block_tables=args[3], backend=be)
    ws = torch.full((size,), 0xAB, dtype=torch.uint8)
    out = torch.full(q.shape, float("nan"))
    tf.shared_prefix_attention(args[0], _t8(kq), _t8(vq), *args[3:], k_scale=0.5, v_scale=0.5,
                               sinks=T(sinks_np), sliding_window=window, out=out, workspace=ws,
                               backend=be)
    testing.assert_attention_close(N(out), want, "float32")


def test_frontend_fp8_under_torch_compile(interp_backend, no_dequantize):
    """torch.compile(fullgraph=True): the scales (tensors) reach the kernel as arguments of the
    custom ops, the fp8 caches are not dequantized in the graph or in the op."""
    import prefixkv.torch_frontend as tf

    rng = np.random.default_rng(45)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    kq, vq, tables = _fp8_caches(b, 0.5, 0.25)
    want = ref.paged_attention_reference(b.q, kq, vq, tables, *b.args()[4:], k_scale=0.5,
                                         v_scale=0.25)
    q, bt, kv, cu = (T(a) for a in (b.q, tables, *b.args()[4:]))

    def step(q, k, v, ks, vs):
        return tf.paged_attention(q, k, v, bt, kv, cu, k_scale=ks, v_scale=vs,
                                  backend=interp_backend)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(
        q, _t8(kq), _t8(vq), torch.tensor(0.5), torch.tensor([0.25]))
    testing.assert_attention_close(N(got), want, "float32")
