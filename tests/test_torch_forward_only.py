"""The torch ops are inference kernels: inputs that need grad run forward as without, and a
backward through an op says the op has no gradient, naming it (torch's default error names no
op and suggests registering a formula)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from prefixkv.paged import testing  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def _batch():
    rb = testing.make_ragged_batch(np.random.default_rng(3), [(2, 12), (1, 9)], num_q_heads=4,
                                   num_kv_heads=2, head_dim=32, block_size=8, nan_fill=False)
    return tuple(map(torch.from_numpy, rb.args()))


def _calls():
    q, k, v, bt, kl, cu = _batch()
    shared = (bt[:1, :1], kl[:1] * 0 + 8, kl * 0, bt, kl, cu)
    return {
        "paged_attention": lambda q: tf.paged_attention(q, k, v, bt, kl, cu),
        "shared_prefix_attention": lambda q: tf.shared_prefix_attention(q, k, v, *shared),
        "merge_attention_states": lambda q: tf.merge_attention_states(
            q, torch.zeros(q.shape[:2]), q.detach() * 2, torch.ones(q.shape[:2]))[0],
        "gather_blocks": lambda q: tf.gather_blocks([k.requires_grad_(q.requires_grad)],
                                                    torch.tensor([1, 2]))
    }, q


@pytest.mark.parametrize("op", ["paged_attention", "shared_prefix_attention",
                                "merge_attention_states", "gather_blocks"])
def test_backward_names_the_forward_only_op(op):
    calls, q = _calls()
    want = calls[op](q)
    out = calls[op](q.clone().requires_grad_())
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=rf"prefixkv\.{op} is forward-only \(an inference "
                                           rf"kernel\): it has no gradient\. Call it under "
                                           rf"torch\.no_grad\(\)"):
        out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(calls[op](q.clone().requires_grad_()), want, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["paged_attention", "shared_prefix_attention",
                                "merge_attention_states", "gather_blocks"])
def test_compiled_forward_in_grad_mode_runs_and_its_backward_names_the_op(op):
    """A model run in grad mode without no_grad (eval() alone) with q from a projection:
    AOTAutograd traces the backward whenever an input requires grad, and the backward formula
    that raised made torch.compile fail in the forward, while compiling, where eager runs
    it. The forward now compiles and matches eager; a backward that runs still raises."""
    calls, q = _calls()
    # q's tokens as the blocks of one cache (requires_grad_ inside breaks the graph)
    calls["gather_blocks"] = lambda q: tf.gather_blocks([q], torch.tensor([1, 0]))
    want = calls[op](q)
    fn = torch.compile(calls[op], backend="aot_eager", fullgraph=True)
    out = fn(q.clone().requires_grad_())
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=rf"prefixkv\.{op} is forward-only"):
        out.sum().backward()
