"""Attention plans of the torch frontend (torch_frontend._plan): ``plan.run`` per layer gives the
wrapper's result exactly, checks the metadata only when planned, owns its metadata, and names
every argument it refuses."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing, validate  # noqa: E402
from prefixkv.paged.registry import BackendError  # noqa: E402
from torch_convert import TORCH_DTYPE, T, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

# (grid, block_size, num_q_heads, num_kv_heads, head_dim, dtype)
CASES = [
    ("decode", 16, 8, 2, 64, "float32"),
    ("decode", 8, 8, 8, 128, "bfloat16"),
    ("prefill", 16, 4, 1, 80, "float16"),
    ("mixed", 8, 8, 2, 64, "float32"),
    ("contexts", 7, 4, 1, 64, "float16"),
]
OPTIONS = [{}, {"sliding_window": 5, "logits_soft_cap": 3.0}, {"causal": False, "scale": 0.3}]


def _layers(b, dtype, n=3, seed=0):
    """n layers' (q, k_cache, v_cache) of batch ``b``'s shapes: the batch's own first."""
    rng = np.random.default_rng(seed)
    out = [(T(b.q), T(b.k_cache), T(b.v_cache))]
    for _ in range(n - 1):
        out.append(tuple(T(testing.random_values(rng, x.shape, dtype))
                         for x in (b.q, b.k_cache, b.v_cache)))
    return out


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_plan_runs_equal_the_wrapper_for_every_layer(case, opts):
    grid, bs, hq, hkv, d, dtype = case
    rng = np.random.default_rng(len(grid) * 131 + bs)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), num_q_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dtype,
                                  sliding_window=opts.get("sliding_window"))
    tables, lens, cu = T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens)
    layers = _layers(b, dtype)
    plan = tf.plan_paged_attention(tables, lens, cu, k_cache=layers[0][1], num_q_heads=hq,
                                   **opts)
    assert plan.op == "paged_attention"
    for q, k, v in layers:
        want, want_lse = tf.paged_attention(q, k, v, tables, lens, cu, return_lse=True, **opts)
        got, got_lse = plan.run(q, k, v, return_lse=True)
        _same(got, want)
        _same(got_lse, want_lse)
        _same(plan(q, k, v), want)
    want = ref.paged_attention_reference(*b.args(), **opts)
    close(plan.run(*layers[0]), want, dtype)


def test_plan_run_does_not_check_values_again(monkeypatch):
    """The point of a plan: its value checks ran when it was made; a run reads no metadata."""
    rng = np.random.default_rng(3)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 8), block_size=8)
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    plan = tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens), k_cache=k,
                                   num_q_heads=q.shape[1])
    want = plan.run(q, k, v)

    def refuse(*a, **kw):
        raise AssertionError("checked again")

    for name in ("check_ragged_values", "check_paged_attention_values", "check_paged_attention",
                 "check_cumulative_lens"):
        monkeypatch.setattr(validate, name, refuse)
    _same(plan.run(q, k, v), want)


def test_plan_keeps_its_own_metadata():
    """A plan copies the checked metadata: the caller's buffers refilled afterwards (an
    engine's persistent block table) change nothing."""
    rng = np.random.default_rng(4)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    tables, lens, cu = T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens)
    plan = tf.plan_paged_attention(tables, lens, cu, k_cache=k, num_q_heads=q.shape[1])
    want = tf.paged_attention(q, k, v, tables, lens, cu)
    tables.fill_(0)
    lens.copy_(lens.flip(0))
    _same(plan.run(q, k, v), want)


