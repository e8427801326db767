"""The torch wrappers inside model code, where a fuzzer of that use found them wrong:

- ``torch.export`` in its default (non-strict) mode pinned every dynamic size of a model that
  calls a wrapper to the example's: the shape checks took ``int()`` of torch's symbolic sizes;
- the ops that write in place (caches, ``out=`` buffers) took tensors that require grad in
  grad mode and wrote them with no gradient: a loss through the written tensor backpropagated
  incomplete gradients without an error (torch's own ``out=`` functions refuse them);
- attention read a negative-bit view (``torch._neg_view``) as its raw memory, the negation of
  its values, and wrote an ``out=`` one the same way;
- sparse and nested tensors failed deep inside torch, in errors naming no argument.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def _attention_inputs(num_seqs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(8, 4, 2, 16, generator=g)
    v = torch.randn(8, 4, 2, 16, generator=g)
    q = torch.randn(num_seqs, 4, 16, generator=g)
    bt = (torch.arange(num_seqs * 2, dtype=torch.int32).reshape(num_seqs, 2)) % 8
    kv = i32([(3 * i) % 8 + 1 for i in range(num_seqs)])
    return q, k, v, bt, kv


def _reference(q, k, v, bt, kv):
    return ref.paged_attention_reference(q.numpy(), k.numpy(), v.numpy(), bt.numpy(),
                                         kv.numpy())


class _Step(torch.nn.Module):
    """A decode layer's attention over cache buffers, as a model holds them."""

    def __init__(self, k, v):
        super().__init__()
        self.register_buffer("k", k)
        self.register_buffer("v", v)

    def forward(self, q, bt, kv):
        return tf.paged_attention(q, self.k, self.v, bt, kv)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_keeps_dynamic_sizes(strict):
    from torch.export import Dim, export

    q, k, v, bt, kv = _attention_inputs(3)
    seqs = Dim("seqs", min=1, max=64)
    ep = export(_Step(k, v), (q, bt, kv), strict=strict,
                dynamic_shapes={"q": {0: seqs}, "bt": {0: seqs}, "kv": {0: seqs}})
    for n in (1, 5):
        q2, _, _, bt2, kv2 = _attention_inputs(n, seed=n)
        got = ep.module()(q2, bt2, kv2)
        np.testing.assert_allclose(got.numpy(), _reference(q2, k, v, bt2, kv2), rtol=1e-5,
                                   atol=1e-5)


def _kv_write_args(requires_grad_key=True):
    key = torch.randn(3, 2, 16, requires_grad=requires_grad_key)
    return key, torch.randn(3, 2, 16), torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16), \
        i32([0, 1, 2])


def test_write_kv_refuses_grad_in_grad_mode():
    key, value, kc, vc, slots = _kv_write_args()
    with pytest.raises(RuntimeError, match=r"^key: requires grad.*prefixkv\.write_kv"):
        tf.write_kv(key, value, kc, vc, slots)
    assert not kc.any() and not vc.any()  # nothing written
    with torch.no_grad():  # what a serving loop does: written, as torch's index_copy_ would
        tf.write_kv(key, value, kc, vc, slots)
    np.testing.assert_array_equal(kc.reshape(-1, 2, 16)[:3].numpy(), key.detach().numpy())


def test_write_into_a_parameter_cache():
    """A cache held as a Parameter (requires grad): refused in grad mode, as torch refuses an
    in-place write to a leaf that requires grad; written under no_grad or inference_mode."""
    key, value, _, vc, slots = _kv_write_args(requires_grad_key=False)
    kc = torch.nn.Parameter(torch.zeros(8, 4, 2, 16))
    with pytest.raises(RuntimeError, match=r"^k_cache: requires grad"):
        tf.write_kv(key, value, kc, vc, slots)
    with pytest.raises(RuntimeError, match=r"^caches\[0\]: requires grad"):
        tf.copy_blocks([kc, vc], i32([0]), i32([1]))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            tf.write_kv(key, value, kc, vc, slots)
    np.testing.assert_array_equal(kc.detach().reshape(-1, 2, 16)[:3].numpy(), key.numpy())


def test_out_buffers_refuse_grad_in_grad_mode():
    q, k, v, bt, kv = _attention_inputs(3)
    q.requires_grad_(True)
    out = torch.full_like(q, 7.0, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"^q: requires grad.*paged_attention_out"):
        tf.paged_attention(q, k, v, bt, kv, out=out)
    assert (out == 7.0).all()
    # The functional form keeps working in grad mode: its backward is the error.
    res = tf.paged_attention(q, k, v, bt, kv)
    with pytest.raises(RuntimeError, match="forward-only"):
        res.sum().backward()
    with torch.no_grad():
        tf.paged_attention(q, k, v, bt, kv, out=out)
    np.testing.assert_allclose(out.numpy(), _reference(q.detach(), k, v, bt, kv), rtol=1e-5,
                               atol=1e-5)

    a, b = torch.randn(3, 4, 16, requires_grad=True), torch.randn(3, 4, 16)
    la, lb = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"^out_a: requires grad"):
        tf.merge_attention_states(a, la, b, lb, out=torch.empty(3, 4, 16),
                                  lse=torch.empty(3, 4))
    caches = [torch.randn(8, 4, 2, 16, requires_grad=True)]
    with pytest.raises(RuntimeError, match=r"^caches\[0\]: requires grad"):
        tf.gather_blocks(caches, i32([1]), out=torch.empty(1, 1, 4, 2, 16))
    with pytest.raises(RuntimeError, match=r"^buffer: requires grad"):
        tf.scatter_blocks([torch.zeros(8, 4, 2, 16)], torch.randn(1, 1, 4, 2, 16,
                                                                  requires_grad=True), i32([1]))
    with pytest.raises(RuntimeError, match=r"^src_caches\[0\]: requires grad"):
        tf.swap_blocks(caches, [torch.zeros(8, 4, 2, 16)], i32([1]), i32([2]))


