"""Plans given q's token count (``num_tokens=``): a padded batch's bucket as the plan's static
token count (no retrace of a jitted step when cu_q_lens[-1] changes, no host read of
cu_q_lens), checked against cu_q_lens in checked mode, both frontends; and the padding hint of
the cu_q_lens error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from prefixkv.paged import testing
from prefixkv.paged.validate import value_checks

from prefixkv import jax_frontend as jf
from prefixkv import torch_frontend as tf

HQ = 4


def _batch():
    rb = testing.make_ragged_batch(np.random.default_rng(0), [(2, 20), (3, 9)],
                                   num_q_heads=HQ, num_kv_heads=2, head_dim=64, block_size=8,
                                   nan_fill=False)
    return rb.args()  # q (5 tokens), k, v, block_tables, kv_lens, cu_q_lens [0, 2, 5]


def _padded(q, rows=16):
    qp = np.zeros((rows, *q.shape[1:]), q.dtype)
    qp[:len(q)] = q
    return qp


def test_jax_plan_with_num_tokens_never_retraces_for_new_lengths():
    q, k, v, bt, kl, cu = _batch()
    want = np.asarray(jf.paged_attention(q, k, v, bt, kl, cu))
    step = jax.jit(lambda plan, q, k, v: plan.run(q, k, v))
    with value_checks(False):  # padded rows past cu_q_lens[-1], as tpu-inference pads q
        for real in (5, 4, 3):
            cu_step = np.array([0, 2, real], np.int32)
            plan = jf.plan_paged_attention(bt, kl, cu_step, k_cache=jnp.asarray(k),
                                           num_q_heads=HQ, num_tokens=16)
            out = np.asarray(step(plan, _padded(q), k, v))
        assert step._cache_size() == 1
    np.testing.assert_array_equal(out[:2], want[:2])
    plan = jf.plan_paged_attention(bt, kl, cu, k_cache=jnp.asarray(k), num_q_heads=HQ,
                                   num_tokens=5)
    np.testing.assert_array_equal(np.asarray(step(plan, q, k, v)), want)
    with pytest.raises(ValueError, match=r"q: expected the planned shape \(5, 4, 64\)"):
        plan.run(_padded(q), k, v)


def test_jax_plan_with_num_tokens_takes_traced_metadata():
    """Without num_tokens a ragged plan needs cu_q_lens on the host (its error says so)."""
    q, k, v, bt, kl, cu = _batch()
    want = np.asarray(jf.paged_attention(q, k, v, bt, kl, cu))
    f = jax.jit(lambda bt, kl, cu, q, k, v: jf.plan_paged_attention(
        bt, kl, cu, k_cache=k, num_q_heads=HQ, num_tokens=q.shape[0]).run(q, k, v))
    np.testing.assert_array_equal(np.asarray(f(bt, kl, cu, q, k, v)), want)
    g = jax.jit(lambda bt, kl, cu, k: jf.plan_paged_attention(bt, kl, cu, k_cache=k,
                                                              num_q_heads=HQ))
    with pytest.raises(TypeError, match=r"cu_q_lens: a plan is made outside jax.jit(.|\n)*"
                                        r"with num_tokens="):
        g(bt, kl, cu, k)


@pytest.mark.parametrize("frontend", ["jax", "torch"])
def test_num_tokens_is_checked(frontend):
    q, k, v, bt, kl, cu = _batch()
    if frontend == "jax":
        plan_paged, plan_shared, kc = jf.plan_paged_attention, jf.plan_shared_prefix_attention, k
        meta = (bt, kl, cu)
    else:
        plan_paged, plan_shared = tf.plan_paged_attention, tf.plan_shared_prefix_attention
        kc, meta = torch.from_numpy(k), tuple(map(torch.from_numpy, (bt, kl, cu)))
    with pytest.raises(ValueError, match=r"cu_q_lens: expected cu_q_lens\[-1\] == num_tokens "
                                         r"\(16\), got 5; rows padded past the batch"):
        plan_paged(*meta, k_cache=kc, num_q_heads=HQ, num_tokens=16)
    with pytest.raises(ValueError, match=r"num_tokens: a decode plan \(cu_q_lens None\) has "
                                         r"one query token per sequence \(2\), got 3"):
        plan_paged(*meta[:2], k_cache=kc, num_q_heads=HQ, num_tokens=3)
    with pytest.raises(TypeError, match="num_tokens: expected an int, got 5.0"):
        plan_paged(*meta, k_cache=kc, num_q_heads=HQ, num_tokens=5.0)
    with pytest.raises(ValueError, match=r"num_tokens: expected an int >= 0, got -1"):
        plan_shared(meta[0][:1, :1] * 0, meta[1][:1] * 0, meta[1] * 0 - 1, *meta, k_cache=kc,
                    num_q_heads=HQ, num_tokens=-1)
    plan_paged(*meta, k_cache=kc, num_q_heads=HQ, num_tokens=np.int64(5))


def test_torch_plan_with_num_tokens_runs_a_padded_batch():
    q, k, v, bt, kl, cu = map(torch.from_numpy, _batch())
    want = tf.paged_attention(q, k, v, bt, kl, cu)
    with value_checks(False):
        plan = tf.plan_paged_attention(bt, kl, torch.tensor([0, 2, 5], dtype=torch.int32),
                                       k_cache=k, num_q_heads=HQ, num_tokens=16)
        out = plan.run(torch.from_numpy(_padded(q.numpy())), k, v)
        with pytest.raises(ValueError, match=r"q: expected the planned shape \(16, 4, 64\)"):
            plan.run(q, k, v)  # the planned count, not any
        plan.update(bt, kl, torch.tensor([0, 1, 3], dtype=torch.int32))  # same shapes
    torch.testing.assert_close(out[:5], want)  # the padded batch may take another route
    plan = tf.plan_shared_prefix_attention(bt[:1, :1] * 0, kl[:1] * 0, kl * 0 - 1, bt, kl, cu,
                                           k_cache=k, num_q_heads=HQ, num_tokens=5)
    torch.testing.assert_close(plan.run(q, k, v), want, rtol=0, atol=0)


def test_torch_wrapper_error_for_padded_rows_says_how_to_pad():
    q, k, v, bt, kl, cu = map(torch.from_numpy, _batch())
    with pytest.raises(ValueError, match=r"got 5; rows padded past the batch \(vLLM's "
                                         r"num_actual_tokens\): pass q\[:cu_q_lens\[-1\]\]"):
        tf.paged_attention(torch.from_numpy(_padded(q.numpy())), k, v, bt, kl, cu)
    with pytest.raises(ValueError, match=r"expected cu_q_lens\[-1\] == num_tokens \(5\), "
                                         r"got 6$"):
        tf.paged_attention(q, k, v, bt, kl, torch.tensor([0, 2, 6], dtype=torch.int32))


@pytest.mark.parametrize("frontend", ["jax", "torch"])
def test_plan_names_num_q_heads_not_a_multiple_of_the_kv_heads(frontend):
    """The plan has no q argument: the head-count error names num_q_heads, not q's layout."""
    _, k, _, bt, kl, cu = _batch()
    lib, kc = (jf, k) if frontend == "jax" else (tf, torch.from_numpy(k))
    if frontend == "torch":
        bt, kl, cu = map(torch.from_numpy, (bt, kl, cu))
    with pytest.raises(ValueError, match=r"^num_q_heads: expected a multiple of k_cache's 2 kv "
                                         r"heads .* got 3$"):
        lib.plan_paged_attention(bt, kl, cu, k_cache=kc, num_q_heads=3)
