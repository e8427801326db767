"""The eager wrappers of the per-layer ops (write_kv, paged and shared-prefix attention, the
merge) run their layout checks once per layout of their arguments (_ops._layout_key): an
engine repeats each layer's call every step. The value checks still run on every call, and a
call that differs in anything those checks read (an address, strides, dtype, a flag, an
option, inference mode) is checked again."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import prefixkv.torch_frontend as tf  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.torch_frontend import _ops  # noqa: E402
from torch_convert import N, T  # noqa: E402


@pytest.fixture
def spy(monkeypatch):
    """Counts the layout checks' first step (_ops._tensors), with no layout kept."""
    monkeypatch.setattr(_ops, "_VOUCHED", {})
    calls = []
    real = _ops._tensors
    monkeypatch.setattr(_ops, "_tensors", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _caches():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(8, 4, 2, 16, generator=g)
    v = torch.randn(8, 4, 2, 16, generator=g)
    key = torch.randn(3, 2, 16, generator=g)
    return key, key + 1, k, v


def _paged():
    rng = np.random.default_rng(7)
    b = testing.make_ragged_batch(rng, [(1, 9), (3, 20)], num_q_heads=4, num_kv_heads=2,
                                  head_dim=16, block_size=4)
    return b, [T(a) for a in b.args()]


def test_write_kv_checks_its_layout_once(spy):
    key, value, k, v = _caches()
    for i in range(3):
        tf.write_kv(key, value, k, v, torch.tensor([i, 9, 30], dtype=torch.int32))
    assert len(spy) == 1
    assert torch.equal(k[0, 2], key[0]) and torch.equal(v[7, 2], value[2])
    with torch.inference_mode():  # another mode: checked again, then kept
        tf.write_kv(key, value, k, v, torch.tensor([0, 1, 2], dtype=torch.int32))
        tf.write_kv(key, value, k, v, torch.tensor([0, 1, 2], dtype=torch.int32))
    assert len(spy) == 2


def test_write_kv_values_still_checked_every_call(spy):
    key, value, k, v = _caches()
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    tf.write_kv(key, value, k, v, slots)
    before = (k.clone(), v.clone())
    for _ in range(2):
        with pytest.raises(ValueError, match="slot_mapping"):
            tf.write_kv(key, value, k, v, torch.tensor([0, 1, 32], dtype=torch.int32))
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])  # nothing written
    assert len(spy) == 1


def test_write_kv_other_layouts_at_the_same_address_are_checked(spy):
    """Views starting at a kept call's addresses: the same memory as the other cache, an
    expanded (stride-0) cache, an inference tensor outside inference mode (kept inside it).
    Each refused, every time."""
    key, value, k, v = _caches()
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    tf.write_kv(key, value, k, v, slots)
    with torch.inference_mode():
        frozen = k.clone()
        tf.write_kv(key, value, frozen, v, slots)  # kept for inference mode only
    cases = [((key, value, k, k, slots), ValueError, "v_cache: shares memory with k_cache"),
             ((key, value, k, v[:1].expand(8, 4, 2, 16), slots), ValueError,
              "v_cache: its blocks share memory"),
             ((key, k.view(-1, 2, 16)[:3], k, v, slots), ValueError,
              "value: shares memory with k_cache"),
             ((key, value, frozen, v, slots), RuntimeError, "k_cache: an inference tensor")]
    for _ in range(2):
        for args, err, match in cases:
            with pytest.raises(err, match=match):
                tf.write_kv(*args)


def test_paged_attention_checks_its_layout_once(spy):
    b, args = _paged()
    want = ref.paged_attention_reference(*b.args())
    out = torch.full(args[0].shape, float("nan"))
    lse = torch.empty(args[0].shape[:2])
    for _ in range(3):
        got = tf.paged_attention(*args, out=out, lse=lse)
        assert got is out
        np.testing.assert_allclose(N(out), want, atol=2e-5, rtol=2e-5)
    assert len(spy) == 1
    tf.paged_attention(*args, sliding_window=3)  # another option: checked again
    assert len(spy) == 2


def test_paged_attention_refuses_what_a_kept_call_did_not_have(spy):
    b, args = _paged()
    out = torch.empty(args[0].shape)
    tf.paged_attention(*args, out=out)
    bad_lens = args[4].clone()
    bad_lens[1] = 10_000  # past the table: a value, checked every call
    for _ in range(2):
        with pytest.raises(ValueError, match="kv_lens"):
            tf.paged_attention(*args[:4], bad_lens, args[5], out=out)
        with pytest.raises(ValueError, match="out: expected shape"):
            tf.paged_attention(*args, out=out[:1])  # the same address, another shape
        with pytest.raises(ValueError, match="out: its elements share memory"):
            tf.paged_attention(*args, out=out[:, :1].expand(out.shape))
        with pytest.raises(ValueError, match="q: a negative-bit view"):
            tf.paged_attention(torch._neg_view(args[0]), *args[1:])


def test_shared_prefix_attention_checks_its_layout_once(spy):
    rng = np.random.default_rng(9)
    sp = testing.make_shared_prefix_batch(rng, [8], [(0, 1, 5), (0, 2, 3), (-1, 1, 6)],
                                          num_q_heads=4, num_kv_heads=2, head_dim=16,
                                          block_size=4)
    args = [None if a is None else T(a) for a in sp.args()]
    want = ref.shared_prefix_attention_reference(*sp.args())
    for _ in range(3):
        np.testing.assert_allclose(N(tf.shared_prefix_attention(*args)), want, atol=2e-5,
                                   rtol=2e-5)
    assert len(spy) == 1
    bad = args[4].clone()
    bad[0] = 6  # not a whole number of blocks: a value, checked every call
    for _ in range(2):
        with pytest.raises(ValueError, match="prefix_lens"):
            tf.shared_prefix_attention(*args[:4], bad, *args[5:])