def test_negative_bit_views_are_refused_by_attention():
    q, k, v, bt, kv = _attention_inputs(3)
    neg = torch._neg_view
    for name, args in (("q", (neg(q), k, v)), ("k_cache", (q, neg(k), v)),
                       ("v_cache", (q, k, neg(v)))):
        with pytest.raises(ValueError, match=rf"^{name}: a negative-bit view"):
            tf.paged_attention(*args, bt, kv)
    with pytest.raises(ValueError, match=r"^out: a negative-bit view"):
        tf.paged_attention(q, k, v, bt, kv, out=neg(torch.empty_like(q)))
    with pytest.raises(ValueError, match=r"^kv_lens: a negative-bit view"):
        tf.paged_attention(q, k, v, bt, neg(kv))
    prefix = dict(prefix_block_tables=bt[:1], prefix_lens=i32([0]), prefix_ids=i32([0, 0, 0]))
    with pytest.raises(ValueError, match=r"^k_cache: a negative-bit view"):
        tf.shared_prefix_attention(q, neg(k), v, block_tables=bt, kv_lens=kv, **prefix)
    # An ordinary negation is a value, not a view: attention reads it as such.
    got = tf.paged_attention(-q, k, v, bt, kv)
    np.testing.assert_allclose(got.numpy(), _reference(-q, k, v, bt, kv), rtol=1e-5, atol=1e-5)


def test_sparse_and_nested_tensors_are_named():
    q, k, v, bt, kv = _attention_inputs(2)
    cases = [
        ("q", lambda: tf.paged_attention(q.to_sparse(), k, v, bt, kv)),
        ("k_cache", lambda: tf.paged_attention(q, k.to_sparse(), v, bt, kv)),
        ("block_tables", lambda: tf.paged_attention(q, k, v, bt.to_sparse(), kv)),
        ("q", lambda: tf.paged_attention(
            torch.nested.nested_tensor([q[:1], q[1:]], layout=torch.jagged), k, v, bt, kv)),
        ("out", lambda: tf.paged_attention(q, k, v, bt, kv, out=torch.empty_like(q)
                                           .to_sparse())),
        ("key", lambda: tf.write_kv(q[:, :2].to_sparse(), q[:, :2], k, v, i32([0, 1]))),
        (r"caches\[0\]", lambda: tf.copy_blocks([k.to_sparse()], i32([0]), i32([1]))),
        (r"caches\[0\]", lambda: tf.gather_blocks([k.to_sparse()], i32([0]))),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"^{name}: expected a dense"):
            call()


def test_grad_refusal_under_compile():
    """A compiled step refuses too (dynamo traces the wrappers' check); under fullgraph torch
    wraps the error, whose text still names the argument."""
    key, value, kc, vc, slots = _kv_write_args()

    def step(k):
        tf.write_kv(k, value, kc, vc, slots)

    with pytest.raises(RuntimeError, match=r"^key: requires grad"):
        torch.compile(step, backend="eager")(key)
    with pytest.raises(Exception, match=r"key: requires grad"):
        torch.compile(step, backend="eager", fullgraph=True)(key)
    assert not kc.any()
    with torch.no_grad():
        torch.compile(step, backend="eager", fullgraph=True)(key)
    np.testing.assert_array_equal(kc.reshape(-1, 2, 16)[:3].numpy(), key.detach().numpy())


def test_negative_bit_views_elsewhere():
    """The same refusal where a review found the bit read raw: a plan's run (its fast path
    skipped the wrapper's checks), the merge (the Triton kernel reads raw), write_kv (its
    Triton kernel too) and gather_blocks' out=; block ops route such caches to the torch
    backend, which resolves the bit (the Triton and CUDA C copies move raw bytes)."""
    from prefixkv.torch_frontend import _ops

    neg = torch._neg_view
    q, k, v, bt, kv = _attention_inputs(3)
    plan = tf.plan_paged_attention(bt, kv, k_cache=k, num_q_heads=4)
    with pytest.raises(ValueError, match=r"^q: a negative-bit view"):
        plan.run(neg(q), k, v)
    np.testing.assert_allclose(plan.run(q, k, v).numpy(), _reference(q, k, v, bt, kv),
                               rtol=1e-5, atol=1e-5)
    a, la = torch.randn(3, 4, 16), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"^out_b: a negative-bit view"):
        tf.merge_attention_states(a, la, neg(a), la)
    key, value, kc, vc, slots = _kv_write_args(requires_grad_key=False)
    with pytest.raises(ValueError, match=r"^value: a negative-bit view"):
        tf.write_kv(key, neg(value), kc, vc, slots)
    assert not kc.any()
    with pytest.raises(ValueError, match=r"^out: a negative-bit view"):
        tf.gather_blocks([k], i32([1]), out=neg(torch.empty(1, 1, 4, 2, 16)))
    with pytest.raises(TypeError, match=r"^out: expected a dense"):
        tf.gather_blocks([k], i32([1]), out=torch.empty(1, 1, 4, 2, 16).to_sparse())
    assert _ops._block_contiguous([k, v]) and not _ops._block_contiguous([k, neg(v)])
    assert not _ops._block_contiguous([torch.zeros(2, 3, dtype=torch.complex64).conj()])