def test_plan_refuses_bad_metadata_when_made():
    rng = np.random.default_rng(5)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16))
    k = T(b.k_cache)
    tables = T(b.block_tables)
    tables[0, 0] = k.shape[0]
    with pytest.raises(ValueError, match="block_tables"):
        tf.plan_paged_attention(tables, T(b.kv_lens), k_cache=k, num_q_heads=b.q.shape[1])
    lens = T(b.kv_lens)
    lens[1] = -1
    with pytest.raises(ValueError, match="kv_lens"):
        tf.plan_paged_attention(T(b.block_tables), lens, k_cache=k, num_q_heads=b.q.shape[1])
    with pytest.raises(ValueError, match="sliding_window"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k,
                                num_q_heads=b.q.shape[1], sliding_window=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k,
                                num_q_heads=b.k_cache.shape[2] + 1)
    with pytest.raises(TypeError, match="num_q_heads"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k, num_q_heads=4.0)
    with pytest.raises(TypeError, match="k_cache"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=b.k_cache,
                                num_q_heads=4)
    with pytest.raises(TypeError, match="block_tables"):
        tf.plan_paged_attention(b.block_tables, T(b.kv_lens), k_cache=k, num_q_heads=4)
    with pytest.raises(TypeError, match="dtype"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k, num_q_heads=4,
                                dtype="float32")
    with pytest.raises(TypeError, match="dtype: expected q's dtype, one of float32"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k, num_q_heads=4,
                                dtype=torch.int32)
    with pytest.raises(ValueError, match="num_q_heads: expected an int >= 1, got 0"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k, num_q_heads=0)
    with pytest.raises(ValueError, match="dtype: required"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens),
                                k_cache=k.to(torch.float8_e4m3fn), num_q_heads=4)
    with pytest.raises(BackendError, match="triton"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k, num_q_heads=4,
                                backend="triton")
    cu = T(np.array([0, 1, 2, 3, 5], np.int32)[:b.block_tables.shape[0] + 1])
    with pytest.raises(ValueError, match="cu_q_lens"):
        tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens),
                                T(np.array([0, 2, 1], np.int32)), k_cache=k, num_q_heads=4)
    del cu


def test_plan_run_names_what_differs_from_the_plan():
    rng = np.random.default_rng(6)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    plan = tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens), k_cache=k,
                                   num_q_heads=q.shape[1])
    with pytest.raises(ValueError, match=r"q: expected the planned shape"):
        plan.run(q[1:], k, v)
    with pytest.raises(ValueError, match=r"q: expected the planned shape"):
        plan.run(q[:, :2], k, v)
    with pytest.raises(TypeError, match=r"q: expected the planned float32"):
        plan.run(q.half(), k, v)
    with pytest.raises(ValueError, match=r"k_cache: expected the planned shape"):
        plan.run(q, k[:-1], v)
    with pytest.raises(TypeError, match=r"v_cache: expected the planned float32"):
        plan.run(q, k, v.double())
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor"):
        plan.run(b.q, k, v)
    with pytest.raises(ValueError, match=r"k_cache: expected it on"):
        plan.run(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="sinks"):
        plan.run(q, k, v, sinks=torch.zeros(q.shape[1] + 1))
    with pytest.raises(TypeError, match="sinks"):
        plan.run(q, k, v, sinks=np.zeros(q.shape[1], np.float32))
    with pytest.raises(ValueError, match="k_scale"):
        plan.run(q, k, v, k_scale=2.0)
    with pytest.raises(ValueError, match="v_scale"):
        plan.run(q, k, v, v_scale=2.0)
    with pytest.raises(TypeError, match="return_lse"):
        plan.run(q, k, v, return_lse=1)
    with pytest.raises(ValueError, match="out"):
        plan.run(q, k, v, out=torch.empty(q.shape[0] + 1, *q.shape[1:]))
    # a subclass or a view with the planned shapes passes the slow checks and runs
    want = plan.run(q, k, v)
    _same(plan.run(q.clone().as_subclass(torch.Tensor), k, v), want)


def test_plan_with_unchecked_lengths_takes_any_token_count():
    """Value checks off (PREFIXKV_VALUE_CHECKS=0): like the wrapper, the plan does not hold
    q to cu_q_lens's last entry; a decode plan still holds it to num_seqs."""
    rng = np.random.default_rng(7)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens),
                                       k_cache=k, num_q_heads=q.shape[1])
        _same(plan.run(q, k, v), tf.paged_attention(q, k, v, T(b.block_tables), T(b.kv_lens),
                                                     T(b.cu_q_lens)))
        plan.run(torch.cat([q, q[:1]]), k, v)  # bounded: garbage in, no crash
        d = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16))
        dplan = tf.plan_paged_attention(T(d.block_tables), T(d.kv_lens), k_cache=T(d.k_cache),
                                        num_q_heads=d.q.shape[1])
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        dplan.run(T(d.q)[1:], T(d.k_cache), T(d.v_cache))


