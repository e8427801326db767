"""The torch wrappers traced rather than run: under FakeTensorMode (shape inference),
make_fx (fake and real tracing) and torch.func.functionalize of the read-only ops. The
wrappers route such calls through ``torch.ops.prefixkv`` (whose fake implementations and
guards take them); their own host value checks and memory checks read fake tensors' values
and compared functionalization's wrapped tensors' addresses, so every wrapper but the merge
raised where the ops themselves run (``.numpy()`` of a fake tensor, a false "shares memory"
refusal of write_kv, an unallocated storage read by the kernels)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from prefixkv.paged import testing  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def _args():
    rb = testing.make_ragged_batch(np.random.default_rng(5), [(2, 12), (1, 9)],
                                   num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                                   nan_fill=False)
    q, k, v, bt, kl, cu = map(torch.from_numpy, rb.args())
    ids = torch.tensor([1, 2], dtype=torch.int32)
    return q, k, v, bt, kl, cu, ids


def _paged(q, k, v, bt, kl, cu, ids):
    return tf.paged_attention(q, k, v, bt, kl, cu)


def _shared(q, k, v, bt, kl, cu, ids):
    return tf.shared_prefix_attention(q, k, v, bt[:1, :1], kl[:1] * 0 + 8, kl * 0, bt, kl, cu)


def _write(q, k, v, bt, kl, cu, ids):
    tf.write_kv(q[:, :2], q[:, 2:], k, v, ids)
    return k


def _blocks(q, k, v, bt, kl, cu, ids):
    tf.copy_blocks([k, v], ids, ids.flip(0))
    buf = tf.gather_blocks([k, v], ids)
    tf.scatter_blocks([k, v], buf, ids.flip(0))
    return buf


def _hash(q, k, v, bt, kl, cu, ids):
    return tf.hash_blocks(torch.arange(16, dtype=torch.int32), 8)


CALLS = {"paged_attention": _paged, "shared_prefix_attention": _shared, "write_kv": _write,
         "copy_gather_scatter": _blocks}


@pytest.mark.parametrize("name", list(CALLS))
def test_wrappers_under_fake_tensor_mode(name):
    args = _args()
    want = CALLS[name](*[a.clone() for a in args])
    with FakeTensorMode() as mode:
        got = CALLS[name](*[mode.from_tensor(a) for a in args])
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("tracing_mode", ["fake", "real"])
@pytest.mark.parametrize("name", [*CALLS, "hash_blocks"])
def test_wrappers_under_make_fx(name, tracing_mode):
    fn = _hash if name == "hash_blocks" else CALLS[name]
    args = _args()
    want = fn(*[a.clone() for a in args])
    gm = make_fx(fn, tracing_mode=tracing_mode)(*[a.clone() for a in args])
    torch.testing.assert_close(gm(*[a.clone() for a in args]), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["paged_attention", "shared_prefix_attention"])
def test_read_only_wrappers_under_functionalize(name):
    """(torch.func.functionalize refuses custom ops that write their arguments, torch's own
    limit: the cache ops are not taken there; torch.compile and torch.export take them.)"""
    args = _args()
    want = CALLS[name](*args)
    got = torch.func.functionalize(CALLS[name])(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