def test_merge_checks_its_layout_once(spy):
    g = torch.Generator().manual_seed(2)
    out_a, out_b = torch.randn(5, 4, 16, generator=g), torch.randn(5, 4, 16, generator=g)
    lse_a, lse_b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    out, lse = torch.empty(5, 4, 16), torch.empty(5, 4)
    for _ in range(3):
        tf.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out, lse=lse)
    assert len(spy) == 1
    want = ref.merge_attention_states_reference(out_a.numpy(), lse_a.numpy(), out_b.numpy(),
                                               lse_b.numpy())
    np.testing.assert_allclose(N(out), want[0], atol=1e-5, rtol=1e-5)
    for _ in range(2):
        with pytest.raises(ValueError, match="out: shares memory with out_a"):
            tf.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out_a, lse=lse)


def test_kept_layouts_stay_bounded(monkeypatch):
    monkeypatch.setattr(_ops, "_VOUCHED", {})
    monkeypatch.setattr(_ops, "_PASSED_MAX", 2)
    _, args = _paged()
    for window in (3, 4, 5, 6, 7):
        tf.paged_attention(*args, sliding_window=window)
        assert len(_ops._VOUCHED) <= 2


def test_no_layout_kept_while_compiling_or_with_grad(monkeypatch):
    """Inside a dispatch mode, or with a tensor that requires grad, the call goes through the
    op (whose guard checks every call): nothing is kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_ops, "_VOUCHED", {})
    _, args = _paged()
    with Passthrough():
        tf.paged_attention(*args)
    q = args[0].clone().requires_grad_()
    with torch.no_grad():
        tf.paged_attention(q, *args[1:])
    assert not _ops._VOUCHED
    tf.paged_attention(*args)
    assert len(_ops._VOUCHED) == 1


def test_a_tensor_kept_in_one_slot_is_checked_in_another(spy):
    """An unused slot (None) keeps its place in the key: an lse= buffer (or sinks) kept, then
    passed as out= (or workspace=) with the slots before it empty, was taken unchecked (a
    [tokens, heads] buffer written as out, a float tensor as the workspace)."""
    b, args = _paged()
    tokens, heads = args[0].shape[:2]
    lse, sinks = torch.empty(tokens, heads), torch.zeros(heads)
    tf.paged_attention(*args, lse=lse)
    tf.paged_attention(*args, sinks=sinks)
    for _ in range(2):
        with pytest.raises(ValueError, match="out: expected shape"):
            tf.paged_attention(*args, out=lse)
        with pytest.raises(ValueError, match="workspace: expected a contiguous 1-D uint8"):
            tf.paged_attention(*args, workspace=sinks)
    g = torch.Generator().manual_seed(3)
    out_a, out_b = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    lse_a, lse_b = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    buf = torch.zeros(3, 2)
    tf.merge_attention_states(out_a, lse_a, out_b, lse_b, lse=buf)
    for _ in range(2):
        with pytest.raises(ValueError, match="out: expected shape"):
            tf.merge_attention_states(out_a, lse_a, out_b, lse_b, out=buf)


def test_compiling_a_wrapper_never_reads_the_kept_layouts(monkeypatch):
    """torch.compile traces the wrappers with no layout key: the kept answers must not be
    read then. Reading them (a ``.get(None)``) made dynamo build a variable of every kept key:
    compiling one paged_attention call took ~25 s with 4000 layouts kept, 0.4 s without (the
    whole test suite's compile tests ran minutes each)."""
    _, args = _paged()
    dev = torch.device("cpu")
    many = {("paged_attention", False, (i, 0, torch.Size([4, 4, 16]), (64, 16, 1),
                                        torch.float32, dev, False, False), None,
             ((type(None), None),)): True for i in range(4000)}

    def compile_time(kept):
        monkeypatch.setattr(_ops, "_VOUCHED", kept)
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: tf.paged_attention(*a), fullgraph=True, backend="eager")
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    none = compile_time({})
    assert compile_time(many) < 3 * none + 4


def test_plan_run_checks_its_buffers_once_per_layout(monkeypatch):
    """plan.run keeps the answer of its layout checks (negative bits, sinks, scales, the
    out= / lse= buffers) as the wrappers do: a layer's repeated call checks its buffers
    once; a buffer of another layout (a wrong dtype, one sharing q's memory) is still refused,
    every time, and the result is the wrapper's."""
    monkeypatch.setattr(_ops, "_VOUCHED", {})
    calls = []
    real = _ops._guard_buffers
    monkeypatch.setattr(_ops, "_guard_buffers", lambda *a: calls.append(1) or real(*a))
    from prefixkv.torch_frontend import _plan

    monkeypatch.setattr(_plan, "_guard_buffers", _ops._guard_buffers)
    b, args = _paged()
    q, k, v, tables, kv, cu = args
    plan = tf.plan_paged_attention(tables, kv, cu, k_cache=k, num_q_heads=q.shape[1])
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2])
    for _ in range(3):
        got, got_lse = plan.run(q, k, v, out=out, lse=lse, return_lse=True)
        assert got.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    assert len(calls) == 1
    want, want_lse = tf.paged_attention(q, k, v, tables, kv, cu, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    calls.clear()
    for _ in range(2):
        with pytest.raises(TypeError, match="lse"):
            plan.run(q, k, v, out=out, lse=lse.double())
        with pytest.raises(ValueError, match="out"):
            plan.run(q, k, v, out=q)
    assert len(calls) == 4