def test_plan_per_layer_sinks_scales_and_buffers():
    """What may change per layer (sinks, fp8 scales, out=, lse=) does, as in the wrapper."""
    rng = np.random.default_rng(8)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16), nan_fill=False)
    q = T(b.q).to(torch.bfloat16)
    k8 = T(b.k_cache).to(torch.float8_e4m3fn)
    v8 = T(b.v_cache).to(torch.float8_e4m3fn)
    meta = (T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens))
    plan = tf.plan_paged_attention(*meta, k_cache=k8, num_q_heads=q.shape[1],
                                   dtype=torch.bfloat16)
    for layer, (ks, vs) in enumerate([(None, None), (0.5, 2.0), (torch.tensor(0.25), None)]):
        sinks = torch.randn(q.shape[1]) if layer else None
        want, want_lse = tf.paged_attention(q, k8, v8, *meta, k_scale=ks, v_scale=vs,
                                            sinks=sinks, return_lse=True)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"))
        got, got_lse = plan.run(q, k8, v8, k_scale=ks, v_scale=vs, sinks=sinks, out=out, lse=lse,
                                return_lse=True)
        assert got is out and got_lse is lse
        _same(got, want)
        _same(got_lse, want_lse)
    with pytest.raises(ValueError, match="k_scale"):
        plan.run(q, k8, v8, k_scale=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="q: expected the planned bfloat16"):
        plan.run(q.float(), k8, v8)


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("groups", ["dissolved", "kept"])
def test_shared_prefix_plan_equals_the_wrapper(monkeypatch, decode, groups):
    """A small batch's prefix groups are read through each sequence's table on the CPU: the
    plan settles that once and runs paged attention over the joined tables; groups the
    backend keeps (thresholds 0 here) run the cascade. Either way the wrapper's result."""
    from prefixkv.torch_frontend import _native

    if groups == "kept":
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    rng = np.random.default_rng(9)
    sp = testing.small_shared_prefix_batch(rng, decode)
    meta = tuple(T(a) for a in sp.args()[3:])
    layers = _layers(sp, "float32")
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=layers[0][1],
                                           num_q_heads=sp.q.shape[1])
    assert plan.op == ("paged_attention" if groups == "dissolved" else "shared_prefix_attention")
    for q, k, v in layers:
        want, want_lse = tf.shared_prefix_attention(q, k, v, *meta, return_lse=True)
        got, got_lse = plan.run(q, k, v, return_lse=True)
        _same(got, want)
        _same(got_lse, want_lse)
    want = ref.shared_prefix_attention_reference(*sp.args())
    close(plan.run(*layers[0]), want, "float32")


@pytest.mark.parametrize("opts", [{"sliding_window": 6}, {"logits_soft_cap": 2.0}],
                         ids=lambda o: ",".join(o))
def test_shared_prefix_plan_options(opts):
    """A window turns the plan into paged attention over the joined tables (the wrapper's
    route); a soft cap keeps the cascade op (the CPU's fused path takes none)."""
    rng = np.random.default_rng(10)
    sp = testing.small_shared_prefix_batch(rng, False)
    meta = tuple(T(a) for a in sp.args()[3:])
    q, k, v = T(sp.q), T(sp.k_cache), T(sp.v_cache)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1], **opts)
    assert plan.op == ("paged_attention" if "sliding_window" in opts
                       else "shared_prefix_attention")
    want, want_lse = tf.shared_prefix_attention(q, k, v, *meta, return_lse=True, **opts)
    got, got_lse = plan.run(q, k, v, return_lse=True)
    _same(got, want)
    _same(got_lse, want_lse)
    close(got, ref.shared_prefix_attention_reference(*sp.args(), **opts), "float32")


def test_shared_prefix_plan_refuses_bad_prefixes():
    rng = np.random.default_rng(11)
    sp = testing.small_shared_prefix_batch(rng, True)
    meta = [T(a) for a in sp.args()[3:]]
    meta[1][0] += 1  # a prefix length that is no whole number of blocks
    with pytest.raises(ValueError, match="prefix_lens"):
        tf.plan_shared_prefix_attention(*meta, k_cache=T(sp.k_cache), num_q_heads=4)
    meta = [T(a) for a in sp.args()[3:]]
    meta[2][0] = 5
    with pytest.raises(ValueError, match="prefix_ids"):
        tf.plan_shared_prefix_attention(*meta, k_cache=T(sp.k_cache), num_q_heads=4)


def test_plan_run_under_torch_compile():
    """plan.run inside torch.compile(fullgraph=True): the custom op, no graph break."""
    rng = np.random.default_rng(12)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    plan = tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), T(b.cu_q_lens), k_cache=k,
                                   num_q_heads=q.shape[1])

    def step(q, k, v):
        return plan.run(q * 2, k, v) + 1

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    _same(got, plan.run(q * 2, k, v) + 1)


def test_plan_held_by_the_model_compiles_once_for_every_token_count():
    """A step's plan held by the model (an attribute, or a global: as engines keep a step's
    metadata) under torch.compile(fullgraph=True): run compared q's token count with the
    plan's int, a constant there, so each new count compiled a graph and the 9th raised
    FailOnRecompileLimitHit. Now automatic dynamic shapes give two graphs, as the wrapper."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(32, 4, 2, 16, generator=g), torch.randn(32, 4, 2, 16, generator=g)

    class Attention(torch.nn.Module):
        plan = None  # the step's plan, set by the engine before each forward

        def forward(self, x):
            return self.plan.run(x, k, v)

    model = Attention()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    bt = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]], dtype=torch.int32)
    kv = torch.tensor([9, 12], dtype=torch.int32)
    for t in range(2, 13):  # 11 token counts: past the recompile limit of 8
        cu = torch.tensor([0, 1, t], dtype=torch.int32)
        model.plan = tf.plan_paged_attention(bt, kv, cu, k_cache=k, num_q_heads=4)
        q = torch.randn(t, 4, 16, generator=g)
        with torch.no_grad():
            _same(compiled(q), tf.paged_attention(q, k, v, bt, kv, cu))
    assert counters["stats"]["unique_graphs"] <= 2
    with pytest.raises(Exception, match="q"):  # a q of other heads is still refused
        compiled(torch.randn(5, 2, 16, generator=g))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plan_default_dtype_is_the_caches(dtype):
    rng = np.random.default_rng(13)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 8), block_size=8,
                                  dtype=dtype)
    k = T(b.k_cache)
    plan = tf.plan_paged_attention(T(b.block_tables), T(b.kv_lens), k_cache=k,
                                   num_q_heads=b.q.shape[1])
    assert TORCH_DTYPE[dtype] == k.dtype
    assert f"{dtype}" in repr(plan)
    _same(plan.run(T(b.q), k, T(b.v_cache)),
          tf.paged_attention(T(b.q), k, T(b.v_cache), T(b.block_tables), T(b.kv_lens)))


def test_plans_take_int64_metadata():
    """int64 metadata (torch's default, SGLang's seq_lens), which the wrappers refuse, is cast
    once by a plan after its values are checked to fit int32."""
    rng = np.random.default_rng(14)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    q, k, v = T(b.q), T(b.k_cache), T(b.v_cache)
    meta32 = [T(a) for a in b.args()[3:]]
    meta64 = [t.long() for t in meta32]
    with pytest.raises(TypeError, match="int32"):
        tf.paged_attention(q, k, v, *meta64)
    plan = tf.plan_paged_attention(*meta64, k_cache=k, num_q_heads=q.shape[1])
    _same(plan.run(q, k, v), tf.paged_attention(q, k, v, *meta32))
    wide = meta64[0].clone()
    wide[1, 0] += 2**32  # would wrap to a valid id
    with pytest.raises(ValueError, match=r"block_tables: expected values that fit int32 .*, got "
                                         r"\d+ at index \(1, 0\)"):
        tf.plan_paged_attention(wide, *meta64[1:], k_cache=k, num_q_heads=q.shape[1])
    low = meta64[1].clone()
    low[2] = -(2**31) - 1
    with pytest.raises(ValueError, match=r"kv_lens: expected values that fit int32 .*, got "
                                         r"-2147483649 at index \(2,\)"):
        tf.plan_paged_attention(meta64[0], low, meta64[2], k_cache=k, num_q_heads=q.shape[1])
    with pytest.raises(TypeError, match="kv_lens: expected int32"):
        tf.plan_paged_attention(meta32[0], meta32[1].short(), meta32[2], k_cache=k,
                                num_q_heads=q.shape[1])
    sp = testing.small_shared_prefix_batch(rng, False)
    sq, sk, sv = T(sp.q), T(sp.k_cache), T(sp.v_cache)
    smeta = [T(a) for a in sp.args()[3:]]
    splan = tf.plan_shared_prefix_attention(*(t.long() for t in smeta), k_cache=sk,
                                            num_q_heads=sq.shape[1])
    _same(splan.run(sq, sk, sv), tf.shared_prefix_attention(sq, sk, sv, *smeta))


def _ptrs(plan):
    return [None if t is None else t.data_ptr() for t in plan._meta]


def test_plan_update_replans_into_the_same_tensors():
    """update(next step's metadata) checks it as plan_paged_attention does and copies it into
    the plan's own tensors (the addresses a CUDA graph captured over run keeps reading)."""
    rng = np.random.default_rng(15)
    grid = testing.seq_grid("mixed", 16)
    b1, b2 = (testing.make_ragged_batch(rng, grid, max_blocks_per_seq=12, nan_fill=False)
              for _ in range(2))
    meta1 = [T(a) for a in b1.args()[3:]]
    meta2 = [T(a) for a in b2.args()[3:]]
    q2, k2, v2 = T(b2.q), T(b2.k_cache), T(b2.v_cache)
    plan = tf.plan_paged_attention(*meta1, k_cache=T(b1.k_cache), num_q_heads=b1.q.shape[1],
                                   sliding_window=9)
    want1 = plan.run(q2, k2, v2)
    ptrs = _ptrs(plan)
    assert plan.update(*meta2) is plan
    assert _ptrs(plan) == ptrs
    want2 = tf.paged_attention(q2, k2, v2, *meta2, sliding_window=9)
    assert not torch.equal(want1, want2)
    _same(plan.run(q2, k2, v2), want2)
    bad = [t.clone() for t in meta1]
    bad[0][0, 0] = k2.shape[0]
    with pytest.raises(ValueError, match="block_tables: expected block ids"):
        plan.update(*bad)
    _same(plan.run(q2, k2, v2), want2)  # a refused update leaves the plan as it was
    plan.update(*(t.long() for t in meta1))  # int64 metadata, cast as when planning
    _same(plan.run(q2, k2, v2), want1)


def test_plan_update_refuses_other_shapes():
    rng = np.random.default_rng(16)
    b = testing.make_ragged_batch(rng, testing.seq_grid("mixed", 16))
    meta = [T(a) for a in b.args()[3:]]
    plan = tf.plan_paged_attention(*meta, k_cache=T(b.k_cache), num_q_heads=b.q.shape[1])
    before = plan.run(T(b.q), T(b.k_cache), T(b.v_cache))
    cu = meta[2].clone()
    cu[-1] += 1
    lens = meta[1].clone()
    lens[-1] += 1
    with pytest.raises(ValueError, match=r"cu_q_lens: plans \d+ query tokens, where the plan "
                                         r"has \d+"):
        plan.update(meta[0], lens, cu)
    wide = torch.cat([meta[0], meta[0][:, :1]], dim=1)
    with pytest.raises(ValueError, match=r"block_tables: shape \(\d+, \d+\), where the plan "
                                         r"was made with \(\d+, \d+\)"):
        plan.update(wide, *meta[1:])
    d = testing.make_ragged_batch(rng, [(1, 5)] * (b.block_tables.shape[0]), decode=False)
    with pytest.raises(ValueError, match=r"block_tables: shape \(\d+, 1\)"):
        plan.update(*(T(a) for a in d.args()[3:]))
    e = testing.make_ragged_batch(rng, testing.seq_grid("decode", 16))
    emeta = [T(a) for a in e.args()[3:5]]
    dplan = tf.plan_paged_attention(*emeta, k_cache=T(e.k_cache), num_q_heads=e.q.shape[1])
    with pytest.raises(ValueError, match=r"cu_q_lens: given, where the plan was made without"):
        dplan.update(*emeta, T(np.arange(emeta[0].shape[0] + 1, dtype=np.int32)))
    lens = (emeta[1] - 1).clamp(min=1)
    assert not torch.equal(lens, emeta[1])
    dplan.update(emeta[0], lens)  # a decode plan's update takes no cu_q_lens
    _same(dplan.run(T(e.q), T(e.k_cache), T(e.v_cache)),
          tf.paged_attention(T(e.q), T(e.k_cache), T(e.v_cache), emeta[0], lens))
    _same(plan.run(T(b.q), T(b.k_cache), T(b.v_cache)), before)


@pytest.mark.parametrize("groups", ["dissolved", "kept"])
def test_shared_prefix_plan_update(monkeypatch, groups):
    from prefixkv.torch_frontend import _native

    if groups == "kept":
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    rng = np.random.default_rng(17)
    s1, s2 = (testing.small_shared_prefix_batch(rng, False) for _ in range(2))
    meta1 = [T(a) for a in s1.args()[3:]]
    meta2 = [T(a) for a in s2.args()[3:]]
    q, k, v = T(s2.q), T(s2.k_cache), T(s2.v_cache)
    plan = tf.plan_shared_prefix_attention(*meta1, k_cache=k, num_q_heads=q.shape[1])
    ptrs = _ptrs(plan)
    plan.update(*meta2)
    assert _ptrs(plan) == ptrs
    _same(plan.run(q, k, v), tf.shared_prefix_attention(q, k, v, *meta2))
    if groups == "dissolved":  # a group big enough for a pass of its own: another op
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
        with pytest.raises(ValueError, match="prefix_block_tables: this metadata plans "
                                             "shared_prefix_attention"):
            plan.update(*meta2)
